"""Feature statistics per hierarchy level: ``hierarchy/level{l}_*``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._tensor import ArrayLike, accumulate_dtype, as_features, compute_dtype, level_list, to_host
from .prediction import checked_level_pairs


def hierarchy_feature_stats(
    predictions: ArrayLike | Sequence[ArrayLike],
    targets: ArrayLike | Sequence[ArrayLike] | None = None,
) -> dict[str, float]:
    """Mean, std (unbiased, all elements), range, mean token L2 norm and token count of ``predictions[l]``.

    ``predictions[l]`` is ``[B, N_l, D]``; ``num_patches`` is ``N_l`` (the second-to-last dim).
    ``targets`` (the guide passes them) is only checked for a matching level count and shapes.
    ``health/hierarchy_level{l}_nonfinite`` counts tokens whose L2 norm is not finite (a NaN/inf
    element, or a norm that overflows float32).
    """
    preds = level_list(predictions, "predictions")
    if targets is not None:
        checked_level_pairs(predictions, targets)
    raw: dict[str, torch.Tensor | float] = {}
    for level, p_in in enumerate(preds):
        p = as_features(p_in, f"predictions[{level}]")
        tag = f"hierarchy/level{level}_"
        raw[tag + "num_patches"] = float(p.shape[-2])
        if p.numel() == 0:
            continue
        x = p.to(compute_dtype(p))
        acc = accumulate_dtype(x.device)
        raw[tag + "feat_mean"] = x.to(acc).mean()
        raw[tag + "feat_std"] = x.to(acc).std() if x.numel() > 1 else float("nan")
        raw[tag + "feat_range"] = x.max() - x.min()
        norms = torch.linalg.vector_norm(x, dim=-1)
        raw[tag + "feat_norm"] = norms.to(acc).mean()
        # a NaN/inf element, or a token norm beyond the compute type's range: never a silent inf
        raw[f"health/hierarchy_level{level}_nonfinite"] = (~torch.isfinite(norms)).sum()
    return to_host(raw)
