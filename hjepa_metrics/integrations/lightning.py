"""A PyTorch Lightning callback that makes the guide's calls at the right hooks.

    trainer = L.Trainer(callbacks=[HJEPAMetricsCallback(config={"backends": ["tensorboard", "jsonl"]})])

``training_step`` returns a dict with ``loss`` plus what the guide logs, each optional:
``loss_dict`` (``loss``, ``loss_h{i}``), ``predictions`` and ``targets`` (per level),
``context_features`` (``[B, 1+N, D]`` with CLS, or ``[B, N, D]``), ``mask``. ``validation_step``
returns ``predictions``, ``targets`` and ``context_features``. A module with ``context_encoder``,
``target_encoder`` and a ``momentum`` attribute also gets the EMA metrics. Steps are
``trainer.global_step``; under DDP every rank computes and rank 0 writes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..logger import HJEPAMetricsLogger
from ..validation import ValidationAccumulator

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'the Lightning callback needs lightning: pip install "hjepa-metrics[lightning]"'
    ) from exc


class HJEPAMetricsCallback(pl.Callback):
    """The guide's training and validation logging as a Lightning callback."""

    def __init__(
        self,
        logger: HJEPAMetricsLogger | None = None,
        *,
        config: Mapping[str, Any] | str | None = None,
        num_hierarchies: int = 3,
        hierarchy_weights: Sequence[float] | None = None,
        log_every_n_steps: int | None = None,
        drop_cls_token: bool = True,
    ) -> None:
        super().__init__()
        self._logger = logger
        self._config = config
        self._num_hierarchies = num_hierarchies
        self._weights = hierarchy_weights
        self.log_every_n_steps = log_every_n_steps
        self.drop_cls_token = drop_cls_token
        self._val: ValidationAccumulator | None = None
        self._batch_start = 0.0

    @property
    def logger(self) -> HJEPAMetricsLogger:
        """Built on first use (after Lightning has set up the process group)."""
        if self._logger is None:
            self._logger = HJEPAMetricsLogger(
                config=self._config, num_hierarchies=self._num_hierarchies, hierarchy_weights=self._weights
            )
        return self._logger

    def _every(self, trainer: pl.Trainer) -> int:
        return int(self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 1) or 1)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:, :] if self.drop_cls_token and x.dim() == 3 else x

    # -- training
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start = time.perf_counter()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # before Lightning clips: these are the raw gradients
        if trainer.global_step % self._every(trainer):
            return
        step = trainer.global_step
        flow = self.logger.log_gradient_flow(pl_module, global_step=step)
        before = flow.get("train/gradient_flow/global_norm")
        clip = trainer.gradient_clip_val
        if before is not None:
            if clip and trainer.gradient_clip_algorithm in (None, "norm"):
                after = before * min(1.0, float(clip) / (before + 1e-6))  # what clip_grad_norm_ leaves
                self.logger.log_gradient_clipping(before, after, float(clip), global_step=step)
            else:
                self.logger.log_gradient_clipping(before, before, math.inf, global_step=step)
        self.logger.log_learning_rate(optimizer, global_step=step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step has already advanced past this batch's optimizer step
        step = max(trainer.global_step - 1, 0)
        if not isinstance(outputs, Mapping) or step % self._every(trainer):
            return
        log = self.logger
        loss_dict = outputs.get("loss_dict")
        if loss_dict is not None:
            log.log_hierarchical_losses(loss_dict, global_step=step)
        if outputs.get("mask") is not None:
            log.log_masking_statistics(outputs["mask"], global_step=step)
        preds, targs = outputs.get("predictions"), outputs.get("targets")
        if preds is not None and targs is not None:
            log.log_prediction_quality(preds, targs, global_step=step)
            log.log_hierarchy_feature_stats(preds, targs, global_step=step)
        if outputs.get("context_features") is not None:
            log.log_collapse_metrics(self._features(outputs["context_features"]), level=0, global_step=step)
        if outputs.get("loss") is not None:
            log.log_training_stability(current_loss=outputs["loss"], global_step=step)
        elapsed = time.perf_counter() - self._batch_start
        batch_size = len(batch) if isinstance(batch, torch.Tensor) else _batch_size(batch)
        log.log_performance_metrics(batch_size, elapsed, 0.0, global_step=step)
        if all(hasattr(pl_module, a) for a in ("context_encoder", "target_encoder", "momentum")):
            module: Any = pl_module
            log.log_ema_dynamics(
                module.context_encoder,
                module.target_encoder,
                float(module.momentum),
                float(getattr(module, "momentum_end", 1.0)),
                global_step=step,
            )

    # -- validation
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val = self.logger.validation()

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._val is None or not isinstance(outputs, Mapping):
            return
        feats = outputs.get("context_features")
        self._val.update(
            predictions=outputs.get("predictions"),
            targets=outputs.get("targets"),
            features=self._features(feats) if feats is not None else None,
        )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val is not None and self._val.batches and not trainer.sanity_checking:
            self._val.log(global_step=trainer.global_step)
        self._val = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._logger is not None and stage == "fit":
            self._logger.close()


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()))
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    return len(batch) if hasattr(batch, "__len__") else 0
