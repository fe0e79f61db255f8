"""Resume: a restarted job appends to the same runs without duplicating or reordering steps."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import wandb_reader

from writers import JSONLWriter, MultiWriter, build_writers, read_jsonl

pytest.importorskip("wandb")
pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def _config(tmp_path: Path, resume: bool) -> dict[str, Any]:
    return {
        "log_dir": str(tmp_path),
        "backends": ["jsonl", "tensorboard", "mlflow", "wandb"],
        "wandb": {"mode": "offline", "project": "p"},
        "resume": resume,
    }


def _run(tmp_path: Path, steps: range, resume: bool, crash: bool) -> MultiWriter:
    writer = build_writers(_config(tmp_path, resume))
    assert isinstance(writer, MultiWriter)
    for step in steps:
        writer.log_scalars({"train/loss": float(step), "train/run": 2.0 if resume else 1.0}, step)
    writer.close(failed=crash)
    return writer


def _run_ids(log_dir: Path) -> tuple[str, str]:
    """The MLflow and W&B run ids the writers keep in the log dir (what resume reopens)."""
    return (
        (log_dir / "mlflow_run_id").read_text(encoding="utf-8").strip(),
        (log_dir / "wandb_run_id").read_text(encoding="utf-8").strip(),
    )


def test_resume_appends_without_duplicates_in_every_backend(tmp_path: Path) -> None:
    _run(tmp_path, range(10), resume=False, crash=True)  # killed after step 9
    mlflow_id, wandb_id = _run_ids(tmp_path)
    _run(tmp_path, range(6, 15), resume=True, crash=False)  # restarted from a checkpoint at 6
    assert _run_ids(tmp_path) == (mlflow_id, wandb_id)
    expected = list(range(15))
    # the first run's values are kept for the replayed steps 6..9
    run_of = {s: (1.0 if s < 10 else 2.0) for s in expected}

    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "metrics" in r]
    assert [r["step"] for r in records] == expected
    assert [r["metrics"]["train/run"] for r in records] == [run_of[s] for s in expected]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard" / "hjepa"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == expected

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    history = client.get_metric_history(mlflow_id, "train/loss")
    assert sorted(m.step for m in history) == expected
    assert client.get_run(mlflow_id).info.status == "FINISHED"

    rows = [r for r in wandb_reader.history(tmp_path) if "train/loss" in r]
    assert [r["global_step"] for r in rows] == expected
    assert wandb_reader.exit_codes(tmp_path) == [1, 0]


def test_without_resume_a_new_mlflow_and_wandb_run_starts(tmp_path: Path) -> None:
    _run(tmp_path, range(3), resume=False, crash=False)
    first = _run_ids(tmp_path)
    _run(tmp_path, range(3), resume=False, crash=False)
    second = _run_ids(tmp_path)
    assert second[0] != first[0] and second[1] != first[1]


def _peak_python_bytes(make: Callable[[], Any]) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        made = make()
        return made, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_resume_reads_only_the_tail_of_a_long_run(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from writers.tensorboard import TensorBoardWriter

    steps = 200_000
    tags = [f"train/metric_{i:02d}" for i in range(12)]
    path = tmp_path / "long.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for step in range(steps):
            metrics = ", ".join(f'"{t}": {step * 0.001 + i}' for i, t in enumerate(tags))
            f.write(f'{{"step": {step}, "wall_time": 1700000000.0, "metrics": {{{metrics}}}}}\n')
        f.write('{"kind": "histogram", "step": 199999, "tag": "h"}\n')  # not a scalar record
    assert path.stat().st_size > 50_000_000
    writer, peak = _peak_python_bytes(lambda: JSONLWriter(path, resume=True))
    assert writer.gate.last_step == steps - 1
    assert peak < 8_000_000, f"resume held {peak} bytes for a {path.stat().st_size}-byte file"
    writer.close()

    tb_dir = tmp_path / "tb"
    tb = TensorBoardWriter(tb_dir)
    for step in range(steps):
        tb.log_scalars({tags[0]: float(step)}, step)
    tb.close()
    assert sum(p.stat().st_size for p in tb_dir.iterdir()) > 10_000_000
    resumed, peak = _peak_python_bytes(lambda: TensorBoardWriter(tb_dir, resume=True))
    assert resumed.gate.last_step == steps - 1
    assert peak < 8_000_000, f"TensorBoard resume held {peak} bytes"
    resumed.close()


def test_tensorboard_tail_survives_a_torn_and_a_damaged_record(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from writers.tensorboard import TensorBoardWriter, last_step

    with TensorBoardWriter(tmp_path) as tb:
        for step in range(50):
            tb.log_scalars({"a": float(step)}, step)
    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    data = bytearray(event_file.read_bytes())
    event_file.write_bytes(bytes(data) + b"\x17\x00\x00")  # a torn record at the end
    assert last_step(tmp_path) == 49
    data[len(data) // 2] ^= 0xFF  # one damaged record in the middle
    event_file.write_bytes(bytes(data))
    assert last_step(tmp_path) == 49
