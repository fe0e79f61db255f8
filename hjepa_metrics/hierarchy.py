"""Feature statistics per hierarchy level: ``hierarchy/level{l}_*``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from . import _tensor
from ._tensor import ArrayLike, accumulate_dtype, as_features, compute_dtype, level_list, to_host
from .accumulator import RawValues, slots
from .prediction import checked_level_pairs


class HierarchyAccumulator:
    """Mean, std, range and token-norm statistics of each level's predicted features over any number
    of batches and ranks (for the global batch under ``torch.distributed``).

    Per level it keeps the element count, ``Σx`` and ``M2 = Σ(x − x̄)²`` in float64 (merged across
    batches and ranks exactly: ``M2 = Σ M2_r + Σ n_r x̄_r² − n x̄²``), the min and max, and the
    token-norm sum, count and non-finite count. No float64 copy of the features is made. On an
    accelerator the state stays on the device (one transfer per logging call); on the CPU, where
    reading memory is no transfer, it is Python floats (a few float operations where tensors took
    dozens of tiny kernels).
    """

    def __init__(self) -> None:
        self.levels: dict[int, _LevelState] = {}
        self.num_patches: dict[int, float] = {}

    def update(self, predictions: ArrayLike | Sequence[ArrayLike]) -> None:
        for level, p_in in enumerate(level_list(predictions, "predictions")):
            p = as_features(p_in, f"predictions[{level}]")
            self.num_patches[level] = float(p.shape[-2])
            if p.numel() == 0:
                continue
            new = _level_stats(p.to(compute_dtype(p)))
            old = self.levels.get(level)
            self.levels[level] = new if old is None else _merged(old, new)

    def sync_parts(self, rank: int, world: int, device: torch.device) -> list[torch.Tensor]:
        parts = []
        for level in sorted(self.levels):
            sums, extremes = (_as_tensor(part, device) for part in self.levels[level])
            parts += [sums, slots(extremes, rank, world)]
        return parts

    def load_sync(self, parts: list[torch.Tensor]) -> None:
        for i, level in enumerate(sorted(self.levels)):
            # every rank fills its own row of the extremes (each has every level it syncs)
            self.levels[level] = (parts[2 * i], parts[2 * i + 1].max(dim=0).values)

    def compute(self) -> RawValues:
        raw: RawValues = {}
        for level, patches in sorted(self.num_patches.items()):
            tag = f"hierarchy/level{level}_"
            raw[tag + "num_patches"] = patches
            state = self.levels.get(level)
            if state is None:
                continue
            (n, total, m2, n_mean_sq, norm_sum, tokens, bad), (neg_low, high) = state
            mean = total / n
            spread = m2 + n_mean_sq - n * mean * mean  # M2 of all parts together
            raw[tag + "feat_mean"] = mean
            raw[tag + "feat_std"] = _std(spread, n)
            raw[tag + "feat_range"] = high + neg_low
            raw[tag + "feat_norm"] = norm_sum / tokens
            # a NaN/inf element, or a token norm beyond the compute type's range: never a silent inf
            raw[f"health/hierarchy_level{level}_nonfinite"] = bad
        return raw


# per level: float64 [n, Σx, M2, n·x̄², Σ token norms, tokens, non-finite tokens] and [-min, max],
# as a float64 tensor each on an accelerator (or after a sync), as Python floats on the CPU
_LevelState = tuple[Any, Any]


def _level_stats(x: torch.Tensor) -> _LevelState:
    """One level's state (``n·x̄²`` is what merges M2 across parts)."""
    n = float(x.numel())
    # x.var accumulates in double on the CPU; the result is cast, never the features
    var = x.var(unbiased=False)
    norms = torch.linalg.vector_norm(x, dim=-1)
    low, high = torch.aminmax(x)
    if x.is_cpu and not _tensor.PACK_CPU_READS:
        # the float32 sum is pairwise (~1e-7 relative): a sum(dtype=float64) would first copy the
        # whole tensor to float64, 10x the cost of the pass
        total, norm_sum = x.sum().item(), norms.sum(dtype=torch.float64).item()
        # a finite sum of non-negative norms means every norm is finite: no pass to count them
        bad = 0.0 if math.isfinite(norm_sum) else float((~torch.isfinite(norms)).sum())
        tokens = float(norms.numel())
        sums = [n, total, var.item() * n, total * total / n, norm_sum, tokens, bad]
        return sums, [-low.item(), high.item()]
    acc = accumulate_dtype(x.device)
    # accelerators cast on load: they sum in float64 with no copy (the CPU's packed path casts the sum)
    total_t = x.sum().to(acc) if x.is_cpu else x.sum(dtype=acc)
    parts = [
        torch.tensor(n, dtype=acc, device=x.device),
        total_t,
        var.to(acc) * n,
        total_t * total_t / n,
        norms.sum(dtype=acc),
        torch.tensor(float(norms.numel()), dtype=acc, device=x.device),
        (~torch.isfinite(norms)).sum().to(acc),
    ]
    return torch.stack(parts), torch.stack([-low, high]).to(acc)


def _merged(old: _LevelState, new: _LevelState) -> _LevelState:
    (old_sums, old_extremes), (new_sums, new_extremes) = old, new
    if isinstance(old_sums, list) and isinstance(new_sums, list):
        return [a + b for a, b in zip(old_sums, new_sums, strict=True)], [
            _nan_max(a, b) for a, b in zip(old_extremes, new_extremes, strict=True)
        ]
    device = old_sums.device if isinstance(old_sums, torch.Tensor) else new_sums.device
    old_sums, old_extremes, new_sums, new_extremes = (
        _as_tensor(part, device) for part in (old_sums, old_extremes, new_sums, new_extremes)
    )
    return old_sums + new_sums, torch.maximum(old_extremes, new_extremes)


def _nan_max(a: float, b: float) -> float:
    """``torch.maximum`` of two floats: NaN if either is."""
    return a if a != a or a >= b else b


def _as_tensor(part: Any, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(part, dtype=accumulate_dtype(device), device=device)


def _std(spread: Any, n: Any) -> Any:
    """Unbiased std from ``M2`` and the count; one element has no spread: NaN (on the device, decided
    without a host read)."""
    if isinstance(spread, torch.Tensor):
        return torch.where(n > 1, (spread.clamp_min(0) / (n - 1)).sqrt(), torch.nan)
    return math.sqrt(max(spread, 0.0) / (n - 1)) if n > 1 else math.nan


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
    if targets is not None:
        checked_level_pairs(predictions, targets)
    state = HierarchyAccumulator()
    state.update(predictions)
    return to_host(state.compute())
