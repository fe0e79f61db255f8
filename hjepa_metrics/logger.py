"""``HJEPAMetricsLogger``: the guide's logging methods over the pure metrics and any writers."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch

from writers import BaseWriter, MultiWriter, Writer, build_writers

from ._params import NamedTensors
from ._tensor import ArrayLike, Scalar, as_features, level_list, scalar_tensor, to_host
from .alerts import Alert, AlertMonitor
from .collapse import CollapseAccumulator, collapse_state
from .distributed import all_reduce_sum, collective_device, rank_and_world
from .ema import ema_dynamics
from .gradients import gradient_clipping, gradient_flow
from .hierarchy import hierarchy_feature_stats
from .layout import guide_layout
from .learning_rate import learning_rate
from .losses import checked_weights, hierarchical_losses
from .masking import masked_totals, masking_from_totals
from .performance import performance_metrics
from .prediction import PredictionAccumulator, checked_level_pairs
from .registry import summary_kinds
from .stability import training_stability

log = logging.getLogger("hjepa_metrics")


class _LogMetricsAdapter(BaseWriter):
    """A writer over an object with the guide's ``log_metrics(metrics, step, prefix, commit)``."""

    name = "metrics_logger"

    def __init__(self, target: Any) -> None:
        self.target = target
        self._warned: set[str] = set()
        super().__init__()

    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        self.target.log_metrics(dict(metrics), step=step, prefix="", commit=True)

    def _media(self, kind: str, tag: str, value: Any, step: int) -> None:
        method = getattr(self.target, f"log_{kind}", None)
        if callable(method):
            method(tag, value, step)
        elif kind not in self._warned:
            self._warned.add(kind)
            log.warning(
                "%s has no log_%s; %s records are not written there", type(self.target).__name__, kind, kind
            )

    def log_histogram(self, tag: str, values: Any, step: int) -> None:
        self._media("histogram", tag, values, step)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        self._media("image", tag, image, step)

    def flush(self) -> None:
        flush = getattr(self.target, "flush", None)
        if callable(flush):
            flush()


def _resolve_writer(
    writers: Writer | Sequence[Writer] | None,
    config: Mapping[str, Any] | str | os.PathLike[str] | None,
    metrics_logger: Any,
) -> Writer:
    if metrics_logger is not None:
        if writers is not None or config is not None:
            raise ValueError("metrics_logger: give either metrics_logger, writers or config, not several")
        if isinstance(metrics_logger, Writer):
            return metrics_logger
        if callable(getattr(metrics_logger, "log_metrics", None)):
            return _LogMetricsAdapter(metrics_logger)
        raise TypeError(
            f"metrics_logger: got {type(metrics_logger).__name__}; expected a Writer or an object with "
            "log_metrics(metrics, step, prefix, commit)"
        )
    if writers is not None:
        if config is not None:
            raise ValueError("writers: give either writers or config, not both")
        if isinstance(writers, Writer):
            return writers
        return MultiWriter(list(writers))
    return build_writers(config)


class HJEPAMetricsLogger:
    """The guide's H-JEPA logger: computes each metric group, writes it under a prefix, returns it.

    Writers come from ``writers`` (one or several), ``config`` (see :func:`writers.build_writers`),
    or the guide's ``metrics_logger`` (a writer, or an object with
    ``log_metrics(metrics, step, prefix, commit)``); with none of them, from ``HJEPA_METRICS_*``
    environment variables or TensorBoard + JSONL under ``runs/hjepa``.

    Every ``log_*`` method takes ``global_step`` (default: the last step logged) and ``prefix``
    (default ``"train/"``; ``"val/"`` for validation) and returns the dict it wrote, tags prefixed.
    The custom-scalars layout is written once at construction; alerts from the guide's thresholds
    are reported through ``logging`` once per crossing and collected in :attr:`alerts`.
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
        alerts: bool = True,
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
        self.distributed = distributed
        # Under torch.distributed only rank 0 writes: other ranks build no backend (no duplicate runs).
        is_writer = self._world()[0] == 0
        self.writer = _resolve_writer(writers, config, metrics_logger) if is_writer else BaseWriter()
        self.num_hierarchies = num_hierarchies
        self.hierarchy_weights = list(hierarchy_weights) if hierarchy_weights is not None else None
        self.prefix = prefix
        self.per_parameter_gradients = per_parameter_gradients
        self.max_similarity_rows = max_similarity_rows
        self.monitor = AlertMonitor(num_hierarchies=num_hierarchies, on_alert=on_alert) if alerts else None
        self.loss_history: deque[float] = deque(maxlen=loss_history_size)
        self.clip_calls = 0
        self.clipped_calls = 0
        self.step = 0
        if write_layout:
            self.writer.log_layout(guide_layout(num_hierarchies, prefix=prefix))
        define = getattr(self.writer, "define_summaries", None)
        if callable(define):  # e.g. W&B keeps the min of each loss and of each low-is-bad collapse tag
            define(summary_kinds(num_hierarchies, prefix))

    # -- plumbing
    @property
    def alerts(self) -> list[Alert]:
        """Every alert fired so far (empty when alerts are off)."""
        return list(self.monitor.fired) if self.monitor else []

    def _step(self, global_step: int | None) -> int:
        if global_step is not None:
            self.step = int(global_step)
        return self.step

    def _emit(
        self, values: Mapping[str, float], global_step: int | None, prefix: str | None
    ) -> dict[str, float]:
        step = self._step(global_step)
        p = self.prefix if prefix is None else prefix
        full = {p + tag: value for tag, value in values.items()}
        if full:
            self.writer.log_scalars(full, step)
            if self.monitor is not None:
                self.monitor.check(full, step)
        return full

    def log_scalars(
        self, metrics: Mapping[str, float], global_step: int | None = None, prefix: str | None = None
    ) -> dict[str, float]:
        """Any other scalars, under ``prefix`` like the rest."""
        return self._emit({k: float(v) for k, v in metrics.items()}, global_step, prefix)

    def log_histogram(self, tag: str, values: ArrayLike, global_step: int | None = None) -> None:
        """A histogram of ``values`` (any shape; non-finite values are dropped) under ``tag`` as given."""
        self.writer.log_histogram(tag, values, self._step(global_step))

    def log_image(self, tag: str, image: Any, global_step: int | None = None) -> None:
        """A matplotlib Figure, or an HW/CHW/HWC array or tensor (floats in [0, 1]), under ``tag``."""
        self.writer.log_image(tag, image, self._step(global_step))

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Run configuration / hyper-parameters."""
        self.writer.log_config(config)

    def _world(self) -> tuple[int, int]:
        return rank_and_world() if self.distributed else (0, 1)

    def _reduced(self, accumulators: Sequence[Any]) -> None:
        """Sum the accumulators' statistics over all ranks with one packed all-reduce (no-op alone)."""
        rank, world = self._world()
        if world == 1:
            return
        device = collective_device()
        groups = [acc.sync_parts(rank, world, device) for acc in accumulators]
        summed = iter(all_reduce_sum([part for group in groups for part in group]))
        for acc, group in zip(accumulators, groups, strict=True):
            acc.load_sync([next(summed) for _ in group])

    def _collapse_options(self) -> dict[str, int]:
        """Each rank samples with its own seed, so merged max-similarity samples do not repeat rows' keys."""
        return {"max_similarity_rows": self.max_similarity_rows, "seed": self._world()[0]}

    # -- the guide's methods
    def log_hierarchical_losses(
        self, loss_dict: Mapping[str, Scalar], global_step: int | None = None, prefix: str | None = None
    ) -> dict[str, float]:
        values = hierarchical_losses(
            loss_dict, num_hierarchies=self.num_hierarchies, hierarchy_weights=self.hierarchy_weights
        )
        return self._emit(values, global_step, prefix)

    def log_masking_statistics(
        self,
        mask: ArrayLike | Sequence[ArrayLike],
        num_patches: int | None = None,
        global_step: int | None = None,
        prefix: str | None = None,
    ) -> dict[str, float]:
        masked, batch, total = masked_totals(mask, num_patches)
        batches = torch.tensor(float(batch), dtype=torch.float64)
        if self._world()[1] > 1:  # the mean over the global batch
            masked, batches = all_reduce_sum([masked, batches])
        values = to_host({"masked": masked, "batch": batches})
        return self._emit(masking_from_totals(values["masked"], values["batch"], total), global_step, prefix)

    def log_prediction_quality(
        self,
        predictions: ArrayLike | Sequence[ArrayLike],
        targets: ArrayLike | Sequence[ArrayLike],
        global_step: int | None = None,
        prefix: str | None = None,
    ) -> dict[str, float]:
        """Per-level prediction quality. A flat list of ``k·L`` tensors (the guide's validation snippet
        extends one list with every batch's levels) is regrouped: entry ``i`` belongs to level ``i % L``."""
        preds = level_list(predictions, "predictions")
        targs = level_list(targets, "targets")
        n = self.num_hierarchies
        if not (len(preds) > n and len(preds) % n == 0 and len(targs) == len(preds)):
            self._check_levels(len(preds), "predictions")
        states = [PredictionAccumulator() for _ in range(n)]
        for i, (p, t) in enumerate(checked_level_pairs(preds, targs)):
            if p.numel() == 0:
                log.warning(
                    "prediction_quality: level %d is empty (shape %s); skipped", i % n, tuple(p.shape)
                )
            states[i % n].update(p, t)
        self._reduced(states)
        raw: dict[str, torch.Tensor | float] = {}
        for level, state in enumerate(states):
            raw.update(state.compute(level))
        return self._emit(to_host(raw), global_step, prefix)

    def log_collapse_metrics(
        self, features: ArrayLike, level: int = 0, global_step: int | None = None, prefix: str | None = None
    ) -> dict[str, float]:
        state = collapse_state(features, **self._collapse_options())
        if self.monitor is not None and state.dim is not None:
            self.monitor.feature_dims[level] = state.dim
        self._reduced([state])
        return self._emit(to_host(state.compute(level)), global_step, prefix)

    def log_gradient_flow(
        self, model: NamedTensors, global_step: int | None = None, prefix: str | None = None
    ) -> dict[str, float]:
        values = gradient_flow(model, per_parameter=self.per_parameter_gradients)
        return self._emit(values, global_step, prefix)

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
        values = gradient_clipping(
            global_norm_before,
            global_norm_after,
            clip_threshold,
            prior_clipped=self.clipped_calls,
            prior_calls=self.clip_calls,
        )
        self.clip_calls += 1
        self.clipped_calls += int(values["gradient/was_clipped"])
        return self._emit(values, global_step, prefix)

    def reset_clipping_stats(self) -> None:
        self.clip_calls = self.clipped_calls = 0

    def log_learning_rate(
        self, optimizer: Any, global_step: int | None = None, prefix: str | None = None
    ) -> dict[str, float]:
        return self._emit(learning_rate(optimizer), global_step, prefix)

    def log_hierarchy_feature_stats(
        self,
        predictions: ArrayLike | Sequence[ArrayLike],
        targets: ArrayLike | Sequence[ArrayLike] | None = None,
        global_step: int | None = None,
        prefix: str | None = None,
    ) -> dict[str, float]:
        self._check_levels(len(level_list(predictions, "predictions")), "predictions")
        return self._emit(hierarchy_feature_stats(predictions, targets), global_step, prefix)

    def log_training_stability(
        self,
        current_loss: Scalar,
        loss_history: Sequence[Scalar] | None = None,
        global_step: int | None = None,
        prefix: str | None = None,
    ) -> dict[str, float]:
        """Stability over ``loss_history`` (the caller's, current loss included as the guide does),
        or, without one, over the logger's own bounded history, to which ``current_loss`` is added."""
        if loss_history is None:
            self.loss_history.append(to_host({"loss": scalar_tensor(current_loss, "current_loss")})["loss"])
            loss_history = list(self.loss_history)
        return self._emit(training_stability(loss_history, current_loss), global_step, prefix)

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
        return self._emit(values, global_step, prefix)

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
        return self._emit(values, global_step, prefix)

    # -- validation
    def validation(self, prefix: str = "val/") -> ValidationAccumulator:
        """An accumulator for a validation pass: ``update`` per batch, ``log`` once at the end."""
        return ValidationAccumulator(self, prefix)

    def _check_levels(self, count: int, name: str) -> None:
        if count != self.num_hierarchies:
            raise ValueError(
                f"{name}: got {count} levels; expected num_hierarchies={self.num_hierarchies} "
                "(set num_hierarchies on the logger to match the model)"
            )

    # -- lifecycle
    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> HJEPAMetricsLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(self.writer, BaseWriter):
            self.writer.close(failed=exc is not None)
        else:
            self.writer.close()


class ValidationAccumulator:
    """Prediction and collapse statistics accumulated per level over all validation batches.

    The guide's snippet flattened levels into one list and computed collapse metrics from the last
    batch only; here every batch counts, per level, and one value per tag is logged at the end.
    """

    def __init__(self, logger: HJEPAMetricsLogger, prefix: str) -> None:
        self.logger = logger
        self.prefix = prefix
        n = logger.num_hierarchies
        self.predictions = [PredictionAccumulator() for _ in range(n)]
        self.collapse: dict[int, CollapseAccumulator] = {}
        self.batches = 0

    def update(
        self,
        predictions: Sequence[ArrayLike] | None = None,
        targets: Sequence[ArrayLike] | None = None,
        features: ArrayLike | Sequence[ArrayLike] | None = None,
    ) -> None:
        """Add one batch: per-level ``predictions``/``targets`` ``[B, N_l, D]`` and ``features`` for the
        collapse metrics (one tensor for level 0, or one per level)."""
        if (predictions is None) != (targets is None):
            raise ValueError("predictions and targets: give both or neither")
        if predictions is not None and targets is not None:
            pairs = checked_level_pairs(predictions, targets)
            self.logger._check_levels(len(pairs), "predictions")
            for state, (p, t) in zip(self.predictions, pairs, strict=True):
                state.update(p, t)
        if features is not None:
            for level, f in enumerate(level_list(features, "features")):
                x = as_features(f, f"features[{level}]")
                if self.logger.monitor is not None:
                    self.logger.monitor.feature_dims[level] = int(x.shape[-1])
                collapse = self.collapse.setdefault(
                    level, CollapseAccumulator(**self.logger._collapse_options())
                )
                collapse.update(x)
        self.batches += 1

    def log(self, global_step: int | None = None) -> dict[str, float]:
        """Write one value per tag under the prefix; returns what was written. Under torch.distributed
        every rank calls it, and the statistics of all ranks are summed with one all-reduce."""
        self.logger._reduced([*self.predictions, *(self.collapse[k] for k in sorted(self.collapse))])
        raw: dict[str, torch.Tensor | float] = {}
        for level, state in enumerate(self.predictions):
            raw.update(state.compute(level))
        for level, collapse in sorted(self.collapse.items()):
            if collapse.count:
                raw.update(collapse.compute(level))
        return self.logger._emit(to_host(raw), global_step, self.prefix)


HJEPATensorBoardLogger = HJEPAMetricsLogger
