"""A training job for ``torchrun`` (used by tests/test_torchrun.py): every guide call on each rank's share of
a fixed global batch, all four backends, as a user's script would write it.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/torchrun_job.py LOG_DIR
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import hjepa_metrics as hm

GLOBAL_BATCH = 8
STEPS = 3
LEVELS = 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.context_encoder = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 12))
        self.predictor = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.context_encoder(x))


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """The whole batch of a step; rank r of R takes rows r·B/R .. (r+1)·B/R."""
    gen = torch.Generator().manual_seed(1000 + step)
    return {
        "x": torch.randn(GLOBAL_BATCH, 10, 6, generator=gen),
        "mask": torch.rand(GLOBAL_BATCH, 3, 10, generator=gen) > 0.6,
        "pred0": torch.randn(GLOBAL_BATCH, 10, 6, generator=gen),
        "pred1": torch.randn(GLOBAL_BATCH, 5, 6, generator=gen),
        "targ0": torch.randn(GLOBAL_BATCH, 10, 6, generator=gen),
        "targ1": torch.randn(GLOBAL_BATCH, 5, 6, generator=gen),
    }


def rows(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    share = GLOBAL_BATCH // world
    return t[rank * share : (rank + 1) * share]


def model() -> Net:
    torch.manual_seed(0)
    return Net()


def losses(x: torch.Tensor, out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample-mean losses, so the mean over equal shares is the loss of the global batch."""
    h0 = F.mse_loss(out, x)
    h1 = F.mse_loss(out.mean(dim=1), x.mean(dim=1))
    return {"loss": h0 + 0.5 * h1, "loss_h0": h0, "loss_h1": h1}


def single_process_values() -> dict[int, dict[str, float]]:
    """What one process logs for the same steps on the whole batch."""
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    logger = hm.HJEPAMetricsLogger([], num_hierarchies=LEVELS, hierarchy_weights=[1.0, 0.5], alerts=False)
    out = {}
    for step in range(STEPS):
        batch = global_batch(step)
        optimizer.zero_grad()
        loss_dict = losses(batch["x"], net(batch["x"]))
        loss_dict["loss"].backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=1.0)
        out[step] = hm.log_training_step(
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
        optimizer.step()
    return out


def main(log_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    net = nn.parallel.DistributedDataParallel(model())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    config = {
        "log_dir": log_dir,
        "backends": ["jsonl", "tensorboard", "mlflow", "wandb"],
        "wandb": {"mode": "offline", "project": "torchrun"},
    }
    with hm.HJEPAMetricsLogger(config=config, num_hierarchies=LEVELS, hierarchy_weights=[1.0, 0.5]) as logger:
        for step in range(STEPS):
            batch = {k: rows(v, rank, world) for k, v in global_batch(step).items()}
            optimizer.zero_grad()
            loss_dict = losses(batch["x"], net(batch["x"]))
            loss_dict["loss"].backward()
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=1.0)
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
            optimizer.step()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
