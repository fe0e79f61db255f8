"""Lightning on 2 CPU processes (DDP, and FSDP2 through ModelParallelStrategy): steps follow
``trainer.global_step`` with gradient accumulation, forward and backward are timed, gradient-flow modules are
the net's parts, and ``validate()``/``test()`` after ``fit()`` log (the padding of their sampler left out)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from writers import read_jsonl

pytest.importorskip("lightning")
HERE = Path(__file__).parent


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_lightning_multi_process_fit_validate_test(tmp_path: Path, strategy: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), *sys.path])}
    done = subprocess.run(
        [sys.executable, str(HERE / "lightning_job.py"), str(tmp_path), strategy],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "write after close" not in done.stderr
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["metrics.jsonl"]  # rank 1 wrote nothing
    global_steps = int((tmp_path / "global_steps.rank0.txt").read_text())
    records = [r for r in read_jsonl(tmp_path) if "metrics" in r]

    def steps_with(tag: str) -> list[int]:
        return [r["step"] for r in records if tag in r["metrics"]]

    # one record per optimizer step (accumulate_grad_batches=3), at trainer.global_step
    assert steps_with("train/loss/total") == list(range(global_steps))
    assert steps_with("train/gradient_flow/global_norm") == list(range(global_steps))
    modules = {
        t.split("/")[-1].rsplit("_", 1)[0] for r in records for t in r["metrics"] if "gradient_flow/" in t
    }
    assert modules == {"context_encoder", "predictor", "global"}  # not `model`, not the frozen target
    for r in records:
        if "train/performance/forward_time_ms" in r["metrics"]:
            assert r["metrics"]["train/performance/forward_time_ms"] > 0
            assert r["metrics"]["train/performance/backward_time_ms"] > 0
            # three micro-batches of 4 samples on each of the 2 ranks (or all data on both: FSDP2)
            assert r["metrics"]["train/performance/samples_per_second"] > 0
    assert len(steps_with("train/performance/backward_time_ms")) == global_steps
    # validate() and test() after fit() log at the last step
    assert global_steps in steps_with("val/prediction/level0_cosine_sim_mean")
    assert steps_with("test/prediction/level0_cosine_sim_mean") == [global_steps]
    assert steps_with("test/collapse/level0_effective_rank") == [global_steps]
