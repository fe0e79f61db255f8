"""Resume: a restarted job appends to the same runs without duplicating or reordering steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import wandb_reader

from writers import MultiWriter, build_writers, read_jsonl

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


def test_resume_appends_without_duplicates_in_every_backend(tmp_path: Path) -> None:
    first = _run(tmp_path, range(10), resume=False, crash=True)  # killed after step 9
    mlflow_id = first["mlflow"].inner.run_id  # type: ignore[attr-defined]
    wandb_id = first["wandb"].inner.run_id  # type: ignore[attr-defined]
    second = _run(tmp_path, range(6, 15), resume=True, crash=False)  # restarted from a checkpoint at 6
    assert second["mlflow"].inner.run_id == mlflow_id  # type: ignore[attr-defined]
    assert second["wandb"].inner.run_id == wandb_id  # type: ignore[attr-defined]
    expected = list(range(15))
    # the first run's values are kept for the replayed steps 6..9
    run_of = {s: (1.0 if s < 10 else 2.0) for s in expected}

    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "metrics" in r]
    assert [r["step"] for r in records] == expected
    assert [r["metrics"]["train/run"] for r in records] == [run_of[s] for s in expected]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
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
    first = _run(tmp_path, range(3), resume=False, crash=False)
    second = _run(tmp_path, range(3), resume=False, crash=False)
    assert second["mlflow"].inner.run_id != first["mlflow"].inner.run_id  # type: ignore[attr-defined]
    assert second["wandb"].inner.run_id != first["wandb"].inner.run_id  # type: ignore[attr-defined]
