"""Collapse metrics against analytic oracles and a float64 numpy brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import as_float64, convert

from hjepa_metrics import collapse_metrics
from hjepa_metrics.collapse import _screened_max_product, max_offdiagonal_product, unit_rows

TAG = "collapse/level0_"


def brute_force(x: np.ndarray) -> dict[str, float]:
    """Direct float64 definitions: full SVD and the N×N cosine matrix."""
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    m = u.shape[0]
    std = u.std(axis=0, ddof=1)
    sigma = np.linalg.svd(u - u.mean(axis=0), compute_uv=False)
    alpha = spectrum_alpha_oracle(sigma**2)
    sigma = np.where(sigma > 1e-6 * max(sigma.max(), 1e-300), sigma, 0.0)
    p = sigma / sigma.sum() if sigma.sum() > 0 else sigma
    entropy = -sum(pk * math.log(pk) for pk in p if pk > 0)
    sim = u @ u.T
    pairs = sim[np.triu_indices(m, k=1)]
    return {
        TAG + "mean_std_per_dim": std.mean(),
        TAG + "min_std_per_dim": std.min(),
        TAG + "effective_rank": math.exp(entropy) if sigma.sum() > 0 else 0.0,
        TAG + "mean_similarity": pairs.mean(),
        TAG + "std_similarity": pairs.std(ddof=1),
        TAG + "max_similarity": pairs.max(),
        "health/collapse_level0_nonfinite": float((~np.isfinite(x).all(axis=1)).sum()),
        TAG + "feature_dim": float(x.shape[1]),
        TAG + "spectrum_alpha": alpha,
    }


def spectrum_alpha_oracle(lam: np.ndarray) -> float:
    """−slope of log λ_i on log i over the eigenvalues above the rounding level, in float64 numpy."""
    lam = np.sort(lam)[::-1]
    kept = lam[lam > 1e-10 * lam.max()] if lam.max() > 0 else lam[:0]
    if kept.size < 3:
        return math.nan
    i = np.arange(1, kept.size + 1)
    return float(-np.polyfit(np.log(i), np.log(kept), 1)[0])


def test_matches_float64_brute_force(kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(300, 48, generator=gen) + 0.5 * torch.randn(1, 48, generator=gen)
    x = convert(base, kind)
    got = collapse_metrics(x)
    want = brute_force(as_float64(x))
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key


def test_rank_k_with_equal_singular_values_is_k(kind: str) -> None:
    d, k = 32, 7
    eye = torch.eye(d)
    rows = torch.cat([eye[:k], -eye[:k]])  # centered, unit rows, k equal singular values
    assert collapse_metrics(convert(rows, kind))[TAG + "effective_rank"] == pytest.approx(k, rel=1e-12)


def test_all_rows_equal_is_rank_zero_similarity_one(kind: str) -> None:
    x = convert(torch.full((50, 16), 0.25), kind)
    got = collapse_metrics(x)
    assert got[TAG + "effective_rank"] == 0.0
    assert got[TAG + "mean_similarity"] == pytest.approx(1.0, abs=1e-12)
    assert got[TAG + "max_similarity"] == pytest.approx(1.0, abs=1e-12)
    assert got[TAG + "mean_std_per_dim"] == pytest.approx(0.0, abs=1e-7)


def test_eye_has_mean_std_exactly_one_over_sqrt_d(kind: str) -> None:
    d = 64
    got = collapse_metrics(convert(torch.eye(d), kind))
    assert got[TAG + "mean_std_per_dim"] == pytest.approx(1 / math.sqrt(d), rel=1e-12)
    assert got[TAG + "min_std_per_dim"] == pytest.approx(1 / math.sqrt(d), rel=1e-12)
    assert got[TAG + "mean_similarity"] == pytest.approx(0.0, abs=1e-15)  # orthonormal rows


def test_half_v_half_minus_v_mean_similarity(kind: str) -> None:
    n = 40
    v = torch.tensor([1.0, -2.0, 0.5, 4.0])
    x = convert(torch.cat([v.expand(n // 2, 4), -v.expand(n // 2, 4)]), kind)
    assert collapse_metrics(x)[TAG + "mean_similarity"] == pytest.approx(-1 / (n - 1), rel=1e-6)


def test_rank_one_stays_rank_one_in_float64_gram() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5000, 1, generator=gen) * torch.randn(1, 256, generator=gen)
    # Centered normalized rows of a rank-1 matrix are ±u: one nonzero singular value.
    assert collapse_metrics(a)[TAG + "effective_rank"] == pytest.approx(1.0, abs=1e-6)


def test_level_prefix_and_leading_dims_are_flattened() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 10, 8, generator=gen)
    got = collapse_metrics(x[:, 1:, :], level=2)  # non-contiguous, as the guide's CLS slice
    want = collapse_metrics(x[:, 1:, :].reshape(-1, 8).contiguous(), level=2)
    assert set(got) == {k.replace("level0", "level2") for k in brute_force(np.eye(3))}
    assert got == want


def test_single_row_is_nan_not_a_crash() -> None:
    got = collapse_metrics(torch.randn(1, 8))
    assert got[TAG + "effective_rank"] == 0.0
    for key in ("mean_std_per_dim", "mean_similarity", "std_similarity", "max_similarity"):
        assert math.isnan(got[TAG + key])


def test_two_rows_give_finite_mean_similarity() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    got = collapse_metrics(x)
    assert got[TAG + "mean_similarity"] == pytest.approx(1 / math.sqrt(2))
    assert got[TAG + "max_similarity"] == pytest.approx(1 / math.sqrt(2))


def test_max_similarity_sample_is_private_and_seeded() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 16, generator=gen)
    a = collapse_metrics(x, max_similarity_rows=256)
    b = collapse_metrics(x, max_similarity_rows=256)
    c = collapse_metrics(x, max_similarity_rows=256, seed=1)
    assert a == b
    assert a[TAG + "max_similarity"] != c[TAG + "max_similarity"]
    u = as_float64(x)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    assert a[TAG + "max_similarity"] <= sim.max() + 1e-12


def test_bad_shapes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="features: got shape"):
        collapse_metrics(torch.randn(8))
    with pytest.raises(ValueError, match="features: got shape"):
        collapse_metrics(torch.randn(0, 8))
    with pytest.raises(TypeError, match="features"):
        collapse_metrics([[1.0, 2.0]])  # type: ignore[arg-type]


def test_wide_features_split_products_match_float64_brute_force() -> None:
    # D and M above the size where the CPU Gram and the max-similarity products are split in blocks
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, 160, generator=gen) + 0.3 * torch.randn(1, 160, generator=gen)
    got = collapse_metrics(x, max_similarity_rows=300)
    want = brute_force(as_float64(x))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def _rows(case: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(400, 96, generator=gen)
    if case == "near-collapse":  # every row close to one direction: the screen keeps too many rows
        x = 0.01 * x + torch.randn(1, 96, generator=gen)
    elif case == "duplicate":  # one pair at exactly 1, far above the rest
        x[7] = 2.0 * x[300]
    elif case == "close pairs":  # several pairs within the float32 error of each other
        for i in range(5):
            x[10 + i] = x[200 + i] + 1e-7 * torch.randn(96, generator=gen)
    elif case == "nan row":
        x[3, 5] = math.nan
    return x


@pytest.mark.parametrize("case", ["random", "near-collapse", "duplicate", "close pairs", "nan row"])
def test_max_product_screened_in_float32_is_the_float64_maximum(case: str) -> None:
    u, _ = unit_rows(_rows(case), torch.float64)
    screened = _screened_max_product(u)
    assert (screened is None) == (case in ("near-collapse", "nan row"))  # those fall back to float64
    un = u.numpy()
    sim = un @ un.T
    np.fill_diagonal(sim, -np.inf)
    want = np.nanmax(sim) if case != "nan row" else math.nan
    got = float(max_offdiagonal_product(u))
    if case == "nan row":
        assert math.isnan(got)
    else:
        assert got == pytest.approx(want, rel=1e-14, abs=1e-15)


def _hadamard(m: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < m:
        h = np.block([[h, h], [h, -h]])
    return h


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.5])
def test_spectrum_alpha_of_an_exact_power_law(alpha: float) -> None:
    # rows Σ_j ±√λ_j q_j over an orthonormal basis q, with the signs of a Hadamard matrix's columns
    # (orthogonal, zero mean): all rows have the same norm, so after normalisation the centered
    # covariance has eigenvalues ∝ λ_j = j^-α exactly
    d, m = 32, 64
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))
    lam = np.arange(1, d + 1, dtype=np.float64) ** -alpha
    x = _hadamard(m)[:, 1 : d + 1] * np.sqrt(lam) @ q.T
    got = collapse_metrics(torch.from_numpy(x))[TAG + "spectrum_alpha"]
    assert got == pytest.approx(alpha, rel=1e-9)


def test_spectrum_alpha_is_nan_below_three_directions() -> None:
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert math.isnan(collapse_metrics(x)[TAG + "spectrum_alpha"])  # one direction after centering


def test_spectrum_histogram_read_back_from_tensorboard(tmp_path: object) -> None:
    pytest.importorskip("tensorboard")
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hjepa_metrics import HJEPAMetricsLogger
    from writers import TensorBoardWriter

    d, m, alpha = 32, 64, 1.5
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((d, d)))
    lam = np.arange(1, d + 1, dtype=np.float64) ** -alpha
    x = torch.from_numpy(_hadamard(m)[:, 1 : d + 1] * np.sqrt(lam) @ q.T)
    out = Path(str(tmp_path))
    with HJEPAMetricsLogger(TensorBoardWriter(out), spectrum_every=2) as logger:
        for step in range(5):  # calls 0, 2 and 4 log the spectrum
            logger.log_collapse_metrics(x, level=1, global_step=step)
    acc = EventAccumulator(str(out), size_guidance={"histograms": 0})
    acc.Reload()
    events = acc.Histograms("train/collapse/level1_spectrum")
    assert [e.step for e in events] == [0, 2, 4]
    h = events[-1].histogram_value
    want = np.log10(lam / lam[0])  # exact: the rows' spectrum is λ up to a scale
    assert h.num == d
    assert h.max == pytest.approx(0.0, abs=1e-12) and h.min == pytest.approx(want.min(), rel=1e-9)
    assert h.sum == pytest.approx(want.sum(), rel=1e-9)


def test_report_draws_the_logged_spectrum(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    from pathlib import Path

    from hjepa_metrics import HJEPAMetricsLogger
    from hjepa_metrics.cli import main
    from writers import JSONLWriter

    out = Path(str(tmp_path))
    gen = torch.Generator().manual_seed(2)
    with HJEPAMetricsLogger(JSONLWriter(out)) as logger:
        for level in range(3):
            logger.log_collapse_metrics(torch.randn(256, 16, generator=gen), level=level, global_step=0)
    assert main(["report", str(out), "--out", str(out / "rep")]) == 0
    assert "eigenspectrum.png" in capsys.readouterr().out
    assert (out / "rep" / "10_eigenspectrum.png").stat().st_size > 1000
