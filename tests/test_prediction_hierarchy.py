"""Prediction quality and hierarchy feature statistics against numpy float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import RTOL, as_float64, convert

import hjepa_metrics._tensor
from hjepa_metrics import hierarchy_feature_stats, prediction_quality


def reference_prediction(p: np.ndarray, t: np.ndarray) -> dict[str, float]:
    p2, t2 = p.reshape(-1, p.shape[-1]), t.reshape(-1, t.shape[-1])
    pn = p2 / np.maximum(np.linalg.norm(p2, axis=1, keepdims=True), 1e-8)
    tn = t2 / np.maximum(np.linalg.norm(t2, axis=1, keepdims=True), 1e-8)
    c = (pn * tn).sum(axis=1)
    return {
        "cosine_sim_mean": c.mean(),
        "cosine_sim_std": c.std(ddof=1),
        "cosine_sim_min": c.min(),
        "cosine_sim_max": c.max(),
        "normalized_mse": ((pn - tn) ** 2).sum(axis=1).mean(),
        "l2_distance": np.linalg.norm(p2 - t2, axis=1).mean(),
    }


def test_identical_and_opposite_predictions(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2, 6, 16, generator=gen)
    p_same, p_neg = convert(t, kind), convert(-t, kind)
    got = prediction_quality([p_same, p_neg], [convert(t, kind), convert(t, kind)])
    assert got["prediction/level0_cosine_sim_mean"] == pytest.approx(1.0, abs=1e-6)
    assert got["prediction/level0_normalized_mse"] == pytest.approx(0.0, abs=1e-6)
    assert got["prediction/level0_l2_distance"] == 0.0
    assert got["prediction/level1_cosine_sim_mean"] == pytest.approx(-1.0, abs=1e-6)
    assert got["prediction/level1_normalized_mse"] == pytest.approx(4.0, abs=1e-5)


def test_matches_numpy_reference_per_level(kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 12, 24), (3, 5, 24), (3, 2, 24)]  # levels with different token counts
    preds = [convert(torch.randn(s, generator=gen), kind) for s in shapes]
    targs = [convert(torch.randn(s, generator=gen), kind) for s in shapes]
    got = prediction_quality(preds, targs)
    for level, (p, t) in enumerate(zip(preds, targs, strict=True)):
        for name, value in reference_prediction(as_float64(p), as_float64(t)).items():
            assert got[f"prediction/level{level}_{name}"] == pytest.approx(value, rel=RTOL, abs=1e-6), name


def test_normalized_mse_does_not_depend_on_dim() -> None:
    gen = torch.Generator().manual_seed(2)
    for d in (8, 512):
        a, b = torch.randn(1, 1, d, generator=gen), torch.randn(1, 1, d, generator=gen)
        got = prediction_quality(a, b)
        c = got["prediction/level0_cosine_sim_mean"]
        assert got["prediction/level0_normalized_mse"] == pytest.approx(2 * (1 - c), abs=1e-5)


def test_empty_level_is_skipped_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    got = prediction_quality(
        [torch.ones(2, 3, 4), torch.ones(2, 0, 4)], [torch.ones(2, 3, 4), torch.ones(2, 0, 4)]
    )
    assert "prediction/level0_cosine_sim_mean" in got
    assert not any(k.startswith("prediction/level1") for k in got)
    assert "level 1 is empty" in caplog.text


def test_prediction_errors_name_the_argument() -> None:
    with pytest.raises(
        ValueError, match=r"predictions\[0\] has shape \(2, 3, 4\) but targets\[0\] has \(2, 3, 5\)"
    ):
        prediction_quality([torch.ones(2, 3, 4)], [torch.ones(2, 3, 5)])
    with pytest.raises(ValueError, match="predictions has 2 levels but targets has 1"):
        prediction_quality([torch.ones(2, 3, 4)] * 2, [torch.ones(2, 3, 4)])


# on the CPU the state is Python floats; accelerators keep float64 tensors (the packed path)
device_state = pytest.mark.parametrize("packed", [False, True], ids=["host-floats", "device-tensors"])


@device_state
def test_hierarchy_stats_match_numpy(kind: str, packed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hjepa_metrics._tensor, "PACK_CPU_READS", packed)
    gen = torch.Generator().manual_seed(3)
    preds = [
        convert(torch.randn(2, n, 8, generator=gen) * (level + 1), kind) for level, n in enumerate((16, 4, 1))
    ]
    got = hierarchy_feature_stats(preds, preds)
    for level, p in enumerate(preds):
        x = as_float64(p)
        tag = f"hierarchy/level{level}_"
        assert got[tag + "num_patches"] == x.shape[1]
        assert got[tag + "feat_mean"] == pytest.approx(x.mean(), rel=RTOL, abs=1e-6)
        assert got[tag + "feat_std"] == pytest.approx(x.std(ddof=1), rel=RTOL)
        assert got[tag + "feat_range"] == pytest.approx(x.max() - x.min(), rel=RTOL)
        assert got[tag + "feat_norm"] == pytest.approx(np.linalg.norm(x, axis=-1).mean(), rel=RTOL)


@device_state
def test_hierarchy_single_element_std_is_nan(packed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hjepa_metrics._tensor, "PACK_CPU_READS", packed)
    got = hierarchy_feature_stats([torch.ones(1, 1, 1)])
    assert math.isnan(got["hierarchy/level0_feat_std"])
    assert got["hierarchy/level0_feat_mean"] == 1.0


def test_long_levels_read_in_row_blocks_match_numpy() -> None:
    """On the CPU a level of more tokens than one cache-sized block (682 rows at D = 384) is read a
    block at a time, the last one partial; every statistic still matches float64 numpy, also for
    inputs that require grad (model outputs)."""
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(4, 900, 384, generator=gen)
    t = 0.7 * p + 0.5 * torch.randn(p.shape, generator=gen)
    t[2, 899] = -p[2, 899]  # the minimum cosine, in the last (partial) block
    got = prediction_quality([p.requires_grad_()], [t])
    want = reference_prediction(p.detach().double().numpy(), t.double().numpy())
    assert want["cosine_sim_min"] == pytest.approx(-1.0)
    for name, value in want.items():
        assert got[f"prediction/level0_{name}"] == pytest.approx(value, rel=1e-5, abs=1e-6), name
