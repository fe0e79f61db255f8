"""A Lightning job for tests/test_lightning_scale_out.py: fit with gradient accumulation, then validate()
and test(), on 2 CPU processes with the strategy named on the command line.

    python tests/lightning_job.py LOG_DIR ddp|fsdp2 [compile]

(Lightning's FSDPStrategy, FSDP1, needs a GPU; ModelParallelStrategy with fully_shard is FSDP2 on CPU.)
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import lightning.pytorch as lp
import torch
from torch import nn

from hjepa_metrics.integrations.lightning import HJEPAMetricsCallback


class HJEPA(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.context_encoder = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.predictor = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.context_encoder(x)


class Module(lp.LightningModule):
    """The net is held as ``self.model`` (and may be compiled): gradient-flow names must not show it."""

    def __init__(self, compile_net: bool) -> None:
        super().__init__()
        self.model = HJEPA()
        self.target_encoder = copy.deepcopy(self.model.context_encoder).requires_grad_(False)
        self.compile_net = compile_net
        self.sharded = False

    def configure_model(self) -> None:
        if self.device_mesh is not None and not self.sharded:  # ModelParallelStrategy: FSDP2, once
            self.sharded = True
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (*self.model.context_encoder, self.model.predictor, self.model):
                if any(True for _ in layer.parameters()):
                    fully_shard(layer, mesh=mesh)
            for layer in (*self.target_encoder, self.target_encoder):
                if any(True for _ in layer.parameters()):
                    fully_shard(layer, mesh=mesh)
        if self.compile_net and not isinstance(self.model, torch._dynamo.eval_frame.OptimizedModule):
            self.model = torch.compile(self.model)  # type: ignore[assignment]

    def step(self, x: torch.Tensor) -> dict[str, Any]:
        ctx = self.model(x)
        with torch.no_grad():
            tgt = self.target_encoder(x)[:, 1:]
        pred = self.model.predictor(ctx[:, 1:])
        preds, targs = [pred, pred[:, ::2]], [tgt, tgt[:, ::2]]
        levels = [nn.functional.mse_loss(p, t) for p, t in zip(preds, targs, strict=True)]
        loss = levels[0] + 0.5 * levels[1]
        return {
            "loss": loss,
            "loss_dict": {"loss": loss, "loss_h0": levels[0], "loss_h1": levels[1]},
            "predictions": [p.detach() for p in preds],
            "targets": targs,
            "context_features": ctx.detach(),
        }

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self.step(batch[0])

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self.step(batch[0])

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self.step(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main(log_dir: str, strategy: str, compile_net: bool) -> None:
    torch.manual_seed(0)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(48, 9, 8)), batch_size=4)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(5, 9, 8)), batch_size=2)
    callback = HJEPAMetricsCallback(
        config={"log_dir": log_dir, "backends": ["jsonl"]}, num_hierarchies=2, log_every_n_steps=1
    )
    strategies: dict[str, Any] = {"ddp": "ddp", "fsdp2": lp.strategies.ModelParallelStrategy()}
    trainer = lp.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategies[strategy],
        max_epochs=2,
        accumulate_grad_batches=3,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=log_dir,
    )
    module = Module(compile_net)
    trainer.fit(module, train, val)
    with open(f"{log_dir}/global_steps.rank{trainer.global_rank}.txt", "w") as f:
        f.write(str(trainer.global_step))
    trainer.validate(module, val)
    trainer.test(module, val)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], len(sys.argv) > 3 and sys.argv[3] == "compile")
