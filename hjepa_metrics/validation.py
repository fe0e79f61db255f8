"""Validation: prediction and collapse statistics accumulated over every batch, logged once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._tensor import ArrayLike, level_list
from .accumulator import Accumulator
from .collapse import CollapseAccumulator
from .prediction import PredictionAccumulator

if TYPE_CHECKING:
    from .logger import HJEPAMetricsLogger


class ValidationAccumulator:
    """Prediction and collapse statistics accumulated per level over all validation batches.

    The guide's snippet flattened levels into one list and computed collapse metrics from the last
    batch only; here every batch counts, per level, and one value per tag is logged at the end.
    """

    def __init__(self, logger: HJEPAMetricsLogger, prefix: str = "val/") -> None:
        self.logger = logger
        self.prefix = prefix
        self.predictions = PredictionAccumulator(logger.num_hierarchies)
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
            self.logger.check_levels(len(level_list(predictions, "predictions")), "predictions")
            self.predictions.update(predictions, targets)
        if features is not None:
            for level, f in enumerate(level_list(features, "features")):
                if level not in self.collapse:
                    self.collapse[level] = self.logger.collapse_accumulator(level)
                self.collapse[level].update(f)
        self.batches += 1

    def log(self, global_step: int | None = None) -> dict[str, float]:
        """Write one value per tag under the prefix; returns what was written. Under torch.distributed
        every rank calls it, and the statistics of all ranks are summed with one all-reduce."""
        states: list[Accumulator] = [self.predictions, *(self.collapse[k] for k in sorted(self.collapse))]
        return self.logger.log_accumulated(states, global_step, self.prefix)
