"""``hjepa-metrics replay`` and ``report`` through the command line: where a replay goes, what it says,
and its exit code when the destination fails, already exists or the file holds several runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from writers import JSONLWriter, read_jsonl


def _cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hjepa_metrics.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})},
        cwd=cwd,
        check=False,
    )


def _run(path: Path, steps: range, *, append: bool = False) -> Path:
    with JSONLWriter(path, resume=append) as w:
        w.log_config({"lr": 0.1})
        for step in steps:
            w.log_scalars({"train/loss/total": 1.0 / (step + 1)}, step, wall_time=1_700_000_000.0 + step)
    return path


def _mlflow_history(uri: str, run_name: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("hjepa")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss/total")]


def test_wandb_without_a_login_fails_with_one_line_and_exit_1(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    run = _run(tmp_path / "exp1" / "metrics.jsonl", range(5))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_CONFIG_DIR=str(tmp_path / "home"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hjepa_metrics.cli",
            "replay",
            str(run),
            "--to",
            "wandb",
            "--log-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "replayed" not in done.stdout
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("hjepa-metrics replay: error:")]
    assert len(errors) == 1 and "could not open wandb" in errors[0], done.stderr


def test_mlflow_destination_from_the_environment_twice_refused_then_resumed(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    run = _run(tmp_path / "exp1" / "metrics.jsonl", range(5))
    uri = f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}"
    (tmp_path / "server").mkdir()
    first = _cli("replay", str(run), "--to", "mlflow", env={"MLFLOW_TRACKING_URI": uri}, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # the default destination is named for the run, and the output says where it went and how to look
    assert "replayed 7 records" in first.stdout and "scalars: 5" in first.stdout, first.stdout
    assert f"mlflow ui --backend-store-uri {uri}" in first.stdout
    assert _mlflow_history(uri, "exp1") == [0, 1, 2, 3, 4]
    assert not (tmp_path / "mlflow.db").exists()  # nothing written relative to the working directory

    again = _cli("replay", str(run), "--to", "mlflow", env={"MLFLOW_TRACKING_URI": uri}, cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"hjepa-metrics replay: error: {Path('runs/replay/exp1')} already holds a run; pass --resume to "
        "continue it (steps already there are skipped) or choose another --log-dir"
    )
    # the training went on: resume sends the new steps only, into the same run
    _run(run, range(5, 8), append=True)
    resumed = _cli(
        "replay", str(run), "--to", "mlflow", "--resume", env={"MLFLOW_TRACKING_URI": uri}, cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "mlflow: 5 scalar records skipped" in resumed.stdout, resumed.stdout
    assert _mlflow_history(uri, "exp1") == list(range(8))


def test_tracking_uri_flag_wins_over_the_environment(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    run = _run(tmp_path / "exp2" / "metrics.jsonl", range(3))
    flag = f"sqlite:///{tmp_path / 'flag.db'}"
    done = _cli(
        "replay",
        str(run),
        "--to",
        "mlflow",
        "--tracking-uri",
        flag,
        "--log-dir",
        str(tmp_path / "o"),
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'env.db'}"},
    )
    assert done.returncode == 0, done.stderr
    assert _mlflow_history(flag, "exp2") == [0, 1, 2]
    assert not (tmp_path / "env.db").exists()


def test_a_file_with_two_runs_is_refused_or_one_is_chosen(tmp_path: Path) -> None:
    run = _run(tmp_path / "twice" / "metrics.jsonl", range(4))
    _run(run, range(3))  # a second training appended to the same file: steps restart
    for command, extra in (
        ("report", ["--out", str(tmp_path / "rep")]),
        ("replay", ["--to", "jsonl", "--log-dir", str(tmp_path / "o")]),
    ):
        done = _cli(command, str(run), *extra)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.strip() == (
            f"hjepa-metrics {command}: error: {run}: holds several training runs (steps restart at 0 after "
            "reaching 3: a second training wrote to the same file); choose one with --run N (1 = the first), "
            "or give each training its own log_dir"
        )
    done = _cli("replay", str(run), "--run", "2", "--to", "jsonl", "--log-dir", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    steps = [r["step"] for r in read_jsonl(tmp_path / "o") if "metrics" in r]
    assert steps == [0, 1, 2]
    assert [r["config"] for r in read_jsonl(tmp_path / "o") if r.get("kind") == "config"] == [{"lr": 0.1}]
    done = _cli("report", str(run), "--run", "1", "--out", str(tmp_path / "rep"))
    assert done.returncode == 0 and "over steps 0-3" in done.stdout, done.stdout + done.stderr
    done = _cli("report", str(run), "--run", "3", "--out", str(tmp_path / "rep"))
    assert done.returncode == 1 and done.stderr.strip().endswith("--run 3: the file holds 2 run(s)")


def test_a_jsonl_destination_that_cannot_be_written_exits_1(tmp_path: Path) -> None:
    run = _run(tmp_path / "exp3" / "metrics.jsonl", range(3))
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    done = _cli("replay", str(run), "--to", "jsonl", "--log-dir", str(blocked / "sub"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("hjepa-metrics replay: error:") and "replayed" not in done.stdout
