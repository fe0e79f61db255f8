"""Lightning callback and Accelerate tracker with a tiny H-JEPA-like model for a few CPU steps."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from writers import read_jsonl


class TinyHJEPA(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.context_encoder = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.target_encoder = copy.deepcopy(self.context_encoder).requires_grad_(False)
        self.predictor = nn.Linear(dim, dim)

    def step(self, x: torch.Tensor) -> dict[str, Any]:
        ctx = self.context_encoder(x)  # [B, 1 + N, D] with a CLS position
        with torch.no_grad():
            tgt = self.target_encoder(x)[:, 1:]
        pred = self.predictor(ctx[:, 1:])
        preds = [pred, pred[:, ::2], pred[:, ::4]]
        targs = [tgt, tgt[:, ::2], tgt[:, ::4]]
        levels = [nn.functional.mse_loss(p, t) for p, t in zip(preds, targs, strict=True)]
        loss = levels[0] + 0.5 * levels[1] + 0.25 * levels[2]
        return {
            "loss": loss,
            "loss_dict": {"loss": loss, **{f"loss_h{i}": v for i, v in enumerate(levels)}},
            "predictions": [p.detach() for p in preds],
            "targets": targs,
            "context_features": ctx.detach(),
            "mask": torch.rand(x.shape[0], x.shape[1] - 1) > 0.5,
        }


def test_lightning_callback_logs_the_guide_tags(tmp_path: Path) -> None:
    lp = pytest.importorskip("lightning.pytorch")
    from hjepa_metrics.integrations.lightning import HJEPAMetricsCallback

    class Module(lp.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyHJEPA()
            self.context_encoder, self.target_encoder = self.net.context_encoder, self.net.target_encoder
            self.momentum = 0.996

        def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
            return self.net.step(batch[0])

        def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
            return self.net.step(batch[0])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.net.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(32, 9, 8))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    callback = HJEPAMetricsCallback(
        config={"log_dir": str(tmp_path), "backends": ["jsonl"]}, log_every_n_steps=1
    )
    trainer = lp.Trainer(
        max_steps=4,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.01,
        accelerator="cpu",
        num_sanity_val_steps=0,
        limit_val_batches=2,
        val_check_interval=4,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(Module(), loader, loader)
    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "metrics" in r]
    tags = {t for r in records for t in r["metrics"]}
    for tag in (
        "train/loss/total",
        "train/loss/contribution_h2",
        "train/prediction/level2_cosine_sim_mean",
        "train/collapse/level0_effective_rank",
        "train/gradient_flow/global_norm",
        "train/gradient/clipping_percentage",
        "train/learning_rate/base_lr",
        "train/masking/mask_ratio",
        "train/ema/weight_magnitude_ratio",
        "train/stability/loss_smoothness",
        "val/prediction/level0_cosine_sim_mean",
        "val/collapse/level0_effective_rank",
    ):
        assert tag in tags, tag
    steps = sorted({r["step"] for r in records if "train/loss/total" in r["metrics"]})
    assert steps == [0, 1, 2, 3]  # the trainer's global step
    clipped = [
        r["metrics"]["train/gradient/was_clipped"]
        for r in records
        if "train/gradient/was_clipped" in r["metrics"]
    ]
    assert clipped and all(c == 1.0 for c in clipped)  # gradient_clip_val=0.01 clips every step
    assert all(math.isfinite(v) for r in records for v in r["metrics"].values())


def test_accelerate_tracker_selects_our_writers(tmp_path: Path) -> None:
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, PartialState

    from hjepa_metrics import HJEPAMetricsLogger
    from hjepa_metrics.integrations.accelerate import HJEPAMetricsTracker

    AcceleratorState._reset_state(reset_partial_state=True)
    tracker = HJEPAMetricsTracker("tiny", config={"log_dir": str(tmp_path), "backends": ["jsonl"]})
    assert PartialState._shared_state == {}  # building the tracker set up none of Accelerate's state
    assert not (tmp_path / "metrics.jsonl").exists()  # nor any writer: that waits for init_trackers
    accelerator = accelerate.Accelerator(log_with=tracker, cpu=True)
    accelerator.init_trackers("hjepa", config={"lr": 0.1, "api_key": "secret-value"})
    model = TinyHJEPA()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    writer = accelerator.get_tracker("hjepa_metrics", unwrap=True)
    logger = HJEPAMetricsLogger(writer, write_layout=False)
    for step in range(3):
        out = model.step(torch.randn(4, 9, 8))
        accelerator.backward(out["loss"])
        accelerator.log({"train/loss/total": out["loss"], "note": "skipped", "lr": 0.1}, step=step)
        logger.log_gradient_flow(model, global_step=step)
        opt.step()
        opt.zero_grad()
    accelerator.end_training()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    config = next(r for r in records if r.get("kind") == "config")["config"]
    assert config == {"lr": 0.1, "api_key": "***REDACTED***"}
    loss_steps = [r["step"] for r in records if "train/loss/total" in r.get("metrics", {})]
    assert loss_steps == [0, 1, 2]
    assert all("note" not in r.get("metrics", {}) for r in records)
    assert [r["step"] for r in records if "train/gradient_flow/global_norm" in r.get("metrics", {})] == [
        0,
        1,
        2,
    ]
