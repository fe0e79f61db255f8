"""Feature statistics per hierarchy level: ``hierarchy/level{l}_*``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._tensor import ArrayLike, accumulate_dtype, as_features, compute_dtype, level_list, to_host
from .accumulator import RawValues, slots
from .prediction import checked_level_pairs


class HierarchyAccumulator:
    """Mean, std, range and token-norm statistics of each level's predicted features over any number
    of batches and ranks (for the global batch under ``torch.distributed``).

    Per level it keeps the element count, ``Σx`` and ``M2 = Σ(x − x̄)²`` in float64 (merged across
    batches and ranks exactly: ``M2 = Σ M2_r + Σ n_r x̄_r² − n x̄²``), the min and max, and the
    token-norm sum, count and non-finite count. No float64 copy of the features is made.
    """

    def __init__(self) -> None:
        self.levels: dict[int, dict[str, torch.Tensor]] = {}
        self.num_patches: dict[int, float] = {}

    def update(self, predictions: ArrayLike | Sequence[ArrayLike]) -> None:
        for level, p_in in enumerate(level_list(predictions, "predictions")):
            p = as_features(p_in, f"predictions[{level}]")
            self.num_patches[level] = float(p.shape[-2])
            if p.numel() == 0:
                continue
            x = p.to(compute_dtype(p))
            acc = accumulate_dtype(x.device)
            n = float(x.numel())
            # on the CPU, sum(dtype=float64) first copies the whole tensor to float64 (10x the cost of
            # the pass): its own cascade (pairwise) summation keeps float32 sums to ~1e-7 relative;
            # accelerators cast on load, so they sum in float64 with no copy
            total = x.sum().to(acc) if x.device.type == "cpu" else x.sum(dtype=acc)
            # x.var accumulates in double on the CPU; the result is cast, never the features
            m2 = x.var(unbiased=False).to(acc) * n
            norms = torch.linalg.vector_norm(x, dim=-1)
            low, high = torch.aminmax(x)
            stats = {
                "sums": torch.stack(
                    [
                        torch.tensor(n, dtype=acc, device=x.device),
                        total,
                        m2,
                        total * total / n,  # n·x̄², for merging M2 across parts
                        norms.sum(dtype=acc),
                        torch.tensor(float(norms.numel()), dtype=acc, device=x.device),
                        (~torch.isfinite(norms)).sum().to(acc),
                    ]
                ),
                "min": low.to(acc),
                "max": high.to(acc),
            }
            self.levels[level] = _merged(self.levels.get(level), stats)

    def sync_parts(self, rank: int, world: int, device: torch.device) -> list[torch.Tensor]:
        parts = []
        for level in sorted(self.levels):
            s = self.levels[level]
            parts += [s["sums"].to(device), slots(torch.stack([-s["min"], s["max"]]).to(device), rank, world)]
        return parts

    def load_sync(self, parts: list[torch.Tensor]) -> None:
        for i, level in enumerate(sorted(self.levels)):
            sums, extremes = parts[2 * i], parts[2 * i + 1]
            present = extremes.abs().sum(dim=1) > 0  # ranks that had this level
            reached = extremes[present] if bool(present.any()) else extremes
            self.levels[level] = {"sums": sums, "min": -reached[:, 0].max(), "max": reached[:, 1].max()}

    def compute(self) -> RawValues:
        raw: RawValues = {}
        for level, patches in sorted(self.num_patches.items()):
            tag = f"hierarchy/level{level}_"
            raw[tag + "num_patches"] = patches
            s = self.levels.get(level)
            if s is None:
                continue
            n, total, m2, n_mean_sq, norm_sum, tokens, bad = s["sums"]
            mean = total / n
            spread = m2 + n_mean_sq - n * mean * mean  # M2 of all parts together
            raw[tag + "feat_mean"] = mean
            # one element has no spread: NaN (decided on the device, without a host read)
            raw[tag + "feat_std"] = torch.where(n > 1, (spread.clamp_min(0) / (n - 1)).sqrt(), torch.nan)
            raw[tag + "feat_range"] = s["max"] - s["min"]
            raw[tag + "feat_norm"] = norm_sum / tokens
            # a NaN/inf element, or a token norm beyond the compute type's range: never a silent inf
            raw[f"health/hierarchy_level{level}_nonfinite"] = bad
        return raw


def _merged(old: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if old is None:
        return new
    return {
        "sums": old["sums"] + new["sums"].to(old["sums"].device),
        "min": torch.minimum(old["min"], new["min"].to(old["min"].device)),
        "max": torch.maximum(old["max"], new["max"].to(old["max"].device)),
    }


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
