"""Masking statistics: ``masking/*``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._tensor import ArrayLike, as_tensor, to_host
from .accumulator import RawValues


class MaskingAccumulator:
    """Masked-patch totals over any number of masks (batches or ranks): ``Σ_b Σ_n mask[b, n]`` and B.

    ``mask`` is ``[B, N]`` (nonzero/True = masked) or ``[B, K, N]`` for K target blocks, which are
    OR-ed over K; a list of ``[B, N]`` masks is treated as K blocks. ``num_patches`` defaults to N
    and must be the same for every update.
    """

    def __init__(self) -> None:
        self.masked: torch.Tensor | None = None  # float64 0-d, on the mask's device
        self.samples: torch.Tensor | None = None
        self.num_patches: int | None = None

    def update(self, mask: ArrayLike | Sequence[ArrayLike], num_patches: int | None = None) -> None:
        masked, batch, total = masked_totals(mask, num_patches)
        if self.num_patches is not None and total != self.num_patches:
            raise ValueError(f"num_patches: got {total}; expected {self.num_patches} as in earlier masks")
        self.num_patches = total
        samples = torch.tensor(float(batch), dtype=torch.float64, device=masked.device)
        if self.masked is None or self.samples is None:
            self.masked, self.samples = masked, samples
        else:
            self.masked, self.samples = self.masked + masked, self.samples + samples

    def sync_parts(self, rank: int, world: int, device: torch.device) -> list[torch.Tensor]:
        del rank, world
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return [t.to(device) if t is not None else zero for t in (self.masked, self.samples)]

    def load_sync(self, parts: list[torch.Tensor]) -> None:
        self.masked, self.samples = parts

    def compute(self) -> RawValues:
        if self.masked is None or self.samples is None or self.num_patches is None:
            return {}
        mean = self.masked / self.samples
        return {
            "masking/mask_ratio": mean / self.num_patches,
            "masking/num_masked_patches": mean,
            "masking/num_unmasked_patches": self.num_patches - mean,
        }


def masking_statistics(
    mask: ArrayLike | Sequence[ArrayLike], *, num_patches: int | None = None
) -> dict[str, float]:
    """Mean number of masked (predicted) patches per sample, its ratio, and the unmasked count.

    ``mask`` is ``[B, N]`` (nonzero/True = masked) or ``[B, K, N]`` for K target blocks, which are
    OR-ed over K; a list of ``[B, N]`` masks is treated as K blocks. ``num_patches`` defaults to N.
    """
    state = MaskingAccumulator()
    state.update(mask, num_patches)
    return to_host(state.compute())


def masked_totals(
    mask: ArrayLike | Sequence[ArrayLike], num_patches: int | None = None
) -> tuple[torch.Tensor, int, int]:
    """``(masked patches summed over the batch (a float64 0-d tensor), B, num_patches)``."""
    if isinstance(mask, Sequence) and not isinstance(mask, (str, bytes)):
        if not mask:
            raise ValueError("mask: got an empty list; expected [B, N] masks")
        parts = [as_tensor(m, f"mask[{i}]") for i, m in enumerate(mask)]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            raise ValueError(
                f"mask: list entries have different shapes {sorted(shapes)}; expected one [B, N] shape"
            )
        m = torch.stack(parts, dim=1)
    else:
        m = as_tensor(mask, "mask")
    if m.dim() not in (2, 3):
        raise ValueError(f"mask: got shape {tuple(m.shape)}; expected [B, N] or [B, K, N]")
    if m.shape[0] == 0 or m.shape[-1] == 0:
        raise ValueError(f"mask: got shape {tuple(m.shape)}; expected a non-empty batch and patch dim")
    masked = m != 0
    if masked.dim() == 3:
        masked = masked.any(dim=1)
    n = int(masked.shape[-1])
    total = n if num_patches is None else int(num_patches)
    if total < n:
        raise ValueError(f"num_patches: got {total}; expected at least the mask's patch dim {n}")
    return masked.sum(dtype=torch.float64), int(masked.shape[0]), total
