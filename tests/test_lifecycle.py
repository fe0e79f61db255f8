"""The job dies, or never closes its logger: what was logged is on every backend, and runs say how it ended.

Each test runs a real training-like child process with all four backends, kills it for real (SIGKILL,
SIGTERM) or lets it exit without closing, and reads every backend back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from writers import read_jsonl

pytest.importorskip("wandb")
pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

STEPS = 150
ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "WANDB_SILENT": "true", "WANDB_MODE": "offline"}


def _config(log_dir: Path, backends: list[str], **extra: object) -> dict[str, object]:
    return {
        "log_dir": str(log_dir),
        "backends": backends,
        "wandb": {"mode": "offline", "project": "p", **extra.pop("wandb", {})},  # type: ignore[dict-item]
        "flush_interval": 1.0,
        **extra,
    }


def _readback(log_dir: Path, tag: str = "train/loss") -> dict[str, object]:
    """Steps of ``tag`` per backend found in ``log_dir``, with the MLflow run status and W&B exit codes."""
    import wandb_reader
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    got: dict[str, object] = {
        "jsonl": [r["step"] for r in read_jsonl(log_dir / "metrics.jsonl") if tag in r.get("metrics", {})]
    }
    if (log_dir / "tensorboard").exists():
        acc = EventAccumulator(str(log_dir / "tensorboard" / "hjepa"), size_guidance={"scalars": 0})
        acc.Reload()
        got["tensorboard"] = [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []
    if (log_dir / "mlflow_run_id").exists():
        client = MlflowClient(tracking_uri=f"sqlite:///{log_dir.resolve() / 'mlflow.db'}")
        run_id = (log_dir / "mlflow_run_id").read_text(encoding="utf-8").strip()
        got["mlflow"] = sorted(m.step for m in client.get_metric_history(run_id, tag))
        got["mlflow_status"] = client.get_run(run_id).info.status
    if (log_dir / "wandb_run_id").exists():
        got["wandb"] = [r["global_step"] for r in wandb_reader.history(log_dir) if tag in r]
        got["wandb_exit"] = wandb_reader.exit_codes(log_dir)
    return got


def _wait_for_run_end(log_dir: Path, timeout: float = 60.0) -> None:
    """The writer processes finish on their own after the training process died: wait for them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{log_dir.resolve() / 'mlflow.db'}")
    run_id = (log_dir / "mlflow_run_id").read_text(encoding="utf-8").strip()
    deadline = time.monotonic() + timeout
    while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2.0)  # W&B's exit record follows the MLflow status in the writer process


def _training_script(config: dict[str, object], before: str = "") -> str:
    return textwrap.dedent(
        f"""
        import sys, time
        {before}
        from writers import build_writers
        writer = build_writers({config!r})
        writer.log_scalars({{"train/loss": 0.0}}, 0)
        writer.flush()  # every backend is up
        for step in range(1, {STEPS}):
            writer.log_scalars({{"train/loss": 1.0 / step}}, step)
        print("logged", flush=True)
        time.sleep(600)  # a quiet spell: data loading, evaluation, a hang
        """
    )


@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGKILL, False), (signal.SIGTERM, False), (signal.SIGKILL, True)],
    ids=["SIGKILL", "SIGTERM", "SIGKILL-to-the-process-group"],
)
def test_a_killed_job_loses_nothing_older_than_the_flush_interval(
    tmp_path: Path, sig: int, group: bool
) -> None:
    """Killed alone, or with its whole process group (``kill -9 -PGID``, as a shell or a batch
    scheduler does): the writer processes are in a group of their own, so they still close the runs."""
    config = _config(tmp_path, ["jsonl", "tensorboard", "mlflow", "wandb"])
    proc = subprocess.Popen(
        [sys.executable, "-c", _training_script(config)],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=group,  # the job leads its process group, as a shell's job does
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "logged"
        time.sleep(3.0)  # longer than flush_interval (1 s): everything must be on disk now
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert code == -sig  # the process ended as the signal's default action would end it
    _wait_for_run_end(tmp_path)
    got = _readback(tmp_path)
    for backend in ("jsonl", "tensorboard", "mlflow", "wandb"):
        assert got[backend] == list(range(STEPS)), backend
    assert got["mlflow_status"] == "KILLED"
    assert got["wandb_exit"] == [128 + signal.SIGTERM]  # "killed", the status a shell reports


def test_sigterm_chains_the_handler_installed_before(tmp_path: Path) -> None:
    marker = tmp_path / "handled"
    before = textwrap.dedent(
        f"""
        import signal
        def checkpoint_and_exit(signum, frame):
            open({str(marker)!r}, "w").write("checkpointed")
            sys.exit(7)
        signal.signal(signal.SIGTERM, checkpoint_and_exit)
        """
    ).replace("\n", "\n        ")
    config = _config(tmp_path, ["jsonl", "tensorboard", "mlflow", "wandb"])
    proc = subprocess.Popen(
        [sys.executable, "-c", _training_script(config, before)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "logged"
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert code == 7 and marker.read_text() == "checkpointed"  # the user's handler decided the exit
    _wait_for_run_end(tmp_path)
    got = _readback(tmp_path)
    for backend in ("jsonl", "tensorboard", "mlflow", "wandb"):
        assert got[backend] == list(range(STEPS)), backend
    assert got["mlflow_status"] == "KILLED"


@pytest.mark.parametrize(
    ("backends", "process"),
    [
        (["jsonl", "wandb", "mlflow", "tensorboard"], True),
        (["tensorboard", "mlflow", "jsonl", "wandb"], False),  # W&B in this process, built last
        (["wandb", "tensorboard", "jsonl", "mlflow"], False),
    ],
)
def test_a_logger_never_closed_loses_nothing_at_exit(
    tmp_path: Path, backends: list[str], process: bool
) -> None:
    config = _config(
        tmp_path, backends, wandb={"process": process}, mlflow={"process": process}, background=not process
    )
    script = textwrap.dedent(
        f"""
        from hjepa_metrics import HJEPAMetricsLogger
        logger = HJEPAMetricsLogger(config={config!r})
        for step in range(100):
            logger.log_scalars({{"loss/total": 1.0 / (step + 1)}}, global_step=step)
        # no close(), no flush(): the interpreter exits normally
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    got = _readback(tmp_path, "train/loss/total")
    for backend in backends:
        assert got[backend] == list(range(100)), (backend, out.stderr[-2000:])
    assert got["mlflow_status"] == "FINISHED"
    assert got["wandb_exit"] == [0]


def test_a_forked_child_never_touches_the_parents_runs(tmp_path: Path) -> None:
    # background: false, MLflow in this process: the buffers and the run live in the forked memory
    config = _config(tmp_path, ["jsonl", "mlflow"], background=False, mlflow={"process": False})
    script = textwrap.dedent(
        f"""
        import os, sys
        import torch
        from torch.utils.data import DataLoader, Dataset
        from hjepa_metrics import HJEPAMetricsLogger

        logger = HJEPAMetricsLogger(config={config!r})
        for step in range(10):
            logger.log_scalars({{"loss/total": float(step)}}, global_step=step)  # buffered, not flushed

        class Logs(Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                try:
                    logger.log_scalars({{"loss/total": -1.0}}, global_step=999)
                except RuntimeError as exc:
                    return str(exc)
                return "logged from a worker"

        messages = [m for batch in DataLoader(Logs(), num_workers=2, batch_size=1) for m in batch]
        pid = os.fork()
        if pid == 0:  # a forked child that exits normally: atexit hooks run here
            sys.exit(0)
        os.waitpid(pid, 0)
        print("status after the children:", logger.writer["mlflow"].client.get_run(
            logger.writer["mlflow"].run_id).info.status)
        for step in range(10, 20):
            logger.log_scalars({{"loss/total": float(step)}}, global_step=step)
        logger.close()
        print("\\n".join(messages))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "status after the children: RUNNING" in out.stdout  # no child closed the parent's run
    messages = out.stdout.strip().splitlines()[1:]
    assert len(messages) == 4 and all("a fork of" in m and "DataLoader worker" in m for m in messages), (
        messages
    )
    got = _readback(tmp_path, "train/loss/total")
    assert got["jsonl"] == list(range(20))  # each line once: no child flushed the parent's buffer
    assert got["mlflow"] == list(range(20)) and got["mlflow_status"] == "FINISHED"


def _process_state() -> tuple[int, int]:
    import threading

    return len(os.listdir("/proc/self/fd")), threading.active_count()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_a_sweep_of_100_loggers_leaks_no_descriptor_thread_or_memory(tmp_path: Path) -> None:
    import functools
    import gc

    from hjepa_metrics import HJEPAMetricsLogger
    from writers import JSONLWriter, MultiWriter, build_writers
    from writers.process import ProcessWriter

    seen: dict[int, tuple[int, int, float]] = {}
    for i in range(100):
        base = build_writers({"log_dir": str(tmp_path / str(i)), "backends": ["jsonl", "tensorboard"]})
        assert isinstance(base, MultiWriter)
        writers = list(base.writers)
        if i % 10 == 0:  # a writer process too (the machinery MLflow and W&B run in)
            child = functools.partial(JSONLWriter, tmp_path / str(i) / "child.jsonl")
            writers.append(ProcessWriter(child, name="child"))
        with HJEPAMetricsLogger(writers) as logger:
            for step in range(5):
                logger.log_scalars({"loss/total": 1.0 / (step + 1)}, global_step=step)
        gc.collect()
        if i in (21, 99):
            seen[i] = (*_process_state(), _rss_mb())
    (fds_20, threads_20, rss_20), (fds_99, threads_99, rss_99) = seen[21], seen[99]
    assert fds_99 == fds_20 and threads_99 == threads_20
    assert rss_99 - rss_20 < 20, f"resident memory grew {rss_99 - rss_20:.1f} MB over 80 loggers"
    assert (
        len(read_jsonl(tmp_path / "90" / "child.jsonl")) == 5 + 2
    )  # layout, alert settings, then the scalars


def test_mlflow_in_this_process_releases_its_store_at_close(tmp_path: Path) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from writers.mlflow import MLflowWriter

    state = []
    for i in range(4):
        with MLflowWriter(logdir=tmp_path / str(i)) as writer:
            writer.log_scalars({"a": 1.0}, 1)
        state.append((*_process_state(), len(getattr(SqlAlchemyStore, "_engine_map", {}))))
    assert state[-1] == state[1], state  # no descriptor, thread or cached engine left per closed run


def test_a_forked_child_cannot_log_to_its_parents_writers(tmp_path: Path) -> None:
    """The parent's writers refuse to log in a fork (their files belong to the parent), checked once at
    the fork; a writer the child opens itself works, and the parent's go on."""
    from writers import BackgroundWriter, JSONLWriter

    background = BackgroundWriter(JSONLWriter(tmp_path / "bg"))
    direct = JSONLWriter(tmp_path / "direct.jsonl")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        said = []
        try:
            for writer in (background, background.inner, direct):
                try:
                    writer.log_scalars({"a": 1.0}, 1)  # type: ignore[union-attr]
                    said.append("logged")
                except RuntimeError as exc:
                    said.append("refused" if "a fork of" in str(exc) else str(exc))
            with JSONLWriter(tmp_path / "child.jsonl") as own:
                own.log_scalars({"a": 2.0}, 1)
            said.append("own")
        finally:
            os.write(write_end, ",".join(said).encode())
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        assert pipe.read() == "refused,refused,refused,own"
    background.log_scalars({"a": 3.0}, 2)
    background.close()
    direct.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "bg")] == [2]
    assert [r["metrics"]["a"] for r in read_jsonl(tmp_path / "child.jsonl")] == [2.0]
    assert read_jsonl(tmp_path / "direct.jsonl") == []
