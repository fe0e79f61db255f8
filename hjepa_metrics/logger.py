"""``HJEPAMetricsLogger``: the guide's logging methods, routing metric groups to writers.

Each ``log_*`` method is accumulator (or pure function) → compute → emit; computation lives in the
metric modules, cross-rank reduction in :mod:`.distributed`, writer plumbing in :mod:`writers`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from writers import Writer, writer_from
from writers.base import write_embedding

from ._params import NamedTensors
from ._tensor import ArrayLike, Scalar, level_list, scalar_tensor, to_host
from .accumulator import RankReduce, Reduction
from .alerts import CONFIG_KEY, Alert, AlertMonitor
from .collapse import CollapseAccumulator
from .distributed import reduce_accumulators
from .ema import EMAAccumulator
from .embedding import Projection, embedding_projection, finite_rows, label_codes, scatter_image
from .gradients import ClippingAccumulator, GradientFlowAccumulator
from .hierarchy import HierarchyAccumulator
from .layout import dashboard_layout, guide_layout
from .learning_rate import group_learning_rates, with_base_lr
from .losses import checked_weights, loss_inputs, losses_from_inputs
from .masking import MaskingAccumulator
from .performance import cuda_memory_metrics, timing_metrics
from .prediction import PredictionAccumulator, checked_level_pairs
from .registry import summary_kinds
from .router import MetricRouter
from .stability import Losses, LossHistory

if TYPE_CHECKING:
    from .validation import ValidationAccumulator

RankReduction = Literal["mean", "local"]

log = logging.getLogger(__name__)


class HJEPAMetricsLogger(MetricRouter):
    """The guide's H-JEPA logger: computes each metric group, writes it under a prefix, returns it.

    Writers come from ``writers`` (one or several), ``config`` (see :func:`writers.build_writers`),
    or the guide's ``metrics_logger`` (a writer, or an object with
    ``log_metrics(metrics, step, prefix, commit)``); with none of them, from ``HJEPA_METRICS_*``
    environment variables or TensorBoard + JSONL under ``runs/hjepa``.

    Every ``log_*`` method takes ``global_step`` (default: the last step logged) and ``prefix``
    (default ``"train/"``; ``"val/"`` for validation) and returns the dict it wrote, tags prefixed.
    The custom-scalars layout is written once at construction: ``layout="dashboard"`` (default) is the
    guide's charts for this machine (no CUDA memory chart off CUDA, one unit per chart, ``val/`` curves
    beside ``train/`` ones), ``"guide"`` the guide's exact file. Alerts from the guide's thresholds
    are reported through ``logging`` once per crossing, rate-limited per tag, and the last ones kept
    in :attr:`alerts` (``alerts=False`` turns them off; an :class:`AlertMonitor` sets the limits).

    Under ``torch.distributed`` every rank must make the same calls (only rank 0's writers write; a
    rank left waiting 60 s in a call says why). Each call reduces over ranks with one all-reduce, so
    every value describes the global batch: whole-batch statistics exactly; losses, learning rates,
    clipping norms and step times as the mean over ranks (``rank_reduction="local"`` keeps each
    rank's own, with no communication for them); batch sizes summed. Gradient and EMA statistics of
    DTensor parameters (FSDP2) are exact from the local shards. Gradient-flow modules are the first
    ``module_depth`` components of the parameter names once wrappers and a prefix shared by all
    names (``self.model.``) are dropped.
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
        layout: str = "dashboard",
        spectrum_every: int = 100,
        per_parameter_gradients: bool = False,
        max_similarity_rows: int = 1024,
        distributed: bool = True,
        rank_reduction: RankReduction = "mean",
        module_depth: int = 1,
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
        if rank_reduction not in ("mean", "local"):
            raise ValueError(f"rank_reduction: got {rank_reduction!r}; expected 'mean' or 'local'")
        if module_depth < 1:
            raise ValueError(f"module_depth: got {module_depth}; expected >= 1")
        self.per_parameter_gradients = per_parameter_gradients
        self.module_depth = module_depth
        self.rank_reduction = rank_reduction
        self.max_similarity_rows = max_similarity_rows
        self.losses = LossHistory(loss_history_size)
        self.clipping = ClippingAccumulator()
        if spectrum_every < 0:
            raise ValueError(f"spectrum_every: got {spectrum_every}; expected calls >= 0 (0: never)")
        self.spectrum_every = spectrum_every
        self._collapse_calls: dict[tuple[str, int], int] = {}
        if layout not in ("dashboard", "guide"):
            raise ValueError(f"layout: got {layout!r}; expected 'dashboard' or 'guide'")
        if write_layout:
            self.writer.log_layout(
                guide_layout(num_hierarchies, prefix=prefix)
                if layout == "guide"
                else dashboard_layout(num_hierarchies, prefix, cuda=torch.cuda.is_available())
            )
        self.writer.define_summaries(summary_kinds(num_hierarchies, prefix))
        if self.monitor is not None:  # so that `hjepa-metrics report` judges the run as it was judged live
            self.writer.log_config({CONFIG_KEY: {"alerts": self.monitor.settings()}})

    @property
    def loss_history(self) -> tuple[float, ...]:
        """The logger's own bounded loss history (oldest first), a snapshot."""
        return tuple(self.losses.values)

    def collapse_accumulator(self, level: int) -> CollapseAccumulator:
        """An empty collapse accumulator with this logger's options. Each rank samples with its own
        seed, so merged ``max_similarity`` samples do not repeat keys."""
        return CollapseAccumulator(level=level, max_similarity_rows=self.max_similarity_rows, seed=self.rank)

    # -- the guide's methods
    def _over_ranks(
        self, values: Mapping[str, torch.Tensor | float], reductions: Mapping[str, Reduction] | None = None
    ) -> dict[str, float]:
        """``values`` combined over ranks in one all-reduce (``rank_reduction``), read to the host.

        Alone, or with ``rank_reduction="local"``, there is nothing to combine: the values are read
        as they are, without the accumulator round trip (these calls are a few µs of work)."""
        world = self._world_to_combine()
        if world is not None:
            state = RankReduce(values, reductions=reductions)
            reduce_accumulators([state], world, warn_after=self.collective_warning)
            values = state.compute()
        return to_host(values)

    def _world_to_combine(self) -> tuple[int, int] | None:
        """``(rank, world_size)`` when scalars are combined over ranks (``rank_reduction="mean"`` and
        more than one rank), else ``None``."""
        world = self.world
        return world if world[1] > 1 and self.rank_reduction != "local" else None

    def log_hierarchical_losses(
        self, loss_dict: Mapping[str, Scalar], global_step: int | None = None, prefix: str | None = None
    ) -> dict[str, float]:
        """Losses of the global batch: each value is the mean over ranks (``rank_reduction``)."""
        inputs = self._over_ranks(loss_inputs(loss_dict, self.num_hierarchies))
        return self.emit(losses_from_inputs(inputs, self.hierarchy_weights), global_step, prefix)

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
        values = self.log_accumulated([state], global_step, prefix)
        key = (self.prefix if prefix is None else prefix, level)
        calls = self._collapse_calls[key] = self._collapse_calls.get(key, -1) + 1
        if self.spectrum_every and calls % self.spectrum_every == 0 and state.spectrum is not None:
            # the whole eigenspectrum, from the eigensolve the statistics already made
            self.log_histogram(f"{key[0]}collapse/level{level}_spectrum", state.spectrum, global_step)
        return values

    def log_embedding(
        self,
        features: ArrayLike,
        level: int = 0,
        global_step: int | None = None,
        prefix: str | None = None,
        metadata: Any = None,
        max_rows: int = 1000,
    ) -> Projection | None:
        """A sample of ``features`` ``[M, D]`` (or ``[..., D]``) for the backends' embedding views, and
        its 2-D PCA scatter.

        At most ``max_rows`` rows are drawn by the ``max_similarity`` sampler (private seed, the same
        rows however batches are split, merged over ranks). They go to
        ``collapse/level{l}_embedding`` (TensorBoard's projector, a W&B table, MLflow and JSONL TSV
        files) with ``metadata``, one label per row (strings, or numbers such as class ids; numbers
        only under torch.distributed). ``collapse/level{l}_pca`` is an image of the sample on the two
        principal axes of the exact Gram of *all* rows (the effective rank's matrix), coloured by
        label. Costs one Gram pass and a ``D×D`` eigensolve: call it every few hundred steps, or at
        validation. Rows holding NaN/inf are left out with a warning. Returns the
        :class:`~hjepa_metrics.embedding.Projection` (``None``, with a warning, when no row is finite).
        """
        if max_rows < 2:
            raise ValueError(f"max_rows: got {max_rows}; expected at least 2")
        codes, names = label_codes(metadata, self.world[1])
        state = CollapseAccumulator(
            level=level, max_similarity_rows=max_rows, seed=self.rank, labelled=codes is not None
        )
        rows, codes = finite_rows(features, codes)
        state.update(rows, codes)  # no row on this rank is fine: the reduction still takes place
        reduce_accumulators([state], self.world, warn_after=self.collective_warning)
        projection = embedding_projection(state, names)
        if projection is None:
            log.warning(
                "log_embedding: no finite row of level %d features on any rank; nothing logged", level
            )
            return None
        step = self._at(global_step)
        tag = f"{self.prefix if prefix is None else prefix}collapse/level{level}_"
        write_embedding(self.writer, tag + "embedding", projection.rows, step, projection.labels)
        self.writer.log_image(tag + "pca", scatter_image(projection.coords, projection.codes), step)
        return projection

    def log_gradient_flow(
        self, model: NamedTensors, global_step: int | None = None, prefix: str | None = None
    ) -> dict[str, float]:
        """Gradient statistics of the full gradients, sharded (FSDP2) or not; see
        :class:`~hjepa_metrics.gradients.GradientFlowAccumulator`."""
        state = GradientFlowAccumulator(
            per_parameter=self.per_parameter_gradients, module_depth=self.module_depth
        )
        state.update(model)
        return self.log_accumulated([state], global_step, prefix)

    def log_gradient_clipping(
        self,
        global_norm_before: Scalar,
        global_norm_after: Scalar,
        clip_threshold: float | None,
        global_step: int | None = None,
        prefix: str | None = None,
    ) -> dict[str, float]:
        """Clipping around ``clip_grad_norm_``; ``clipping_percentage`` counts every call since
        construction (or :meth:`reset_clipping_stats`). The norms (DTensor ones included) are the
        mean over ranks, so every rank counts the same clipped steps."""
        norms = self._over_ranks(
            {
                "before": scalar_tensor(global_norm_before, "global_norm_before"),
                "after": scalar_tensor(global_norm_after, "global_norm_after"),
            }
        )
        self.clipping.update(norms["before"], norms["after"], clip_threshold)
        return self.emit({k: float(x) for k, x in self.clipping.compute().items()}, global_step, prefix)

    def reset_clipping_stats(self) -> None:
        self.clipping.reset()

    def log_learning_rate(
        self, optimizer: Any, global_step: int | None = None, prefix: str | None = None
    ) -> dict[str, float]:
        return self.emit(with_base_lr(self._over_ranks(group_learning_rates(optimizer))), global_step, prefix)

    def log_hierarchy_feature_stats(
        self,
        predictions: ArrayLike | Sequence[ArrayLike],
        targets: ArrayLike | Sequence[ArrayLike] | None = None,
        global_step: int | None = None,
        prefix: str | None = None,
    ) -> dict[str, float]:
        """Feature statistics of the global batch per level."""
        self.check_levels(len(level_list(predictions, "predictions")), "predictions")
        if targets is not None:
            checked_level_pairs(predictions, targets)
        state = HierarchyAccumulator()
        state.update(predictions)
        return self.log_accumulated([state], global_step, prefix)

    def log_training_stability(
        self,
        current_loss: Scalar,
        loss_history: Losses | None = None,
        global_step: int | None = None,
        prefix: str | None = None,
    ) -> dict[str, float]:
        """Stability over ``loss_history`` (the caller's, current loss included as the guide does, used
        as given), or, without one, over the logger's own bounded history, to which ``current_loss``
        (the mean over ranks, ``rank_reduction``) is added."""
        if loss_history is not None:
            return self.log_accumulated([LossHistory.of(loss_history, current_loss)], global_step, prefix)

        current = self._over_ranks({"loss": scalar_tensor(current_loss, "current_loss")})
        self.losses.update(current["loss"])
        return self.emit({k: float(x) for k, x in self.losses.compute().items()}, global_step, prefix)

    def log_performance_metrics(
        self,
        batch_size: int,
        forward_time: float,
        backward_time: float,
        global_step: int | None = None,
        prefix: str | None = None,
        device: torch.device | str | None = None,
    ) -> dict[str, float]:
        """Timing of the global batch: times are the mean over ranks, ``samples_per_second`` the
        sum of the ranks' batches over that time, memory the highest of any rank (CUDA)."""
        timing = timing_metrics(batch_size, forward_time, backward_time)  # checks the inputs on every rank
        memory = cuda_memory_metrics(device)
        if self._world_to_combine() is None:
            return self.emit({**timing, **memory}, global_step, prefix)
        inputs = {
            "batch": float(batch_size),
            "forward": float(forward_time),
            "backward": float(backward_time),
        }
        v = self._over_ranks({**inputs, **memory}, {"batch": "sum", **dict.fromkeys(memory, "max")})
        timing = timing_metrics(v["batch"], v["forward"], v["backward"])
        return self.emit({**timing, **{k: v[k] for k in memory}}, global_step, prefix)

    def log_ema_dynamics(
        self,
        context_encoder: NamedTensors,
        target_encoder: NamedTensors,
        current_momentum: Scalar,
        target_momentum: Scalar,
        global_step: int | None = None,
        prefix: str | None = None,
    ) -> dict[str, float]:
        """EMA statistics over the full parameters, sharded (FSDP2) or not."""
        state = EMAAccumulator()
        state.update(context_encoder, target_encoder, current_momentum, target_momentum)
        return self.log_accumulated([state], global_step, prefix)

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
