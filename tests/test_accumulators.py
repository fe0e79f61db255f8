"""Every stateful metric group: the accumulator over batches equals its pure function on all the data,
and all of them follow the one protocol that ``reduce_accumulators`` packs into one collective."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import hjepa_metrics as hm
from hjepa_metrics._tensor import to_host
from hjepa_metrics.accumulator import Accumulator
from hjepa_metrics.collapse import CollapseAccumulator
from hjepa_metrics.gradients import ClippingAccumulator
from hjepa_metrics.masking import MaskingAccumulator
from hjepa_metrics.prediction import PredictionAccumulator
from hjepa_metrics.stability import LossHistory

GEN = torch.Generator().manual_seed(5)


def _agree(got: dict[str, Any], want: dict[str, float], rel: float = 1e-12) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=rel, abs=1e-12, nan_ok=True), key


def test_collapse_batches_equal_the_concatenation() -> None:
    batches = [torch.randn(n, 12, generator=GEN) for n in (700, 1, 333, 1200)]
    acc = CollapseAccumulator(level=1, max_similarity_rows=256)
    for b in batches:
        acc.update(b)
    want = hm.collapse_metrics(torch.cat(batches), level=1, max_similarity_rows=256)
    _agree(to_host(acc.compute()), want)


def test_prediction_batches_equal_the_concatenation() -> None:
    preds = [[torch.randn(4, n, 6, generator=GEN) for n in (9, 4, 1)] for _ in range(3)]
    targs = [[torch.randn(4, n, 6, generator=GEN) for n in (9, 4, 1)] for _ in range(3)]
    acc = PredictionAccumulator()
    for p, t in zip(preds, targs, strict=True):
        acc.update(p, t)
    whole = hm.prediction_quality(
        [torch.cat([p[lvl] for p in preds]) for lvl in range(3)],
        [torch.cat([t[lvl] for t in targs]) for lvl in range(3)],
    )
    _agree(to_host(acc.compute()), whole, rel=1e-6)  # float32 token cosines, float64 sums


def test_prediction_flat_list_is_regrouped_by_level() -> None:
    preds = [torch.randn(2, n, 5, generator=GEN) for n in (6, 3)] * 2
    targs = [torch.randn(2, n, 5, generator=GEN) for n in (6, 3)] * 2
    acc = PredictionAccumulator(num_levels=2)
    acc.update(preds, targs)
    whole = hm.prediction_quality(
        [torch.cat(preds[0::2]), torch.cat(preds[1::2])], [torch.cat(targs[0::2]), torch.cat(targs[1::2])]
    )
    _agree(to_host(acc.compute()), whole, rel=1e-6)


def test_masking_batches_equal_the_concatenation() -> None:
    masks = [torch.rand(b, 3, 16, generator=GEN) > 0.6 for b in (4, 7, 1)]
    acc = MaskingAccumulator()
    for m in masks:
        acc.update(m)
    whole = hm.masking_statistics(torch.cat(masks))
    _agree(to_host(acc.compute()), whole)
    # the analytic value: mean over samples of the OR over blocks, over 16 patches
    union = torch.cat(masks).any(dim=1).double()
    assert whole["masking/mask_ratio"] == pytest.approx(float(union.sum(dim=1).mean()) / 16, rel=1e-12)


def test_clipping_calls_equal_the_pure_function_with_prior_counts() -> None:
    norms = [(2.0, 1.0), (0.5, 0.5), (3.0, 1.0), (0.1, 0.1)]
    acc = ClippingAccumulator()
    for i, (before, after) in enumerate(norms):
        acc.update(before, after, 1.0)
        clipped = sum(b > 1.0 for b, _ in norms[:i])
        want = hm.gradient_clipping(before, after, 1.0, prior_clipped=clipped, prior_calls=i)
        _agree(to_host(acc.compute()), want)
    assert acc.compute()["gradient/clipping_percentage"] == 50.0  # 2 of 4 calls


def test_loss_history_equals_the_pure_function_on_the_whole_history() -> None:
    losses = np.abs(np.random.default_rng(0).normal(1.0, 0.2, 60))
    acc = LossHistory(maxlen=None)
    for value in losses[:30]:
        acc.update(torch.tensor(value))
    acc.update(losses[30:])  # a numpy array of the rest
    want = hm.training_stability(list(losses))
    _agree(to_host(acc.compute()), want)
    # an independent oracle: numpy's polyfit slope over the last 20, population std of the last 50
    assert want["stability/loss_trend_slope"] == pytest.approx(np.polyfit(np.arange(20), losses[-20:], 1)[0])
    assert want["stability/loss_smoothness"] == pytest.approx(np.std(losses[-50:]))
    assert hm.training_stability(torch.tensor(losses)) == pytest.approx(want)  # a 1-D tensor history


@pytest.mark.parametrize(
    "make",
    [
        lambda: CollapseAccumulator(),
        lambda: PredictionAccumulator(),
        lambda: MaskingAccumulator(),
        lambda: ClippingAccumulator(),
        lambda: LossHistory(),
    ],
)
def test_every_group_follows_the_protocol(make: Callable[[], Any]) -> None:
    assert isinstance(make(), Accumulator)


def test_reduce_is_a_no_op_on_one_process() -> None:
    from hjepa_metrics.distributed import reduce_accumulators

    acc = MaskingAccumulator()
    acc.update(torch.ones(2, 4, dtype=torch.bool))
    reduce_accumulators([acc, ClippingAccumulator()], (0, 1))
    assert to_host(acc.compute())["masking/mask_ratio"] == 1.0


@pytest.mark.parametrize("maxlen", [1, 7, 60, None])
def test_loss_history_window_against_numpy_brute_force(maxlen: int | None) -> None:
    """Single losses and bulk updates (a caller's history, rebuilt in one pass), with NaN and ±inf, a
    window that slides past its extremes, repeats and zeros: after every update the statistics equal
    numpy's over the last ``maxlen`` losses."""
    rng = np.random.default_rng(3)
    acc = LossHistory(maxlen=maxlen)
    seen: list[float] = []
    special = [math.nan, math.inf, -math.inf, 0.0, 1.5, 1.5]
    for update in range(400):
        if update == 100:  # a bulk update with nothing finite
            losses = [math.nan] * 40
            acc.update(losses)
        elif update % 50 == 25:  # a bulk update, past the rebuild size
            losses = list(rng.normal(1.0, 0.3, 200 + update))
            losses[::17] = [special[i % len(special)] for i in range(len(losses[::17]))]
            acc.update(np.array(losses))
        else:
            losses = [special[update % len(special)] if update % 5 == 0 else float(rng.normal(1.0, 0.3))]
            acc.update(losses[0])
        seen += losses
        window = np.array(seen[-maxlen:] if maxlen else seen)
        finite = window[np.isfinite(window)]
        got = to_host(acc.compute())
        assert got["stability/nonfinite_count"] == window.size - finite.size
        if finite.size < 2:
            assert set(got) == {"stability/nonfinite_count"}
            continue
        assert got["stability/loss_smoothness"] == pytest.approx(np.std(finite[-50:]), rel=1e-12, abs=1e-15)
        recent = finite[-20:]
        if recent.size >= 5:
            slope = np.polyfit(np.arange(recent.size), recent, 1)[0]
            assert got["stability/loss_trend_slope"] == pytest.approx(slope, rel=1e-9, abs=1e-12)
        else:
            assert "stability/loss_trend_slope" not in got
        if finite.min() > 0:
            assert got["stability/loss_spike_ratio"] == finite.max() / finite.min()
        else:
            assert "stability/loss_spike_ratio" not in got
