"""Transient faults on real backends: a full disk (tmpfs), a removed log dir, an MLflow server that dies and
comes back, a server that never answers, a closed port. Records after recovery arrive; the failure and
the recovery are each reported once; nothing blocks training beyond the configured bound."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import free_port

from writers import build_writers, read_jsonl

ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, so the disk can really fill up; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 16, 1 << 10, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
        with pytest.raises(OSError) as full:
            os.write(fd, b"\0")
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def _steps(backend: str, log_dir: Path) -> list[int]:
    if backend == "jsonl":
        return [r["step"] for r in read_jsonl(log_dir / "metrics.jsonl") if "metrics" in r]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir / "tensorboard" / "hjepa"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars("train/loss")]


@pytest.mark.parametrize("backend", ["jsonl", "tensorboard"])
def test_a_full_disk_loses_nothing_once_space_returns(
    small_disk: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    if backend == "tensorboard":
        pytest.importorskip("tensorboard")
    writer = build_writers({"log_dir": str(small_disk), "backends": [backend], "flush_interval": 0.5})
    writer.log_scalars({"train/loss": 0.0}, 0)
    writer.flush()
    filler = _fill(small_disk)
    payload = {f"train/extra_{i}": float(i) for i in range(20)}
    for step in range(1, 1100):  # about 1 MiB of records, none of which fits on the disk
        writer.log_scalars({"train/loss": 1.0 / step, **payload}, step)
        if step % 100 == 0:
            writer.flush()  # returns: the failure is reported, the records kept
    assert writer.error_counts().get(backend, 0) >= 1
    assert caplog.text.count(f"{backend}: writing failed") == 1  # reported once, not per record
    filler.unlink()  # space is back
    for step in range(1100, 1200):
        writer.log_scalars({"train/loss": 1.0 / step}, step)
    writer.close()
    assert _steps(backend, small_disk) == list(range(1200))
    assert caplog.text.count(f"{backend}: recovered after") == 1
    assert "nothing was lost" in caplog.text


@pytest.mark.parametrize("backend", ["jsonl", "tensorboard"])
def test_a_removed_log_dir_is_recreated(
    tmp_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    if backend == "tensorboard":
        pytest.importorskip("tensorboard")
    writer = build_writers({"log_dir": str(tmp_path / "run"), "backends": [backend], "flush_interval": 0.5})
    for step in range(10):
        writer.log_scalars({"train/loss": float(step)}, step)
    writer.flush()
    shutil.rmtree(tmp_path / "run")  # a cleanup job, a user, a quota script
    for step in range(10, 20):
        writer.log_scalars({"train/loss": float(step)}, step)
    writer.close()
    assert _steps(backend, tmp_path / "run") == list(range(10, 20))
    assert caplog.text.count("was removed; writing to a new file") == 1


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1, started and stopped (by process group) by the test."""

    def __init__(self, db: Path, port: int) -> None:
        self.db, self.port = db, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.db}",
                "--default-artifact-root",
                str(self.db.parent / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped with everything it forked
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/health", timeout=1) as reply,
            ):
                if reply.status == 200:
                    return
            assert self.proc.poll() is None, "mlflow server exited"
            time.sleep(0.3)
        raise AssertionError("mlflow server did not come up in 90 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    pytest.importorskip("mlflow.server", reason="the full mlflow package (its server) is not installed")
    server = MlflowServer(tmp_path / "server.db", free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_an_mlflow_server_that_dies_and_returns_gets_every_record(
    tmp_path: Path, mlflow_server: MlflowServer, capfd: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    config = {
        "log_dir": str(tmp_path / "run"),
        "backends": ["mlflow"],
        "mlflow": {"tracking_uri": mlflow_server.url},
        "flush_interval": 0.5,
        "timeout": 5,
    }
    writer = build_writers(config)
    for step in range(50):
        writer.log_scalars({"train/loss": float(step)}, step)
    writer.flush()
    run_id_file = tmp_path / "run" / "mlflow_run_id"
    deadline = time.monotonic() + 120  # a loaded machine (parallel tests) may start it after `timeout`
    while not run_id_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    writer.flush()
    mlflow_server.stop()  # the server dies mid-run
    start = time.monotonic()
    for step in range(50, 100):
        writer.log_scalars({"train/loss": float(step)}, step)
    writer.flush()
    assert time.monotonic() - start < 15  # bounded: the outage costs training nothing
    mlflow_server.start()  # and comes back on the same port and database
    for step in range(100, 150):
        writer.log_scalars({"train/loss": float(step)}, step)
    writer.flush()
    writer.close()
    client = MlflowClient(tracking_uri=mlflow_server.url)
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text(encoding="utf-8").strip()
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(150))
    assert client.get_run(run_id).info.status == "FINISHED"
    err = capfd.readouterr().err  # the writer process logs to this process's stderr
    assert err.count("mlflow: log_batch failed") == 1 and err.count("mlflow: recovered after") == 1


@contextlib.contextmanager
def _silent_server() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a hung server)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


@pytest.mark.parametrize("server", ["hung", "closed port"])
def test_an_unreachable_mlflow_server_never_blocks_training(
    tmp_path: Path, server: str, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("mlflow")
    with _silent_server() as hung_url:
        url = hung_url if server == "hung" else "http://127.0.0.1:1"
        config = {
            "log_dir": str(tmp_path),
            "backends": ["jsonl", "mlflow"],
            "mlflow": {"tracking_uri": url},
            "timeout": 3,
        }
        start = time.monotonic()
        writer = build_writers(config)
        built = time.monotonic() - start
        for step in range(100):
            writer.log_scalars({"train/loss": float(step)}, step)
        logged = time.monotonic() - start - built
        writer.flush()
        flushed = time.monotonic() - start - built - logged
        writer.close()
        closed = time.monotonic() - start - built - logged - flushed
    assert built < 8 and logged < 2 and flushed < 8 and closed < 8, (built, logged, flushed, closed)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(100))
    assert writer.error_counts().get("mlflow", 0) >= 1  # counted, not silent
    # and reported, once: as a failure, or (on a loaded machine) as a start that never finished
    assert caplog.text.count("failed to start") + caplog.text.count("never started") == 1, caplog.text


def test_wandb_with_a_key_but_no_network_never_blocks_training(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    with _silent_server() as url:
        env = {**os.environ, "WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": url}
        script = (
            "import time\n"
            "from writers import build_writers\n"
            "t = time.monotonic()\n"
            f"w = build_writers({{'log_dir': {str(tmp_path)!r}, 'backends': ['jsonl', 'wandb'], "
            "'wandb': {'project': 'p'}, 'timeout': 3})\n"
            "for s in range(50): w.log_scalars({'a': float(s)}, s)\n"
            "w.flush(); w.close()\n"
            "print(round(time.monotonic() - t, 1))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
        )
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 15  # W&B alone would wait 90 s in wandb.init
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(50))
