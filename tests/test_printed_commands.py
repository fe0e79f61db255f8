"""Every command the demo prints works as pasted after the README's install: TensorBoard shows the
named run, the dashboard and a filled HParams tab; the MLflow UI serves the run; W&B LEET opens the
offline run; the report runs."""

from __future__ import annotations

import json
import math
import os
import pty
import re
import select
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, stop_group

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

RUN = "first"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The demo with all four backends; ``{backend: the command it printed}``."""
    log_dir = tmp_path_factory.mktemp("demo")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hjepa_metrics.cli",
            "demo",
            "--steps",
            "12",
            "--log-dir",
            str(log_dir),
            "--run-name",
            RUN,
            "--backends",
            "jsonl,tensorboard,mlflow,wandb",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    commands: dict[str, str] = {}
    backend = ""
    for line in done.stdout.splitlines():
        if m := re.match(r"  (JSONL|TensorBoard|MLflow|W&B):", line):
            backend = m.group(1)
        elif m := re.match(r"\s+open: (.+)$", line):
            commands[backend] = m.group(1)
    assert set(commands) == {"JSONL", "TensorBoard", "MLflow", "W&B"}, done.stdout
    return log_dir, commands


def _argv(command: str) -> list[str]:
    """The printed command as a shell would run it, from this interpreter's environment."""
    argv = shlex.split(command)
    exe = Path(sys.executable).with_name(argv[0])
    return [str(exe) if exe.exists() else argv[0], *argv[1:]]


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts, stopped with their process groups at its end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        stop_group(proc)


def _wait_json(proc: subprocess.Popen[bytes], url: str, body: Any = None, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    data = None if body is None else json.dumps(body).encode()
    while True:
        assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
        try:
            request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as resp:
                return json.loads(resp.read())
        except (OSError, urllib.error.HTTPError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_printed_tensorboard_command_shows_the_named_run_dashboard_and_hparams(
    demo: tuple[Path, dict[str, str]], started: list[subprocess.Popen[bytes]]
) -> None:
    _, commands = demo
    port = free_port()
    argv = [
        *_argv(commands["TensorBoard"]),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--reload_interval",
        "1",
    ]
    started.append(
        subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    )
    base = f"http://127.0.0.1:{port}/data"
    deadline = time.monotonic() + 90
    while _wait_json(started[0], f"{base}/runs") != [RUN]:  # named, not "."
        assert time.monotonic() < deadline, _wait_json(started[0], f"{base}/runs")
        time.sleep(0.5)
    layout = _wait_json(started[0], f"{base}/plugin/custom_scalars/layout")
    titles = [chart["title"] for c in layout["category"] for chart in c["chart"]]
    assert not any("gpu_memory" in t for t in titles)  # no CUDA here: no chart that cannot fill
    assert "Level 0 (Finest) (rank)" in titles and "Level 0 (Finest) (cosine)" in titles
    experiment = _wait_json(started[0], f"{base}/plugin/hparams/experiment", {"experimentName": ""})
    names = {i["name"] for i in experiment["hparamInfos"]}
    assert {"training.lr", "model.ema.momentum_end", "loss.hierarchy_weights"} <= names
    metric_tags = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert "train/loss/total" in metric_tags and len(metric_tags) > 20
    groups = _wait_json(
        started[0],
        f"{base}/plugin/hparams/session_groups",
        {
            "experimentName": "",
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"metric": {"tag": "train/loss/total"}}],
            "startIndex": 0,
            "sliceSize": 10,
        },
    )
    (group,) = groups["sessionGroups"]
    assert group["name"] == RUN
    loss = [v for v in group["metricValues"] if v["name"]["tag"] == "train/loss/total"]
    assert loss and math.isfinite(loss[0]["value"]) and loss[0]["trainingStep"] == 10  # the column is filled


def test_hparams_plugin_data_read_back_with_event_accumulator(demo: tuple[Path, dict[str, str]]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    log_dir, _ = demo
    acc = EventAccumulator(str(log_dir / "tensorboard" / RUN))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(c) for tag, c in content.items()}
    start = data["_hparams_/session_start_info"].session_start_info
    assert start.hparams["training.lr"].number_value == pytest.approx(2e-3)
    assert start.hparams["model.stop_gradient"].bool_value is True
    assert start.hparams["hjepa_metrics.alerts.warmup_steps"].number_value == 25
    experiment = data["_hparams_/experiment"].experiment
    assert "train/collapse/level0_effective_rank" in {m.name.tag for m in experiment.metric_infos}
    assert data["_hparams_/session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS


def test_printed_mlflow_ui_command_serves_the_run(
    demo: tuple[Path, dict[str, str]], started: list[subprocess.Popen[bytes]]
) -> None:
    _, commands = demo
    port = free_port()
    argv = [*_argv(commands["MLflow"]), "--host", "127.0.0.1", "--port", str(port)]
    started.append(
        subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        )
    )
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    experiment = _wait_json(started[0], f"{api}/experiments/get-by-name?experiment_name=hjepa_demo")[
        "experiment"
    ]
    runs = _wait_json(started[0], f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]})[
        "runs"
    ]
    assert [r["info"]["run_name"] for r in runs] == [RUN]
    assert runs[0]["info"]["status"] == "FINISHED"
    assert any(m["key"] == "train/loss/total" for m in runs[0]["data"]["metrics"])


def test_printed_wandb_leet_command_opens_the_offline_run(
    demo: tuple[Path, dict[str, str]], started: list[subprocess.Popen[bytes]]
) -> None:
    _, commands = demo
    primary, secondary = pty.openpty()  # LEET is a terminal UI: it needs a terminal
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    started.append(
        subprocess.Popen(
            _argv(commands["W&B"]),
            stdin=secondary,
            stdout=secondary,
            stderr=secondary,
            env=env,
            start_new_session=True,
        )
    )
    os.close(secondary)
    run_id = commands["W&B"].rsplit("-", 1)[1].encode()
    screen = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and run_id not in screen:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                try:
                    screen += os.read(primary, 65536)
                except OSError:
                    break
            assert started[0].poll() is None, screen.decode(errors="replace")[-2000:]
    finally:
        os.close(primary)
    assert run_id in screen, screen.decode(errors="replace")[-2000:]  # the run is open


def test_printed_report_command_runs(demo: tuple[Path, dict[str, str]]) -> None:
    _, commands = demo
    done = subprocess.run(_argv(commands["JSONL"]), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "Training-health report" in done.stdout and "Alerts: none" in done.stdout
