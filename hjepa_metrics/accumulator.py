"""The one protocol of every stateful metric group (collapse, prediction, masking, clipping, losses).

Like torchmetrics' ``Metric``: ``update`` adds a batch, ``compute`` returns device-side values keyed by
tag (the caller makes the one host transfer), and the state a rank contributes to a cross-rank
reduction is a list of tensors whose elementwise SUM over ranks is the global state.
:func:`hjepa_metrics.distributed.reduce_accumulators` packs the parts of any number of accumulators
into one all-reduce. Each group's pure function is its accumulator updated once and computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import torch


def slots(value: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """``[world, *value.shape]`` zeros with ``value`` in row ``rank``: a SUM over ranks then holds
    every rank's value, for a min, a max or a concatenation."""
    out = torch.zeros((world, *value.shape), dtype=value.dtype, device=value.device)
    out[rank] = value
    return out


RawValues = dict[str, torch.Tensor | float]


@runtime_checkable
class Accumulator(Protocol):
    def update(self, *args: Any, **kwargs: Any) -> None:
        """Add one batch (or one call's values)."""

    def compute(self) -> RawValues:
        """Values keyed by tag without prefix; tensors stay on their device."""

    def sync_parts(self, rank: int, world: int, device: torch.device) -> list[torch.Tensor]:
        """This rank's state as tensors on ``device`` whose SUM over ranks is the global state
        (values needing a min, max or concatenation go in per-rank slots). May be empty."""

    def load_sync(self, parts: list[torch.Tensor]) -> None:
        """Replace the state with the summed :meth:`sync_parts` of every rank."""


class RankLocal:
    """Base of accumulators whose state stays on each rank (nothing to share in the reduction)."""

    def sync_parts(self, rank: int, world: int, device: torch.device) -> list[torch.Tensor]:
        del rank, world, device
        return []

    def load_sync(self, parts: list[torch.Tensor]) -> None:
        del parts


Reduction = Literal["mean", "sum", "max"]


class RankReduce:
    """Scalars combined over ranks in the call's one all-reduce: each value with its own reduction
    (``mean`` by default, ``sum`` for counts such as a batch size, ``max`` for a peak).

    ``compute()`` returns the combined values under the keys they came with.
    """

    def __init__(
        self,
        values: Mapping[str, torch.Tensor | float],
        *,
        reductions: Mapping[str, Reduction] | None = None,
    ) -> None:
        self.values: RawValues = dict(values)
        self.reductions = {k: (reductions or {}).get(k, "mean") for k in self.values}

    def update(self, values: Mapping[str, torch.Tensor | float]) -> None:
        self.values.update(values)

    def compute(self) -> RawValues:
        return dict(self.values)

    def sync_parts(self, rank: int, world: int, device: torch.device) -> list[torch.Tensor]:
        if not self.values:
            return []
        keys = list(self.values)
        packed = torch.stack(
            [torch.as_tensor(self.values[k], dtype=torch.float64, device=device).reshape(()) for k in keys]
        )
        scale = [1.0 / world if self.reductions[k] == "mean" else 1.0 for k in keys]
        parts = [packed * torch.tensor(scale, dtype=torch.float64, device=device)]
        peaks = [i for i, k in enumerate(keys) if self.reductions[k] == "max"]
        if peaks:  # a max travels in per-rank slots of the same SUM
            parts.append(slots(packed[peaks], rank, world))
        return parts

    def load_sync(self, parts: list[torch.Tensor]) -> None:
        keys = list(self.values)
        summed = parts[0]
        peaks = [i for i, k in enumerate(keys) if self.reductions[k] == "max"]
        combined = {k: summed[i] for i, k in enumerate(keys)}
        if peaks:
            highest = parts[1].max(dim=0).values
            combined.update({keys[i]: highest[j] for j, i in enumerate(peaks)})
        self.values = dict(combined)
