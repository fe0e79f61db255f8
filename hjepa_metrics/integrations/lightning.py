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

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..logger import HJEPAMetricsLogger
from ..training_step import log_training_step
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
        by_norm = trainer.gradient_clip_algorithm in (None, "norm")
        log_training_step(
            self.logger,
            global_step=step,
            grad_norm_before=before,
            clip_threshold=float(clip) if clip and by_norm else None,
            optimizer=optimizer,
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step has already advanced past this batch's optimizer step
        step = max(trainer.global_step - 1, 0)
        if not isinstance(outputs, Mapping) or step % self._every(trainer):
            return
        module: Any = pl_module
        has_ema = all(hasattr(module, a) for a in ("context_encoder", "target_encoder", "momentum"))
        feats = outputs.get("context_features")
        batch_size = len(batch) if isinstance(batch, torch.Tensor) else _batch_size(batch)
        log_training_step(
            self.logger,
            global_step=step,
            loss_dict=outputs.get("loss_dict"),
            current_loss=outputs.get("loss"),
            mask=outputs.get("mask"),
            predictions=outputs.get("predictions"),
            targets=outputs.get("targets"),
            collapse_features=[self._features(feats)] if feats is not None else None,
            batch_size=batch_size,
            forward_time=time.perf_counter() - self._batch_start,
            backward_time=0.0,
            context_encoder=module.context_encoder if has_ema else None,
            target_encoder=module.target_encoder if has_ema else None,
            momentum=float(module.momentum) if has_ema else None,
            target_momentum=float(getattr(module, "momentum_end", 1.0)),
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
