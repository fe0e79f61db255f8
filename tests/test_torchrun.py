"""``torchrun`` with 2 and 4 CPU processes on gloo and all four backends: one run per backend, values of the
global batch equal to one process on the concatenated data, and a clean exit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from writers import read_jsonl

pytest.importorskip("wandb")
pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import torchrun_job as job  # noqa: E402


@pytest.mark.parametrize("processes", [2, 4])
def test_torchrun_writes_one_run_per_backend_with_global_values(tmp_path: Path, processes: int) -> None:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            str(HERE / "torchrun_job.py"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert time.monotonic() - start < 240  # and no hang at exit

    # one of each: no rank but 0 opened anything
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["metrics.jsonl"]
    assert [p.name for p in (tmp_path / "tensorboard").iterdir()] == ["hjepa"]  # one run, named
    assert len(list((tmp_path / "tensorboard" / "hjepa").glob("events.out.tfevents.*"))) == 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "hjepa"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1

    want = job.single_process_values()
    records = [r for r in read_jsonl(tmp_path) if "metrics" in r]
    for step, values in want.items():
        logged = {k: v for r in records if r["step"] == step for k, v in r["metrics"].items()}
        for tag, value in values.items():
            if tag.endswith("max_similarity"):
                continue  # a sample merged from the ranks, not the same draw
            assert logged[tag] == pytest.approx(value, rel=2e-5, abs=1e-7), (step, tag)
        history = client.get_metric_history(run.info.run_id, "train/loss/total")
        assert [m.step for m in history] == list(range(job.STEPS))
