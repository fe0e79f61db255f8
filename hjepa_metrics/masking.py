"""Masking statistics: ``masking/*``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._tensor import ArrayLike, as_tensor, to_host


def masking_statistics(
    mask: ArrayLike | Sequence[ArrayLike], *, num_patches: int | None = None
) -> dict[str, float]:
    """Mean number of masked (predicted) patches per sample, its ratio, and the unmasked count.

    ``mask`` is ``[B, N]`` (nonzero/True = masked) or ``[B, K, N]`` for K target blocks, which are
    OR-ed over K; a list of ``[B, N]`` masks is treated as K blocks. ``num_patches`` defaults to N.
    """
    masked_total, batch, total = masked_totals(mask, num_patches)
    out = to_host({"masked": masked_total})
    return masking_from_totals(out["masked"], batch, total)


def masking_from_totals(masked_total: float, batch: float, num_patches: int) -> dict[str, float]:
    """The ``masking/*`` tags from the masked-patch total over ``batch`` samples."""
    mean = masked_total / batch
    return {
        "masking/mask_ratio": mean / num_patches,
        "masking/num_masked_patches": mean,
        "masking/num_unmasked_patches": num_patches - mean,
    }


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
