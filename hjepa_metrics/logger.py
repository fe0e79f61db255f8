"""``HJEPAMetricsLogger``: the guide's logging methods, routing metric groups to writers.

Each ``log_*`` method is accumulator (or pure function) → compute → emit; computation lives in the
metric modules, cross-rank reduction in :mod:`.distributed`, writer plumbing in :mod:`writers`.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from writers import Writer, writer_from

from ._params import NamedTensors
from ._tensor import ArrayLike, Scalar, level_list
from .alerts import Alert, AlertMonitor
from .collapse import CollapseAccumulator
from .ema import ema_dynamics
from .gradients import ClippingAccumulator, gradient_flow
from .hierarchy import hierarchy_feature_stats
from .layout import guide_layout
from .learning_rate import learning_rate
from .losses import checked_weights, hierarchical_losses
from .masking import MaskingAccumulator
from .performance import performance_metrics
from .prediction import PredictionAccumulator
from .registry import summary_kinds
from .router import MetricRouter
from .stability import Losses, LossHistory

if TYPE_CHECKING:
    from .validation import ValidationAccumulator


class HJEPAMetricsLogger(MetricRouter):
    """The guide's H-JEPA logger: computes each metric group, writes it under a prefix, returns it.

    Writers come from ``writers`` (one or several), ``config`` (see :func:`writers.build_writers`),
    or the guide's ``metrics_logger`` (a writer, or an object with
    ``log_metrics(metrics, step, prefix, commit)``); with none of them, from ``HJEPA_METRICS_*``
    environment variables or TensorBoard + JSONL under ``runs/hjepa``.

    Every ``log_*`` method takes ``global_step`` (default: the last step logged) and ``prefix``
    (default ``"train/"``; ``"val/"`` for validation) and returns the dict it wrote, tags prefixed.
    The custom-scalars layout is written once at construction; alerts from the guide's thresholds
    are reported through ``logging`` once per crossing, rate-limited per tag, and the last ones kept
    in :attr:`alerts` (``alerts=False`` turns them off; an :class:`AlertMonitor` sets the limits). Under
    ``torch.distributed`` every rank makes the same calls, statistics are reduced over ranks with one
    all-reduce per call, and only rank 0 builds writers.
    """

    def __init__(
        self,
        writers: Writer | Sequence[Writer] | None = None,
        *,
        config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
        metrics_logger: Any = None,
        num_hierarchies: int = 3,
        hierarchy_weights: Sequence[float] | None = None,
        prefix: str = "train/",
        alerts: bool | AlertMonitor = True,
        on_alert: Callable[[Alert], None] | None = None,
        loss_history_size: int = 1000,
        write_layout: bool = True,
        per_parameter_gradients: bool = False,
        max_similarity_rows: int = 1024,
        distributed: bool = True,
    ) -> None:
        if num_hierarchies < 1:
            raise ValueError(f"num_hierarchies: got {num_hierarchies}; expected >= 1")
        if hierarchy_weights is not None:
            checked_weights(hierarchy_weights, num_hierarchies)
        super().__init__(
            lambda: writer_from(writers, config=config, metrics_logger=metrics_logger),
            prefix=prefix,
            monitor=_monitor(alerts, num_hierarchies, on_alert),
            distributed=distributed,
        )
        self.num_hierarchies = num_hierarchies
        self.hierarchy_weights = list(hierarchy_weights) if hierarchy_weights is not None else None
        self.per_parameter_gradients = per_parameter_gradients
        self.max_similarity_rows = max_similarity_rows
        self.losses = LossHistory(loss_history_size)
        self.clipping = ClippingAccumulator()
        if write_layout:
            self.writer.log_layout(guide_layout(num_hierarchies, prefix=prefix))
        self.writer.define_summaries(summary_kinds(num_hierarchies, prefix))

    @property
    def loss_history(self) -> deque[float]:
        """The logger's own bounded loss history (oldest first)."""
        return self.losses.values

    def collapse_accumulator(self, level: int) -> CollapseAccumulator:
        """An empty collapse accumulator with this logger's options. Each rank samples with its own
        seed, so merged ``max_similarity`` samples do not repeat keys."""
        return CollapseAccumulator(level=level, max_similarity_rows=self.max_similarity_rows, seed=self.rank)

    # -- the guide's methods
    def log_hierarchical_losses(
        self, loss_dict: Mapping[str, Scalar], global_step: int | None = None, prefix: str | None = None
    ) -> dict[str, float]:
        values = hierarchical_losses(
            loss_dict, num_hierarchies=self.num_hierarchies, hierarchy_weights=self.hierarchy_weights
        )
        return self.emit(values, global_step, prefix)

    def log_masking_statistics(
        self,
        mask: ArrayLike | Sequence[ArrayLike],
        num_patches: int | None = None,
        global_step: int | None = None,
        prefix: str | None = None,
    ) -> dict[str, float]:
        state = MaskingAccumulator()
        state.update(mask, num_patches)
        return self.log_accumulated([state], global_step, prefix)

    def log_prediction_quality(
        self,
        predictions: ArrayLike | Sequence[ArrayLike],
        targets: ArrayLike | Sequence[ArrayLike],
        global_step: int | None = None,
        prefix: str | None = None,
    ) -> dict[str, float]:
        """Per-level prediction quality; a flat list of ``k·L`` tensors is regrouped by level."""
        state = PredictionAccumulator(self.num_hierarchies)
        state.update(predictions, targets)
        return self.log_accumulated([state], global_step, prefix)

    def log_collapse_metrics(
        self, features: ArrayLike, level: int = 0, global_step: int | None = None, prefix: str | None = None
    ) -> dict[str, float]:
        state = self.collapse_accumulator(level)
        state.update(features)
        return self.log_accumulated([state], global_step, prefix)

    def log_gradient_flow(
        self, model: NamedTensors, global_step: int | None = None, prefix: str | None = None
    ) -> dict[str, float]:
        return self.emit(
            gradient_flow(model, per_parameter=self.per_parameter_gradients), global_step, prefix
        )

    def log_gradient_clipping(
        self,
        global_norm_before: Scalar,
        global_norm_after: Scalar,
        clip_threshold: float | None,
        global_step: int | None = None,
        prefix: str | None = None,
    ) -> dict[str, float]:
        """Clipping around ``clip_grad_norm_``; ``clipping_percentage`` counts every call since
        construction (or :meth:`reset_clipping_stats`)."""
        self.clipping.update(global_norm_before, global_norm_after, clip_threshold)
        return self.log_accumulated([self.clipping], global_step, prefix)

    def reset_clipping_stats(self) -> None:
        self.clipping.reset()

    def log_learning_rate(
        self, optimizer: Any, global_step: int | None = None, prefix: str | None = None
    ) -> dict[str, float]:
        return self.emit(learning_rate(optimizer), global_step, prefix)

    def log_hierarchy_feature_stats(
        self,
        predictions: ArrayLike | Sequence[ArrayLike],
        targets: ArrayLike | Sequence[ArrayLike] | None = None,
        global_step: int | None = None,
        prefix: str | None = None,
    ) -> dict[str, float]:
        self.check_levels(len(level_list(predictions, "predictions")), "predictions")
        return self.emit(hierarchy_feature_stats(predictions, targets), global_step, prefix)

    def log_training_stability(
        self,
        current_loss: Scalar,
        loss_history: Losses | None = None,
        global_step: int | None = None,
        prefix: str | None = None,
    ) -> dict[str, float]:
        """Stability over ``loss_history`` (the caller's, current loss included as the guide does),
        or, without one, over the logger's own bounded history, to which ``current_loss`` is added."""
        if loss_history is None:
            self.losses.update(current_loss)
            return self.log_accumulated([self.losses], global_step, prefix)
        return self.log_accumulated([LossHistory.of(loss_history, current_loss)], global_step, prefix)

    def log_performance_metrics(
        self,
        batch_size: int,
        forward_time: float,
        backward_time: float,
        global_step: int | None = None,
        prefix: str | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, float]:
        values = performance_metrics(batch_size, forward_time, backward_time, device=device)
        return self.emit(values, global_step, prefix)

    def log_ema_dynamics(
        self,
        context_encoder: NamedTensors,
        target_encoder: NamedTensors,
        current_momentum: Scalar,
        target_momentum: Scalar,
        global_step: int | None = None,
        prefix: str | None = None,
    ) -> dict[str, float]:
        values = ema_dynamics(context_encoder, target_encoder, current_momentum, target_momentum)
        return self.emit(values, global_step, prefix)

    # -- validation
    def validation(self, prefix: str = "val/") -> ValidationAccumulator:
        """An accumulator for a validation pass: ``update`` per batch, ``log`` once at the end."""
        from .validation import ValidationAccumulator

        return ValidationAccumulator(self, prefix)

    def check_levels(self, count: int, name: str) -> None:
        """Raise a clear error when ``count`` levels were given to a logger of another depth."""
        if count != self.num_hierarchies:
            raise ValueError(
                f"{name}: got {count} levels; expected num_hierarchies={self.num_hierarchies} "
                "(set num_hierarchies on the logger to match the model)"
            )


def _monitor(
    alerts: bool | AlertMonitor, num_hierarchies: int, on_alert: Callable[[Alert], None] | None
) -> AlertMonitor | None:
    if isinstance(alerts, AlertMonitor):
        if on_alert is not None:
            alerts.on_alert = on_alert
        return alerts
    return AlertMonitor(num_hierarchies=num_hierarchies, on_alert=on_alert) if alerts else None


HJEPATensorBoardLogger = HJEPAMetricsLogger
