"""Validation: prediction and collapse statistics accumulated over every batch, logged once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ._tensor import ArrayLike, as_tensor, level_list
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
        valid: ArrayLike | None = None,
    ) -> None:
        """Add one batch: per-level ``predictions``/``targets`` ``[B, N_l, D]`` and ``features`` for the
        collapse metrics (one tensor for level 0, or one per level, each ``[B, ...]`` when ``valid``
        is given). ``valid`` (``[B]``, bool or 0/1) says which samples count: the copies that
        ``DistributedSampler`` pads the last batches with (see :func:`sampler_valid_mask`) are left
        out, so the statistics are those of the dataset, whatever the number of ranks."""
        if (predictions is None) != (targets is None):
            raise ValueError("predictions and targets: give both or neither")
        if valid is not None:
            keep = as_tensor(valid, "valid").reshape(-1) != 0
            if predictions is not None and targets is not None:
                predictions = _rows(predictions, keep, "predictions")
                targets = _rows(targets, keep, "targets")
                if not bool(keep.any()):  # padding only: nothing to add (and no empty-level warning)
                    predictions = targets = None
            if features is not None:
                features = _rows(features, keep, "features")
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


def _rows(levels: ArrayLike | Sequence[ArrayLike], keep: torch.Tensor, name: str) -> list[torch.Tensor]:
    out = []
    for level, x in enumerate(level_list(levels, name)):
        t = as_tensor(x, f"{name}[{level}]")
        if t.dim() == 0 or t.shape[0] != keep.numel():
            raise ValueError(
                f"{name}[{level}]: got shape {tuple(t.shape)}; expected a first dim of {keep.numel()} "
                "(one row per sample of `valid`)"
            )
        out.append(t[keep.to(t.device)])
    return out


def sampler_valid_mask(sampler: Any) -> torch.Tensor:
    """``[samples on this rank]`` bools, False for the copies a ``DistributedSampler`` (as used by
    Lightning and plain DDP) adds so that every rank gets as many samples; all True for any other
    sampler. Slice it per batch: ``valid[i * batch_size : i * batch_size + len(batch)]``.

    ``DistributedSampler`` pads the index list to ``ranks · ceil(N / ranks)`` and gives rank ``r``
    the positions ``r, r + ranks, ...``; a position at or beyond ``N`` is a copy.
    """
    count = len(sampler)
    rank, replicas = getattr(sampler, "rank", None), getattr(sampler, "num_replicas", None)
    dataset = getattr(sampler, "dataset", None)
    if rank is None or replicas is None or dataset is None or getattr(sampler, "drop_last", False):
        return torch.ones(count, dtype=torch.bool)
    positions = int(rank) + int(replicas) * torch.arange(count)
    valid: torch.Tensor = positions < len(dataset)
    return valid
