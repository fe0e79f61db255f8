"""A PyTorch Lightning callback that makes the guide's calls at the right hooks.

    trainer = L.Trainer(callbacks=[HJEPAMetricsCallback(config={"backends": ["tensorboard", "jsonl"]})])

``training_step`` returns a dict with ``loss`` plus what the guide logs, each optional:
``loss_dict`` (``loss``, ``loss_h{i}``), ``predictions`` and ``targets`` (per level),
``context_features`` (``[B, 1+N, D]`` with CLS, or ``[B, N, D]``), ``mask``. ``validation_step`` and
``test_step`` return ``predictions``, ``targets`` and ``context_features``. A module with
``context_encoder``, ``target_encoder`` and a ``momentum`` attribute (on itself or on the net it holds)
also gets the EMA metrics.

Steps are ``trainer.global_step``: one record per optimizer step, with gradient accumulation too (the
last micro-batch's outputs, the step's summed forward and backward times and batch sizes). Forward and
backward times come from ``on_before_backward``/``on_after_backward``; without them no performance tag is
written. Under DDP or FSDP2 (``ModelParallelStrategy``) every rank computes, values are reduced over
ranks, rank 0 writes, and the padding ``DistributedSampler`` adds to validation and test is left out.
The writers stay open across ``fit()``, ``validate()`` and ``test()`` (flushed after each); they close
at interpreter exit, on an exception (runs marked failed), or with :meth:`HJEPAMetricsCallback.close`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..logger import HJEPAMetricsLogger
from ..training_step import log_training_step
from ..validation import ValidationAccumulator, sampler_valid_mask

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'the Lightning callback needs lightning: pip install "hjepa-metrics[lightning]"'
    ) from exc


class HJEPAMetricsCallback(pl.Callback):
    """The guide's training, validation and test logging as a Lightning callback."""

    def __init__(
        self,
        logger: HJEPAMetricsLogger | None = None,
        *,
        config: Mapping[str, Any] | str | None = None,
        num_hierarchies: int = 3,
        hierarchy_weights: Sequence[float] | None = None,
        log_every_n_steps: int | None = None,
        drop_cls_token: bool = True,
        module_depth: int = 1,
    ) -> None:
        super().__init__()
        self._logger = logger
        self._config = config
        self._num_hierarchies = num_hierarchies
        self._weights = hierarchy_weights
        self._module_depth = module_depth
        self.log_every_n_steps = log_every_n_steps
        self.drop_cls_token = drop_cls_token
        self._eval: ValidationAccumulator | None = None
        self._valid: torch.Tensor | None = None
        # the optimizer step being accumulated: its step, summed times and batch sizes
        self._step_at_start = 0
        self._mark = 0.0
        self._forward = 0.0
        self._backward = 0.0
        self._samples = 0
        self._backward_seen = False
        self._closed = False

    @property
    def logger(self) -> HJEPAMetricsLogger:
        """Built on first use (after Lightning has set up the process group)."""
        if self._logger is None:
            self._logger = HJEPAMetricsLogger(
                config=self._config,
                num_hierarchies=self._num_hierarchies,
                hierarchy_weights=self._weights,
                module_depth=self._module_depth,
            )
        return self._logger

    def close(self, failed: bool | None = None) -> None:
        """Close every backend now (it happens at exit otherwise)."""
        if self._logger is not None and not self._closed:
            self._closed = True
            self._logger.close(failed=failed)

    def _every(self, trainer: pl.Trainer) -> int:
        return int(self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 1) or 1)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:, :] if self.drop_cls_token and x.dim() == 3 else x

    # -- training
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self._step_at_start or not self._samples:  # a new optimizer step
            self._step_at_start = trainer.global_step
            self._forward = self._backward = 0.0
            self._samples = 0
            self._backward_seen = False
        self._samples += _batch_size(batch)
        self._mark = time.perf_counter()

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        now = time.perf_counter()
        self._forward += now - self._mark
        self._mark = now

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = time.perf_counter()
        self._backward += now - self._mark
        self._backward_seen = True
        self._mark = now

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # before Lightning clips: these are the raw gradients, once per (accumulated) optimizer step
        step = trainer.global_step
        if step % self._every(trainer):
            return
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
        step = self._step_at_start
        stepped = trainer.global_step > step  # the last micro-batch of an accumulated step
        if not stepped or not isinstance(outputs, Mapping) or step % self._every(trainer):
            return
        ema = _ema_parts(pl_module)
        feats = outputs.get("context_features")
        timed = self._backward_seen and self._forward > 0
        log_training_step(
            self.logger,
            global_step=step,
            loss_dict=outputs.get("loss_dict"),
            current_loss=outputs.get("loss"),
            mask=outputs.get("mask"),
            predictions=outputs.get("predictions"),
            targets=outputs.get("targets"),
            collapse_features=[self._features(feats)] if feats is not None else None,
            batch_size=self._samples if timed else None,
            forward_time=self._forward if timed else None,
            backward_time=self._backward if timed else None,
            context_encoder=ema[0] if ema else None,
            target_encoder=ema[1] if ema else None,
            momentum=ema[2] if ema else None,
            target_momentum=ema[3] if ema else 1.0,
        )

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.close(failed=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # validate() and test() may follow fit(): the writers stay open, everything is on disk
        if self._logger is not None and not self._closed:
            self._logger.flush()

    # -- validation and test: every batch accumulated, one value per tag at the end
    def _start_eval(self, prefix: str) -> None:
        self._eval = self.logger.validation(prefix=prefix)

    def _eval_batch(
        self, trainer: pl.Trainer, stage: str, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int
    ) -> None:
        if self._eval is None or not isinstance(outputs, Mapping):
            return
        feats = outputs.get("context_features")
        preds = outputs.get("predictions")
        size = _batch_size(batch)
        self._eval.update(
            predictions=preds,
            targets=outputs.get("targets"),
            features=self._features(feats) if feats is not None else None,
            valid=_padding_mask(trainer, stage, dataloader_idx, batch_idx, size),
        )

    def _end_eval(self, trainer: pl.Trainer) -> None:
        if self._eval is not None and self._eval.batches and not trainer.sanity_checking:
            self._eval.log(global_step=trainer.global_step)
        self._eval = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_eval("val/")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch(trainer, "val", outputs, batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_eval(trainer)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_eval("test/")

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch(trainer, "test", outputs, batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_eval(trainer)


def _ema_parts(pl_module: Any) -> tuple[Any, Any, float, float] | None:
    """(context encoder, target encoder, momentum, target momentum) on the module or the net it holds."""
    for owner in (pl_module, *(getattr(pl_module, n, None) for n in ("model", "net"))):
        if owner is not None and all(
            hasattr(owner, a) for a in ("context_encoder", "target_encoder", "momentum")
        ):
            return (
                owner.context_encoder,
                owner.target_encoder,
                float(owner.momentum),
                float(getattr(owner, "momentum_end", 1.0)),
            )
    return None


def _padding_mask(
    trainer: pl.Trainer, stage: str, dataloader_idx: int, batch_idx: int, size: int
) -> torch.Tensor | None:
    """Which samples of this evaluation batch are real (``DistributedSampler`` pads with copies)."""
    loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
    sampler = getattr(loaders, "sampler", None)
    batch_size = getattr(loaders, "batch_size", None)
    if sampler is None or not batch_size or getattr(sampler, "num_replicas", 1) == 1:
        return None
    return sampler_valid_mask(sampler)[batch_idx * batch_size : batch_idx * batch_size + size]


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()))
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    return len(batch) if hasattr(batch, "__len__") else 0
