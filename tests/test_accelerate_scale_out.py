"""``accelerate launch --multi_gpu --num_processes 2`` on CPU with the tracker built before the Accelerator:
Accelerate's state is not fixed with defaults, one run per backend, values of the global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

from writers import read_jsonl

pytest.importorskip("accelerate")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import torchrun_job as job  # noqa: E402


def test_accelerate_launch_two_processes(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    done = subprocess.run(
        [*launch, "--main_process_port", str(free_port()), str(HERE / "accelerate_job.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    # each process saw the real world size: building the tracker first did not fix Accelerate's state
    assert [(tmp_path / f"world.rank{r}.txt").read_text() for r in range(2)] == ["2", "2"]
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["metrics.jsonl"]
    assert len(list((tmp_path / "tensorboard" / "hjepa").glob("events.out.tfevents.*"))) == 1
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "hjepa"]
    (run,) = client.search_runs([experiment.experiment_id])
    params = {
        k: v for k, v in run.data.params.items() if not k.startswith("hjepa_metrics.")
    }  # alert settings
    assert params == {"lr": "0.05"}

    records = [r for r in read_jsonl(tmp_path) if "metrics" in r]
    for step, values in job.single_process_values().items():
        logged = {k: v for r in records if r["step"] == step for k, v in r["metrics"].items()}
        assert logged["train/custom/note"] == float(step)
        for tag, value in values.items():
            if not tag.endswith("max_similarity"):
                assert logged[tag] == pytest.approx(value, rel=2e-5, abs=1e-7), (step, tag)
