"""Injected faults: full disk, locked database, a backend failing to start, SIGKILL; and secrets/paths."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from writers import BackgroundWriter, JSONLWriter, MultiWriter, build_writers, read_jsonl


def test_full_disk_keeps_every_record_until_space_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    inner = JSONLWriter(tmp_path / "a" / "m.jsonl", buffer_bytes=256)
    real_write = os.write
    full = threading.Event()
    full.set()

    def write(fd: int, data: Any) -> int:
        if full.is_set() and fd == inner._file._fd:  # only this writer's disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    disk = BackgroundWriter(inner)
    other = JSONLWriter(tmp_path / "b.jsonl")
    other.name = "other"
    multi = MultiWriter([disk, other])
    for step in range(50):
        multi.log_scalars({"loss": float(step)}, step)
    multi.flush()
    assert multi.errors["jsonl"] >= 1 and "other" not in multi.errors
    assert caplog.text.count("jsonl: writing failed") == 1  # the outage is reported once
    assert [r["step"] for r in read_jsonl(tmp_path / "b.jsonl")] == list(range(50))
    full.clear()  # space is back: the buffered records are written, none lost
    multi.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "a" / "m.jsonl")] == list(range(50))
    assert caplog.text.count("jsonl: recovered after") == 1  # and so is its end
    assert "nothing was lost" in caplog.text


def test_locked_sqlite_database_loses_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from writers.mlflow import MLflowWriter

    inner = MLflowWriter(logdir=tmp_path, buffer_size=10)
    writer = BackgroundWriter(inner, timeout=1.0)
    db = sqlite3.connect(tmp_path / "mlflow.db", timeout=0.1)
    db.execute("BEGIN EXCLUSIVE")  # another process holds the database
    start = time.perf_counter()
    for step in range(30):
        writer.log_scalars({"train/loss": float(step)}, step)
    writer.flush()  # gives up waiting after timeout instead of blocking training
    assert time.perf_counter() - start < 10
    assert "made no progress" in caplog.text or writer.errors >= 1
    db.rollback()  # the lock is released
    db.close()
    writer.timeout = 120.0
    writer.close()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    history = client.get_metric_history(inner.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(30))  # retried, none lost
    assert client.get_run(inner.run_id).info.status == "FINISHED"


def test_a_backend_failing_to_start_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("wandb")
    import wandb

    def broken_init(**kwargs: Any) -> Any:
        raise RuntimeError("wandb-core failed to start")

    monkeypatch.setattr(wandb, "init", broken_init)  # in this process: no writer process for W&B
    config = {
        "log_dir": str(tmp_path),
        "backends": ["jsonl", "wandb"],
        "wandb": {"mode": "offline", "process": False},
    }
    writer = build_writers(config)
    assert "writer 'wandb' failed to start" in caplog.text and "wandb-core failed to start" in caplog.text
    writer.log_scalars({"a": 1.0}, 1)
    writer.close()
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["metrics"] == {"a": 1.0}
    assert isinstance(writer, MultiWriter) and writer.errors == {"wandb": 1}
    with pytest.raises(RuntimeError, match="wandb-core failed to start"):
        build_writers({**config, "strict": True})


def test_sigkill_leaves_whole_lines_and_every_flushed_record(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from writers import JSONLWriter
        w = JSONLWriter({str(tmp_path / "m.jsonl")!r}, buffer_bytes=4096)
        step = 0
        while True:
            w.log_scalars({{"train/loss": 1.0 / (step + 1), "train/x": float("nan")}}, step)
            if step % 25 == 24:
                w.flush()
                print(step, flush=True)
            step += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    flushed = -1
    try:
        assert proc.stdout is not None
        while flushed < 2000:
            flushed = int(proc.stdout.readline())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    raw = (tmp_path / "m.jsonl").read_bytes()
    lines = raw.split(b"\n")
    assert lines[-1] == b""  # ends on a whole line
    steps = [json.loads(line)["step"] for line in lines[:-1]]  # every line is strict JSON
    assert steps == list(range(len(steps))) and len(steps) > flushed


def test_tags_cannot_write_outside_the_log_dir(tmp_path: Path) -> None:
    import numpy as np

    pytest.importorskip("mlflow")
    from writers.mlflow import MLflowWriter

    image = np.zeros((2, 2, 3), dtype=np.uint8)
    bad_tags = ["../../../escape", "/etc/passwd", "a/../../b", "..", "con:nul*?<>|", "\x00evil", "~/x"]
    with JSONLWriter(tmp_path / "run") as jsonl, MLflowWriter(logdir=tmp_path / "ml") as ml:
        for i, tag in enumerate(bad_tags):
            jsonl.log_image(tag, image, i)
            ml.log_image(tag, image, i)
            ml.log_histogram(tag, [1.0, 2.0], i)
    inside = {p.resolve() for p in tmp_path.rglob("*") if p.is_file()}
    assert all(p.is_relative_to(tmp_path.resolve()) for p in inside)
    pngs = list((tmp_path / "run").rglob("*.png"))
    assert len(pngs) == len(bad_tags)
    assert not (Path("/etc/passwd.png")).exists() and not (tmp_path.parent / "escape").exists()


def test_secrets_never_reach_a_backend_or_a_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    secret = "sk-THIS-IS-A-SECRET-123"
    config = {
        "model": {"dim": 64},
        "wandb": {"api_key": secret},
        "hf_token": secret,
        "db": {"password": secret, "host": "localhost"},
        "aws_secret_access_key": secret,
    }
    writer = build_writers(
        {
            "log_dir": str(tmp_path),
            "backends": ["jsonl", "tensorboard", "mlflow", "wandb"],
            "wandb": {"mode": "offline", "project": "p"},
        }
    )
    writer.log_config(config)
    writer.log_scalars({"a": 1.0}, 1)
    writer.close()
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == []
    assert secret not in caplog.text
    records = read_jsonl(tmp_path / "metrics.jsonl")
    cfg = next(r for r in records if r.get("kind") == "config")["config"]
    assert cfg["model"] == {"dim": 64} and cfg["db"]["host"] == "localhost"
    assert cfg["hf_token"] == "***REDACTED***"


def test_exception_in_the_training_loop_marks_runs_failed(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    import wandb_reader
    from mlflow.tracking import MlflowClient

    script = textwrap.dedent(
        f"""
        from hjepa_metrics import HJEPAMetricsLogger
        logger = HJEPAMetricsLogger(config={{"log_dir": {str(tmp_path)!r},
            "backends": ["jsonl", "mlflow", "wandb"], "wandb": {{"mode": "offline", "project": "p"}}}})
        logger.log_scalars({{"loss/total": 1.0}}, global_step=1)
        raise RuntimeError("NaN loss, giving up")
        """
    )
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "WANDB_SILENT": "true"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1 and "NaN loss, giving up" in out.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "FAILED"
    assert client.get_metric_history(run_id, "train/loss/total")[0].value == 1.0
    assert wandb_reader.exit_codes(tmp_path) == [1]
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["metrics"] == {"train/loss/total": 1.0}


@pytest.mark.parametrize(
    ("exit_call", "code", "status"), [("sys.exit(0)", 0, "FINISHED"), ("sys.exit(3)", 3, "FAILED")]
)
def test_sys_exit_inside_with_sets_the_run_status_by_exit_code(
    tmp_path: Path, exit_call: str, code: int, status: str
) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    import wandb_reader
    from mlflow.tracking import MlflowClient

    script = textwrap.dedent(
        f"""
        import sys
        from hjepa_metrics import HJEPAMetricsLogger
        with HJEPAMetricsLogger(config={{"log_dir": {str(tmp_path)!r},
                "backends": ["mlflow", "wandb"], "wandb": {{"mode": "offline", "project": "p"}}}}) as logger:
            logger.log_scalars({{"loss/total": 1.0}}, global_step=1)
            {exit_call}
        """
    )
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "WANDB_SILENT": "true"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == code, out.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == status
    assert wandb_reader.exit_codes(tmp_path) == [0 if status == "FINISHED" else 1]


def test_no_network_beyond_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from hjepa_metrics.examples import train_hjepa

    seen: list[Any] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        seen.append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    train_hjepa.main(
        [
            "--steps",
            "3",
            "--log-dir",
            str(tmp_path),
            "--backends",
            "jsonl,tensorboard,mlflow,wandb",
            "--no-progress",
        ]
    )
    external = [a for a in seen if isinstance(a, tuple) and a[0] not in ("127.0.0.1", "localhost", "::1")]
    assert external == []
