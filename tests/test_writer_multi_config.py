"""Fan-out to all four backends, failure isolation, and writer selection by config."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import wandb_reader

from writers import BackgroundWriter, BaseWriter, JSONLWriter, MultiWriter, Writer, build_writers, read_jsonl
from writers.config import config_from_env, load_config

pytest.importorskip("wandb")
pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


class Exploding(BaseWriter):
    name = "exploding"

    def __init__(self, fail_from: int) -> None:
        super().__init__()
        self.fail_from = fail_from
        self.closed_calls = 0

    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        if step >= self.fail_from:
            raise OSError("disk on fire")

    def _close(self, failed: bool) -> None:
        self.closed_calls += 1


def _all_four(tmp_path: Path) -> dict[str, Any]:
    return {
        "logging": {
            "experiment_name": "fanout",
            "log_dir": str(tmp_path),
            "tensorboard": {"enabled": True},
            "wandb": {"enabled": True, "project": "p", "mode": "offline"},
            "mlflow": {"enabled": True},
            "jsonl": {"enabled": True},
        }
    }


def _wandb_core_children() -> list[int]:
    import os

    pids = []
    for stat in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = stat.read_bytes()
        except OSError:
            continue
        if b"wandb-core" in cmd:
            status = (stat.parent / "status").read_text()
            ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid")))
            if ppid == os.getpid():
                pids.append(int(stat.parent.name))
    return pids


def test_four_backends_at_once_with_one_failing_mid_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    multi = build_writers(_all_four(tmp_path))
    assert isinstance(multi, MultiWriter)
    assert [w.name for w in multi.writers] == ["tensorboard", "wandb", "mlflow", "jsonl"]
    bad = Exploding(fail_from=2)
    multi.writers.append(bad)
    for step in range(5):
        multi.log_scalars({"train/loss/total": float(step), "train/nan": math.nan}, step)
    multi.close()
    assert multi.errors == {"exploding": 3}
    assert caplog.text.count("writer 'exploding' failed") == 1  # reported once
    assert bad.closed_calls == 1
    steps = list(range(5))
    jsonl = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in jsonl] == steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard" / "fanout"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss/total")] == steps
    assert [r["global_step"] for r in wandb_reader.history(tmp_path)] == steps
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    run_id = (tmp_path / "mlflow_run_id").read_text(encoding="utf-8")
    assert [m.step for m in client.get_metric_history(run_id, "train/loss/total")] == steps
    assert _wandb_core_children() == []


def test_strict_mode_raises(tmp_path: Path) -> None:
    multi = MultiWriter([JSONLWriter(tmp_path), Exploding(fail_from=0)], strict=True)
    with pytest.raises(OSError, match="disk on fire"):
        multi.log_scalars({"a": 1.0}, 0)
    multi.close()
    assert read_jsonl(tmp_path)[0]["metrics"] == {"a": 1.0}  # the healthy writer still got it


def test_protocol_is_runtime_checkable(tmp_path: Path) -> None:
    with JSONLWriter(tmp_path) as w:
        assert isinstance(w, Writer)
    assert not isinstance(object(), Writer)


def _describe(writer: Writer) -> list[tuple[str, str]]:
    writers = writer.writers if isinstance(writer, MultiWriter) else [writer]
    out = []
    for outer in writers:
        w = getattr(outer, "inner", outer)
        where = getattr(w, "path", None) or getattr(w, "logdir", None) or getattr(w, "tracking_uri", None)
        out.append((w.name, str(where)))
    return out


def test_dict_yaml_and_environment_select_the_same_writers(tmp_path: Path) -> None:
    config = {
        "logging": {"experiment_name": "e", "log_dir": str(tmp_path), "backends": ["tensorboard", "jsonl"]}
    }
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        f"logging:\n  experiment_name: e\n  log_dir: {tmp_path}\n  tensorboard:\n    enabled: true\n"
        "  jsonl:\n    enabled: true\n"
    )
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps(config))
    env = {
        "HJEPA_METRICS_BACKENDS": "tensorboard,jsonl",
        "HJEPA_METRICS_LOG_DIR": str(tmp_path),
        "HJEPA_METRICS_EXPERIMENT_NAME": "e",
        "PATH": "/bin",
    }
    built = []
    for source in (config, yaml_file, json_file, config_from_env(env)):
        w = build_writers(source)
        built.append(_describe(w))
        w.close()
    assert built[0] == [
        ("tensorboard", str(tmp_path / "tensorboard" / "e")),
        ("jsonl", str(tmp_path / "metrics.jsonl")),
    ]
    assert all(b == built[0] for b in built)


def test_environment_sections_and_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "base.yaml"
    f.write_text("wandb:\n  project: from-file\n")
    cfg = config_from_env(
        {
            "HJEPA_METRICS_CONFIG": str(f),
            "HJEPA_METRICS_WANDB_MODE": "offline",
            "HJEPA_METRICS_MLFLOW_TRACKING_URI": "http://127.0.0.1:1",
        }
    )
    assert cfg == {
        "wandb": {"project": "from-file", "mode": "offline"},
        "mlflow": {"tracking_uri": "http://127.0.0.1:1"},
    }
    monkeypatch.setenv("HJEPA_METRICS_BACKENDS", "jsonl")
    monkeypatch.setenv("HJEPA_METRICS_LOG_DIR", str(tmp_path / "env"))
    w = build_writers()
    assert isinstance(w, BackgroundWriter) and isinstance(w.inner, JSONLWriter)
    assert w.inner.path == tmp_path / "env" / "metrics.jsonl"
    w.close()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"backends": ["tensorbored"]},
            r"unknown backends \['tensorbored'\]; expected some of \['jsonl', 'mlflow'",
        ),
        (
            {"tensorboard": {"enabled": True, "logdir": "x"}},
            r"config\['tensorboard'\]: unknown keys \['logdir'\]",
        ),
        ({"experiment": "x"}, r"config: unknown keys \['experiment'\]"),
        ({"logging": 3}, r"config\['logging'\]: got int"),
    ],
)
def test_bad_configs_are_clear_errors(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_writers(config)


def test_unknown_environment_variable_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown variable HJEPA_METRICS_BACKEND;"):
        config_from_env({"HJEPA_METRICS_BACKEND": "jsonl"})


def test_bad_file_type_and_yaml_safe_load(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text("x = 1")
    with pytest.raises(ValueError, match=r"expected a \.yaml, \.yml or \.json file"):
        load_config(bad)
    unsafe = tmp_path / "u.yaml"
    unsafe.write_text("x: !!python/object/apply:os.system ['echo pwned']\n")
    import yaml

    with pytest.raises(yaml.YAMLError):
        load_config(unsafe)


def test_missing_extra_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.entities", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(ImportError, match=r'pip install "hjepa-metrics\[mlflow\]"'):
        build_writers({"log_dir": str(tmp_path), "backends": ["mlflow"]})


def test_entry_point_writers_are_selectable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import writers.backends as config_module

    class EP:
        name = "memory"

        def load(self) -> Any:
            return lambda section, common: JSONLWriter(Path(common["log_dir"]) / f"{section['file']}.jsonl")

    def fake_entry_points(group: str) -> list[EP]:
        assert group == "hjepa_metrics.writers"
        return [EP()]

    monkeypatch.setattr(config_module, "entry_points", fake_entry_points)
    w = build_writers({"log_dir": str(tmp_path), "backends": ["memory"], "memory": {"file": "plugin"}})
    assert isinstance(w, BackgroundWriter) and isinstance(w.inner, JSONLWriter)
    assert w.inner.path == tmp_path / "plugin.jsonl"
    w.close()


def test_all_backends_disabled_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    writer = build_writers({"tensorboard": {"enabled": False}})
    assert isinstance(writer, MultiWriter) and writer.writers == []
    assert "every backend is disabled" in caplog.text
    writer.close()
