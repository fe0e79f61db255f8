"""Losses, masking, learning rate, stability, performance, clipping: analytic oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import convert

from hjepa_metrics import (
    gradient_clipping,
    hierarchical_losses,
    learning_rate,
    masking_statistics,
    performance_metrics,
    training_stability,
)


def test_contributions_use_weights_and_sum_to_100(kind: str) -> None:
    losses = {"loss_h0": 0.4, "loss_h1": 0.3, "loss_h2": 0.2}
    weights = [1.0, 0.5, 0.25]
    total = sum(w * v for w, v in zip(weights, losses.values(), strict=True))  # 0.6
    loss_dict = {"loss": total, **{k: convert(torch.tensor(v), kind) for k, v in losses.items()}}
    got = hierarchical_losses(loss_dict, hierarchy_weights=weights)
    shares = [got[f"loss/contribution_h{i}"] for i in range(3)]
    assert sum(shares) == pytest.approx(100.0, abs=1e-9)
    # 0.4/0.6, 0.15/0.6, 0.05/0.6 up to the input's own rounding in half precision
    assert shares == pytest.approx(
        [200 / 3, 25.0, 25 / 3], rel=5e-3 if kind in ("float16", "bfloat16") else 1e-6
    )
    assert got["loss/total"] == pytest.approx(0.6)
    assert got["loss/unweighted"] == pytest.approx(0.3, rel=5e-3)


def test_losses_unweighted_given_and_level_count_inferred() -> None:
    got = hierarchical_losses({"loss": 3.0, "loss_h0": 1.0, "loss_h1": 2.0, "loss_unweighted": 7.0})
    assert got == {
        "loss/total": 3.0,
        "loss/h0": 1.0,
        "loss/h1": 2.0,
        "loss/unweighted": 7.0,
        "loss/contribution_h0": pytest.approx(100 / 3),
        "loss/contribution_h1": pytest.approx(200 / 3),
        "health/loss_nonfinite": 0.0,
    }


def test_losses_errors_and_zero_denominator() -> None:
    with pytest.raises(KeyError, match="missing key 'loss_h2'"):
        hierarchical_losses({"loss": 1.0, "loss_h0": 1.0, "loss_h1": 1.0}, num_hierarchies=3)
    with pytest.raises(ValueError, match="hierarchy_weights: got 2 weights"):
        hierarchical_losses({"loss": 1.0, "loss_h0": 1.0}, hierarchy_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="expected a scalar"):
        hierarchical_losses({"loss": torch.ones(3), "loss_h0": 1.0})
    got = hierarchical_losses({"loss": 0.0, "loss_h0": 0.0})
    assert "loss/contribution_h0" not in got


def test_masking_ratio_of_known_mask() -> None:
    mask = torch.zeros(4, 10, dtype=torch.bool)
    for b in range(4):
        mask[b, : b + 1] = True  # 1, 2, 3, 4 masked -> mean 2.5
    for m in (mask, mask.int(), mask.float().numpy()):
        got = masking_statistics(m, num_patches=20)
        assert got == {
            "masking/mask_ratio": 2.5 / 20,
            "masking/num_masked_patches": 2.5,
            "masking/num_unmasked_patches": 17.5,
        }


def test_masking_blocks_are_or_ed() -> None:
    blocks = torch.zeros(2, 3, 8, dtype=torch.bool)
    blocks[:, 0, 0:4] = True
    blocks[:, 1, 2:6] = True  # overlaps: union is 0..5 -> 6 patches
    for m in (blocks, list(blocks.unbind(1))):
        got = masking_statistics(m)
        assert got["masking/num_masked_patches"] == 6.0
        assert got["masking/mask_ratio"] == 6 / 8


def test_ijepa_index_masks_are_united_per_sample() -> None:
    # I-JEPA's collator: a list of [B, K] long tensors of patch indices, one per target block
    gen = torch.Generator().manual_seed(3)
    batch, patches = 8, 196
    blocks = [torch.randint(0, patches, (batch, k), generator=gen) for k in (30, 42, 25, 36)]
    union = [set().union(*(b[i].tolist() for b in blocks)) for i in range(batch)]
    truth = sum(len(u) for u in union) / batch  # the oracle: plain Python sets
    for form in (blocks, blocks[:1] * 1, torch.stack([b[:, :25] for b in blocks], dim=1)):
        parts = list(form.unbind(1)) if isinstance(form, torch.Tensor) else form
        expected = sum(len(set().union(*(b[i].tolist() for b in parts))) for i in range(batch)) / batch
        got = masking_statistics(form, num_patches=patches)
        assert got["masking/num_masked_patches"] == pytest.approx(expected, rel=1e-12)
        assert got["masking/mask_ratio"] == pytest.approx(expected / patches, rel=1e-12)
    got = masking_statistics(blocks, num_patches=patches)
    assert got["masking/mask_ratio"] == pytest.approx(truth / patches, rel=1e-12)
    # the same patches as a boolean mask give the same numbers
    dense = torch.zeros(batch, patches, dtype=torch.bool)
    for i, u in enumerate(union):
        dense[i, sorted(u)] = True
    assert masking_statistics(dense) == got


def test_index_mask_errors() -> None:
    idx = [torch.tensor([[0, 5, 9]]), torch.tensor([[2, 3]])]
    with pytest.raises(ValueError, match="pass num_patches=N"):
        masking_statistics(idx)
    with pytest.raises(ValueError, match=r"mask\[0\]: got patch indices in \[0, 9\]; expected 0 <= index"):
        masking_statistics(idx, num_patches=8)
    with pytest.raises(ValueError, match="expected one form for every block"):
        masking_statistics([idx[0], torch.ones(1, 10, dtype=torch.bool)], num_patches=10)
    with pytest.raises(ValueError, match="batch sizes"):
        masking_statistics([idx[0], torch.tensor([[2], [3]])], num_patches=10)


def test_masking_errors() -> None:
    with pytest.raises(ValueError, match=r"mask: got shape \(5,\)"):
        masking_statistics(torch.ones(5))
    with pytest.raises(ValueError, match="num_patches: got 3"):
        masking_statistics(torch.ones(2, 5), num_patches=3)


def test_learning_rate_groups_and_tensor_lr() -> None:
    p = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": [p[0]], "lr": 1e-3}, {"params": [p[1]], "lr": torch.tensor(5e-4)}])
    got = learning_rate(opt)
    assert got == {
        "learning_rate/base_lr": 1e-3,
        "learning_rate/param_group_0": 1e-3,
        "learning_rate/param_group_1": pytest.approx(5e-4),
    }
    with pytest.raises(TypeError, match="optimizer"):
        learning_rate(3.0)


def test_stability_against_numpy() -> None:
    rng = np.random.default_rng(0)
    history = list(1.0 / np.arange(1, 81) + 0.01 * rng.random(80))
    got = training_stability(history, current_loss=history[-1])
    x = np.arange(20.0)
    slope = np.polyfit(x, np.array(history[-20:]), 1)[0]
    assert got["stability/loss_smoothness"] == pytest.approx(np.std(history[-50:]))
    assert got["stability/loss_trend_slope"] == pytest.approx(slope, rel=1e-9)
    assert got["stability/loss_spike_ratio"] == pytest.approx(max(history) / min(history))
    assert got["stability/nonfinite_count"] == 0


def test_stability_skips_and_counts_non_finite() -> None:
    got = training_stability([1.0, math.nan, 3.0, math.inf, torch.tensor(2.0)])
    assert got == training_stability([1.0, math.nan, 3, math.inf, np.float32(2.0)])  # plain numbers' path
    assert got["stability/nonfinite_count"] == 2
    assert got["stability/loss_smoothness"] == pytest.approx(np.std([1.0, 3.0, 2.0]))
    assert "stability/loss_trend_slope" not in got  # needs 5 finite values
    assert training_stability([1.0]) == {"stability/nonfinite_count": 0.0}
    assert training_stability([math.nan] * 40) == {"stability/nonfinite_count": 40.0}  # one bulk update
    assert "stability/loss_spike_ratio" not in training_stability([-1.0, 1.0])


def test_performance_units() -> None:
    got = performance_metrics(32, forward_time=0.05, backward_time=0.15, device="cpu")
    assert got == {
        "performance/forward_time_ms": 50.0,
        "performance/backward_time_ms": 150.0,
        "performance/total_time_ms": pytest.approx(200.0),
        "performance/samples_per_second": pytest.approx(160.0),
        "performance/forward_backward_ratio": pytest.approx(1 / 3),
    }
    assert "performance/samples_per_second" not in performance_metrics(8, 0.0, 0.0)


@pytest.mark.parametrize(
    ("before", "after", "threshold", "clipped", "ratio"),
    [
        (10.0, 1.0, 1.0, 1.0, 0.1),
        (0.5, 0.5, 1.0, 0.0, 1.0),
        (0.0, 0.0, 1.0, 0.0, 0.0),
        (5.0, 5.0, None, 0.0, 1.0),
    ],
)
def test_clipping_single_call(
    before: float, after: float, threshold: float | None, clipped: float, ratio: float
) -> None:
    got = gradient_clipping(torch.tensor(before), after, threshold)
    assert got["gradient/was_clipped"] == clipped
    assert got["gradient/clipping_ratio"] == pytest.approx(ratio)
    assert got["gradient/clipping_percentage"] == 100.0 * clipped
    assert got["gradient/global_norm_before_clip"] == before


def test_clipping_percentage_counts_prior_calls() -> None:
    got = gradient_clipping(3.0, 1.0, 1.0, prior_clipped=1, prior_calls=3)
    assert got["gradient/clipping_percentage"] == 50.0
    with pytest.raises(ValueError, match="prior_clipped"):
        gradient_clipping(3.0, 1.0, 1.0, prior_clipped=4, prior_calls=3)


def test_timed_measures_the_block_and_cpu_has_no_gpu_memory_tags() -> None:
    import time

    from hjepa_metrics import cuda_memory_metrics, timed

    with timed("cpu") as t:
        time.sleep(0.05)
    assert 0.05 <= t.seconds < 1.0
    assert cuda_memory_metrics("cpu") == {}
    if not torch.cuda.is_available():
        assert cuda_memory_metrics() == {}
