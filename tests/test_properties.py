"""Invariances (hypothesis) and purity: no RNG use, no input mutation, one host transfer per call."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import hjepa_metrics as hm
from hjepa_metrics import _tensor

INVARIANT = ("effective_rank", "mean_similarity", "std_similarity")


def _features(seed: int, m: int, d: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=gen, dtype=torch.float64) + torch.randn(
        1, d, generator=gen, dtype=torch.float64
    )


def _close(a: dict[str, float], b: dict[str, float], keys: tuple[str, ...], rel: float = 1e-7) -> None:
    for suffix in keys:
        key = f"collapse/level0_{suffix}"
        assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-9), key


shapes = st.tuples(st.integers(0, 10_000), st.integers(3, 40), st.integers(2, 12))


@given(shapes, st.floats(1e-3, 1e3), st.randoms(use_true_random=False))
def test_collapse_invariant_to_scale_and_row_order(
    shape: tuple[int, int, int], scale: float, rnd: Any
) -> None:
    x = _features(*shape)
    row_scales = torch.tensor([scale * (1 + rnd.random()) for _ in range(x.shape[0])], dtype=torch.float64)
    perm = list(range(x.shape[0]))
    rnd.shuffle(perm)
    base = hm.collapse_metrics(x)
    other = hm.collapse_metrics((x * row_scales[:, None])[perm])
    _close(base, other, (*INVARIANT, "mean_std_per_dim", "min_std_per_dim"))


@given(shapes)
def test_collapse_invariant_to_rotation_and_duplication(shape: tuple[int, int, int]) -> None:
    x = _features(*shape)
    q, _ = torch.linalg.qr(_features(shape[0] + 1, x.shape[1], x.shape[1]))
    base = hm.collapse_metrics(x)
    _close(base, hm.collapse_metrics(x @ q), INVARIANT, rel=1e-6)
    dup = hm.collapse_metrics(torch.cat([x, x]))
    _close(base, dup, ("effective_rank",))


@given(
    arrays(
        np.float32, st.tuples(st.integers(2, 12), st.integers(1, 6)), elements=st.floats(-100, 100, width=32)
    )
)
def test_collapse_matches_pairwise_brute_force_on_arbitrary_values(x: np.ndarray) -> None:
    x = x[np.linalg.norm(x.astype(np.float64), axis=1) > 1e-3]
    if x.shape[0] < 3:
        return
    got = hm.collapse_metrics(x)
    u = x.astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    pairs = (u @ u.T)[np.triu_indices(u.shape[0], k=1)]
    assert got["collapse/level0_mean_similarity"] == pytest.approx(pairs.mean(), abs=1e-9)
    assert got["collapse/level0_std_similarity"] == pytest.approx(pairs.std(ddof=1), abs=1e-6)
    assert got["collapse/level0_max_similarity"] == pytest.approx(pairs.max(), abs=1e-12)
    assert 0.0 <= got["collapse/level0_effective_rank"] <= x.shape[1] + 1e-9


@given(st.integers(0, 1000), st.integers(1, 5), st.integers(1, 20), st.floats(0.01, 100))
def test_prediction_cosine_invariant_to_token_order_and_scale(
    seed: int, b: int, n: int, scale: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    p, t = torch.randn(2, b, n, 8, generator=gen)
    perm = torch.randperm(n, generator=gen)
    base = hm.prediction_quality(p, t)
    other = hm.prediction_quality(p[:, perm] * scale, t[:, perm])
    for key in ("cosine_sim_mean", "cosine_sim_min", "cosine_sim_max", "normalized_mse"):
        assert other[f"prediction/level0_{key}"] == pytest.approx(
            base[f"prediction/level0_{key}"], rel=1e-5, abs=1e-6
        )


@given(st.integers(0, 1000))
def test_gradient_flow_invariant_to_parameter_order(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = {f"m{i % 3}.p{i}": nn.Parameter(torch.zeros(i + 1)) for i in range(7)}
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen)
    a = hm.gradient_flow(params)
    b = hm.gradient_flow(dict(reversed(list(params.items()))))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-6)


# --- purity -------------------------------------------------------------------------------


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.context_encoder = nn.Linear(8, 8)
        self.predictor = nn.Linear(8, 8)


def _calls() -> Iterator[tuple[str, Callable[[], dict[str, float]], list[Any]]]:
    gen = torch.Generator().manual_seed(0)
    preds = [torch.randn(2, n, 8, generator=gen, requires_grad=True) for n in (8, 4, 2)]
    targs = [torch.randn(2, n, 8, generator=gen) for n in (8, 4, 2)]
    feats = torch.randn(3000, 8, generator=gen)
    mask = torch.rand(2, 16, generator=gen) > 0.5
    model = _Model()
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    target = _Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = {"loss": torch.tensor(1.5), "loss_h0": torch.tensor(1.0), "loss_h1": torch.tensor(0.5)}
    history = [torch.tensor(float(i)) for i in range(1, 30)]
    grads = [p.grad for p in model.parameters()]
    yield "losses", lambda: hm.hierarchical_losses(losses), list(losses.values())
    yield "masking", lambda: hm.masking_statistics(mask), [mask]
    yield "prediction", lambda: hm.prediction_quality(preds, targs), preds + targs
    yield "collapse", lambda: hm.collapse_metrics(feats, max_similarity_rows=100), [feats]
    yield "gradient_flow", lambda: hm.gradient_flow(model, per_parameter=True), grads
    yield "clipping", lambda: hm.gradient_clipping(torch.tensor(3.0), torch.tensor(1.0), 1.0), []
    yield "learning_rate", lambda: hm.learning_rate(opt), []
    yield "hierarchy", lambda: hm.hierarchy_feature_stats(preds, targs), preds + targs
    yield "stability", lambda: hm.training_stability(history), history
    yield "performance", lambda: hm.performance_metrics(4, 0.1, 0.2), []
    yield "ema", lambda: hm.ema_dynamics(model, target, torch.tensor(0.99), 1.0), list(model.parameters())


@pytest.mark.parametrize("name", [c[0] for c in _calls()])
def test_no_rng_use_no_mutation_one_transfer(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _, call, inputs = next(c for c in _calls() if c[0] == name)
    before = [t.detach().clone() for t in inputs]
    torch_rng, np_rng = torch.get_rng_state(), np.random.get_state()
    transfers: list[str] = []
    monkeypatch.setattr(_tensor, "PACK_CPU_READS", True)  # count the reads of the path accelerators take
    for method in ("item", "tolist", "cpu", "numpy", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, method)

        def counting(self: torch.Tensor, *a: Any, _m: str = method, _o: Any = original, **k: Any) -> Any:
            transfers.append(_m)
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, method, counting)
    result = call()
    monkeypatch.undo()
    assert result and all(isinstance(v, float) for v in result.values())
    assert len(transfers) <= 1, transfers
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state()[1:2], np_rng[1:2], strict=True))
    for t, b in zip(inputs, before, strict=True):
        assert torch.equal(t.detach(), b)


def test_results_do_not_track_grad_and_nan_is_honest() -> None:
    x = torch.randn(10, 4, requires_grad=True)
    got = hm.collapse_metrics(x * 1.0)
    assert all(isinstance(v, float) for v in got.values())
    x_nan = torch.randn(10, 4)
    x_nan[0, 0] = math.nan
    assert math.isnan(hm.collapse_metrics(x_nan)["collapse/level0_mean_similarity"])


def test_host_list_is_the_only_reader() -> None:
    assert _tensor.host_list(torch.tensor([1.0, 2.0])) == [1.0, 2.0]
