"""An Accelerate job for tests/test_accelerate_scale_out.py: the tracker is built BEFORE the Accelerator (as
the README shows), the same steps as tests/torchrun_job.py, all four backends.

    accelerate launch --multi_gpu --num_processes 2 tests/accelerate_job.py LOG_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

import hjepa_metrics as hm
from hjepa_metrics.integrations.accelerate import HJEPAMetricsTracker

sys.path.insert(0, str(Path(__file__).parent))
import torchrun_job as job


def main(log_dir: str) -> None:
    config = {
        "log_dir": log_dir,
        "backends": ["jsonl", "tensorboard", "mlflow", "wandb"],
        "wandb": {"mode": "offline", "project": "accelerate"},
    }
    tracker = HJEPAMetricsTracker("accelerate", config=config)
    accelerator = Accelerator(log_with=tracker, cpu=True)
    Path(log_dir, f"world.rank{accelerator.process_index}.txt").write_text(str(accelerator.num_processes))
    accelerator.init_trackers("hjepa", config={"lr": 0.05})
    net = accelerator.prepare(job.model())
    optimizer = accelerator.prepare(torch.optim.SGD(net.parameters(), lr=0.05))
    logger = hm.HJEPAMetricsLogger(tracker.writer, num_hierarchies=job.LEVELS, hierarchy_weights=[1.0, 0.5])
    rank, world = accelerator.process_index, accelerator.num_processes
    for step in range(job.STEPS):
        batch = {k: job.rows(v, rank, world) for k, v in job.global_batch(step).items()}
        optimizer.zero_grad()
        loss_dict = job.losses(batch["x"], net(batch["x"]))
        accelerator.backward(loss_dict["loss"])
        norm = accelerator.clip_grad_norm_(net.parameters(), max_norm=1.0)
        hm.log_training_step(
            logger,
            global_step=step,
            loss_dict=loss_dict,
            mask=batch["mask"],
            predictions=[batch["pred0"], batch["pred1"]],
            targets=[batch["targ0"], batch["targ1"]],
            collapse_features=[batch["x"]],
            model=net,
            grad_norm_before=norm,
            clip_threshold=1.0,
            optimizer=optimizer,
        )
        accelerator.log({"train/custom/note": float(step)}, step=step)  # Accelerate's own API, same run
        optimizer.step()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
