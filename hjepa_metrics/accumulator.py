"""The one protocol of every stateful metric group (collapse, prediction, masking, clipping, losses).

Like torchmetrics' ``Metric``: ``update`` adds a batch, ``compute`` returns device-side values keyed by
tag (the caller makes the one host transfer), and the state a rank contributes to a cross-rank
reduction is a list of tensors whose elementwise SUM over ranks is the global state.
:func:`hjepa_metrics.distributed.reduce_accumulators` packs the parts of any number of accumulators
into one all-reduce. Each group's pure function is its accumulator updated once and computed.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

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
