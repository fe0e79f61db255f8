"""Bad input: the right number, an honest NaN with a health/ count, or a clear error; never a crash."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import hjepa_metrics as hm


def test_nonfinite_inputs_give_nan_and_a_health_count() -> None:
    x = torch.randn(20, 4)
    x[3, 1] = math.nan
    x[7, 0] = math.inf
    got = hm.collapse_metrics(x, level=1)
    assert got["health/collapse_level1_nonfinite"] == 2.0
    assert math.isnan(got["collapse/level1_effective_rank"]) and math.isnan(
        got["collapse/level1_mean_similarity"]
    )

    p = torch.randn(2, 5, 4)
    t = p.clone()
    t[0, 2, 3] = math.nan
    got = hm.prediction_quality(p, t)
    assert got["health/prediction_level0_nonfinite"] == 1.0
    assert math.isnan(got["prediction/level0_cosine_sim_mean"])

    model = nn.Linear(3, 3)
    model.weight.grad = torch.full((3, 3), math.nan)
    model.bias.grad = torch.ones(3)
    got = hm.gradient_flow(model)
    assert got["health/gradient_nonfinite_tensors"] == 1.0 and math.isnan(got["gradient_flow/global_norm"])

    got = hm.hierarchical_losses({"loss": math.inf, "loss_h0": torch.tensor(math.nan), "loss_h1": 1.0})
    assert got["health/loss_nonfinite"] == 2.0 and "loss/contribution_h0" not in got


def test_alerts_on_health_tags(caplog: pytest.LogCaptureFixture) -> None:
    from writers import BaseWriter

    logger = hm.HJEPAMetricsLogger(BaseWriter())
    x = torch.randn(8, 4)
    x[0, 0] = math.nan
    logger.log_collapse_metrics(x, global_step=1)
    assert [a.tag for a in logger.alerts] == ["train/health/collapse_level0_nonfinite"]


def test_half_precision_extremes_are_computed_in_wider_types() -> None:
    big = torch.full((4, 3, 8), 60000.0, dtype=torch.float16)  # squares overflow float16
    got = hm.prediction_quality(big, big)
    assert got["prediction/level0_cosine_sim_mean"] == pytest.approx(1.0, abs=1e-6)
    stats = hm.hierarchy_feature_stats([big])
    assert stats["hierarchy/level0_feat_norm"] == pytest.approx(60000.0 * math.sqrt(8), rel=1e-3)
    tiny = torch.full((16, 8), 1e-7, dtype=torch.bfloat16)
    assert hm.collapse_metrics(tiny)["collapse/level0_mean_similarity"] == pytest.approx(1.0, abs=1e-6)


def test_integer_bool_and_requires_grad_inputs() -> None:
    feats = torch.randint(-5, 5, (30, 6))
    assert hm.collapse_metrics(feats)["collapse/level0_effective_rank"] > 0
    assert hm.masking_statistics(torch.tensor([[True, False, True, False]]))["masking/mask_ratio"] == 0.5
    p = torch.randn(2, 3, 4, requires_grad=True)
    got = hm.prediction_quality(p * 2, p.detach() * 2)
    assert got["prediction/level0_cosine_sim_mean"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: hm.collapse_metrics(torch.randn(5)), ValueError, r"features: got shape \(5,\)"),
        (lambda: hm.collapse_metrics(torch.randn(3, 0)), ValueError, "features: got shape"),
        (lambda: hm.collapse_metrics("x"), TypeError, "features: got str"),
        (
            lambda: hm.prediction_quality(torch.ones(2, 3), torch.ones(3, 3)),
            ValueError,
            "expected equal shapes",
        ),
        (lambda: hm.prediction_quality(torch.ones(3), torch.ones(3)), ValueError, "at least 2 dims"),
        (
            lambda: hm.masking_statistics(torch.ones(2, 2, 2, 2)),
            ValueError,
            r"expected \[B, N\] or \[B, K, N\]",
        ),
        (lambda: hm.masking_statistics(torch.ones(0, 4)), ValueError, "non-empty"),
        (lambda: hm.hierarchical_losses({"loss": 1.0}), ValueError, "no 'loss_h"),
        (lambda: hm.hierarchical_losses({"loss": "a", "loss_h0": 1.0}), TypeError, r"loss_dict\['loss'\]"),
        (lambda: hm.training_stability("1,2"), TypeError, "loss_history: got str"),
        (lambda: hm.performance_metrics(-1, 0.1, 0.1), ValueError, "batch_size: got -1"),
        (lambda: hm.gradient_clipping(1.0, 1.0, 0.0), ValueError, "clip_threshold: got 0.0"),
        (lambda: hm.learning_rate([{"momentum": 0.9}]), KeyError, "no 'lr' key"),
        (lambda: hm.collapse_metrics(torch.ones(3, 2, dtype=torch.complex64)), TypeError, "complex"),
    ],
)
def test_clear_errors(call: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()  # type: ignore[operator]


def test_level_count_disagreeing_with_the_logger() -> None:
    from writers import BaseWriter

    logger = hm.HJEPAMetricsLogger(BaseWriter(), num_hierarchies=3)
    with pytest.raises(ValueError, match="expected num_hierarchies=3"):
        logger.log_hierarchy_feature_stats([torch.ones(1, 2, 3)] * 2)
    with pytest.raises(KeyError, match="missing key 'loss_h2'"):
        logger.log_hierarchical_losses({"loss": 1.0, "loss_h0": 1.0, "loss_h1": 1.0})


DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int32, np.bool_])
VALUES = st.floats(allow_nan=True, allow_infinity=True, width=16)
shapes = st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple)
OK = (ValueError, TypeError, KeyError)


def _array(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(DTYPES)
    shape = draw(shapes)
    if dtype is np.bool_:
        return draw(arrays(dtype, shape))
    if dtype is np.int32:
        return draw(arrays(dtype, shape, elements=st.integers(-100, 100)))
    return draw(arrays(dtype, shape, elements=VALUES))


@st.composite
def any_array(draw: st.DrawFn) -> np.ndarray:
    return _array(draw)


def _fuzz(call: object) -> None:
    try:
        out = call()  # type: ignore[operator]
    except OK:
        return
    assert isinstance(out, dict) and all(isinstance(v, float) for v in out.values())


@given(any_array(), st.sampled_from(["numpy", "torch"]))
def test_fuzz_single_input_functions(x: np.ndarray, kind: str) -> None:
    value = torch.from_numpy(x.copy()) if kind == "torch" else x
    _fuzz(lambda: hm.collapse_metrics(value))
    _fuzz(lambda: hm.masking_statistics(value))
    _fuzz(lambda: hm.hierarchy_feature_stats([value]))
    _fuzz(lambda: hm.training_stability(list(x.ravel()[:60])))


@given(any_array(), any_array())
def test_fuzz_pairs(a: np.ndarray, b: np.ndarray) -> None:
    _fuzz(lambda: hm.prediction_quality([a], [b]))
    _fuzz(lambda: hm.prediction_quality([a], [a]))
    _fuzz(lambda: hm.hierarchy_feature_stats([a], [b]))


@given(st.lists(any_array(), min_size=1, max_size=4))
def test_fuzz_gradients_and_ema(arrays_: list[np.ndarray]) -> None:
    params = {}
    for i, a in enumerate(arrays_):
        t = torch.from_numpy(a.astype(np.float32))
        p = nn.Parameter(t.clone())
        p.grad = t.clone()
        params[f"m{i % 2}.p{i}"] = p
    _fuzz(lambda: hm.gradient_flow(params, per_parameter=True))
    _fuzz(lambda: hm.ema_dynamics(params, params, 0.99, 1.0))


def test_numeric_honesty_never_a_finite_zero_for_nan_or_overflow() -> None:
    # float32 features near 1e19 overflow inside the cosine: counted, not hidden
    p = torch.full((2, 3, 4), 1e19)
    out = hm.prediction_quality([p], [-p])
    assert out["health/prediction_level0_nonfinite"] == 6.0
    # an infinite level loss: the shares are undefined, not 0 %
    losses = hm.hierarchical_losses({"loss": 1.0, "loss_h0": 0.4, "loss_h1": math.inf}, num_hierarchies=2)
    assert "loss/contribution_h0" not in losses and "loss/contribution_h1" not in losses
    # a NaN gradient norm: the clipping ratio is NaN, not "nothing clipped"
    assert math.isnan(hm.gradient_clipping(math.nan, math.nan, 1.0)["gradient/clipping_ratio"])
    # every sequence type of numbers is a loss history
    for history in (
        [1.0, 2.0, 3.0],
        (1.0, 2.0, 3.0),
        np.array([1.0, 2.0, 3.0]),
        torch.tensor([1.0, 2.0, 3.0]),
    ):
        assert hm.training_stability(history)["stability/loss_spike_ratio"] == 3.0


def test_overflow_inside_a_computation_is_counted_where_it_is_not_computed_wider() -> None:
    huge = torch.full((2, 3, 4), 1e19)  # finite float32, but squares overflow float32
    hier = hm.hierarchy_feature_stats([huge])
    assert math.isinf(hier["hierarchy/level0_feat_norm"]) and hier["health/hierarchy_level0_nonfinite"] == 6.0
    model = nn.Linear(4, 4)
    for param in model.parameters():
        param.grad = torch.full_like(param, 1e19)
    flow = hm.gradient_flow(model)
    assert math.isinf(flow["gradient_flow/global_norm"]) and flow["health/gradient_nonfinite_tensors"] == 2.0
    target = nn.Linear(4, 4)
    with torch.no_grad():
        for param in target.parameters():
            param.fill_(1e19)
    ema = hm.ema_dynamics(nn.Linear(4, 4), target, 0.99, 1.0)
    assert ema["health/ema_nonfinite_tensors"] == 2.0
    healthy = hm.ema_dynamics(nn.Linear(4, 4), nn.Linear(4, 4), 0.99, 1.0)
    assert healthy["health/ema_nonfinite_tensors"] == 0.0
    with pytest.raises(ValueError, match="mask: got NaN entries"):
        hm.masking_statistics(torch.tensor([[math.nan, 0.0]]))


def test_huge_finite_values_are_computed_in_a_wider_type() -> None:
    # the collapse statistics (float64 Gram) are scale invariant up to float32's edge
    rows = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    scaled = hm.collapse_metrics(rows * 1e19)
    reference = hm.collapse_metrics(rows)
    assert scaled.keys() == reference.keys()
    for tag, value in reference.items():
        assert scaled[tag] == pytest.approx(value, rel=1e-6, abs=1e-9), tag
    # a loss history near float32's max: float64 statistics, as numpy computes them
    history = np.array([3e38, -3e38, 3e38, -3e38, 3e38, 1e38], dtype=np.float32)
    got = hm.training_stability(history)
    assert got["stability/loss_smoothness"] == pytest.approx(float(np.std(history.astype(np.float64))))
    slope = np.polyfit(np.arange(6.0), history.astype(np.float64), 1)[0]
    assert got["stability/loss_trend_slope"] == pytest.approx(float(slope))
