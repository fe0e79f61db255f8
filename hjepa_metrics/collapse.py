"""Representation-collapse indicators: ``collapse/level{l}_*``.

Everything except ``max_similarity`` comes from three running sums over the L2-normalized rows u
(Σu, the D×D Gram Σuuᵀ and Σ‖u‖⁴), accumulated in float64 over row chunks. That makes the statistics
exact over all M rows with O(D²) memory and one pass, instead of a full SVD and an M×M cosine matrix.
"""

from __future__ import annotations

import math

import torch

from ._tensor import ArrayLike, accumulate_dtype, as_features, to_host

EPS = 1e-8
# Keeps each float64 chunk near 16 MB, whatever D is.
_CHUNK_ELEMENTS = 1 << 21


def _unit_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    u = x.to(dtype)
    unit: torch.Tensor = u / torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp_min(EPS)
    return unit


def effective_rank_from_gram(centered_gram: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Roy–Vetterli ``exp(H(σ/Σσ))`` from a symmetric PSD ``[D, D]`` Gram (σ² = its eigenvalues).

    Eigenvalues below ``16·D·eps·scale`` (the rounding level of a Gram whose trace is ``scale``)
    are zero. Returns 0 when every σ is zero (all rows equal), by definition, and NaN for a
    non-finite Gram (the eigensolver would raise, and the check must not synchronize the device).
    """
    finite = torch.isfinite(centered_gram).all()
    eig = torch.linalg.eigvalsh(torch.where(finite, centered_gram, torch.zeros_like(centered_gram)))
    tol = 16.0 * centered_gram.shape[0] * torch.finfo(eig.dtype).eps * scale
    sigma = torch.where(eig > tol, eig, torch.zeros_like(eig)).sqrt()
    total = sigma.sum()
    p = sigma / total.clamp_min(torch.finfo(eig.dtype).tiny)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum()
    rank = torch.where(total > 0, entropy.exp(), torch.zeros_like(entropy))
    return torch.where(finite, rank, torch.full_like(rank, math.nan))


def collapse_metrics(
    features: ArrayLike,
    *,
    level: int = 0,
    max_similarity_rows: int = 1024,
    seed: int = 0,
) -> dict[str, float]:
    """Per-dim spread, effective rank and pairwise cosine statistics of ``features`` ``[M, D]``.

    Any leading dims are flattened to rows (``[B, N, D]`` → ``[B·N, D]``; non-contiguous views are
    fine). Rows are L2-normalized first. All rows are used; only ``max_similarity`` looks at a
    sample of at most ``max_similarity_rows`` rows drawn with a private generator seeded by
    ``seed`` (the global RNG is never touched). Quantities undefined for M < 2 are NaN.
    """
    x = as_features(features, "features")
    x = x.reshape(-1, x.shape[-1])
    m, d = x.shape
    if m == 0 or d == 0:
        raise ValueError(
            f"features: got shape {tuple(x.shape)} after flattening; expected at least one row and dim"
        )
    if max_similarity_rows < 2:
        raise ValueError(f"max_similarity_rows: got {max_similarity_rows}; expected at least 2")
    acc = accumulate_dtype(x.device)
    gram = torch.zeros(d, d, dtype=acc, device=x.device)
    row_sum = torch.zeros(d, dtype=acc, device=x.device)
    sq_norm_sum = torch.zeros((), dtype=acc, device=x.device)
    fourth_sum = torch.zeros((), dtype=acc, device=x.device)
    chunk = max(1, _CHUNK_ELEMENTS // d)
    for start in range(0, m, chunk):
        u = _unit_rows(x[start : start + chunk], acc)
        gram.addmm_(u.T, u)
        row_sum += u.sum(dim=0)
        sq = (u * u).sum(dim=1)
        sq_norm_sum += sq.sum()
        fourth_sum += (sq * sq).sum()

    mean = row_sum / m
    tag = f"collapse/level{level}_"
    raw: dict[str, torch.Tensor | float] = {}
    nan = math.nan
    pairs = m * (m - 1)
    if m > 1:
        var = ((gram.diagonal() - m * mean * mean) / (m - 1)).clamp_min(0.0)
        std = var.sqrt()
        raw[tag + "mean_std_per_dim"] = std.mean()
        raw[tag + "min_std_per_dim"] = std.min()
    else:
        raw[tag + "mean_std_per_dim"] = nan
        raw[tag + "min_std_per_dim"] = nan
    centered = gram - m * torch.outer(mean, mean)
    raw[tag + "effective_rank"] = effective_rank_from_gram(centered, sq_norm_sum)
    if m > 1:
        mean_sim = ((row_sum.dot(row_sum) - sq_norm_sum) / pairs).clamp(-1.0, 1.0)
        raw[tag + "mean_similarity"] = mean_sim
        # Over the M(M−1)/2 distinct pairs, unbiased: Σ_{i<j} c² = (‖G‖²_F − Σ‖u‖⁴) / 2.
        n_pairs = pairs / 2
        sum_sq = (gram.square().sum() - fourth_sum) / 2
        if n_pairs > 1:
            raw[tag + "std_similarity"] = (
                ((sum_sq - n_pairs * mean_sim**2) / (n_pairs - 1)).clamp_min(0.0).sqrt()
            )
        else:
            raw[tag + "std_similarity"] = nan
        raw[tag + "max_similarity"] = _max_pair_similarity(x, max_similarity_rows, seed, acc)
    else:
        raw[tag + "mean_similarity"] = nan
        raw[tag + "std_similarity"] = nan
        raw[tag + "max_similarity"] = nan
    return to_host(raw)


def _max_pair_similarity(x: torch.Tensor, max_rows: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    m = x.shape[0]
    if m > max_rows:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        idx = torch.randperm(m, generator=generator)[:max_rows].to(x.device)
        x = x.index_select(0, idx)
    u = _unit_rows(x, dtype)
    sim = u @ u.T
    sim.fill_diagonal_(-math.inf)
    return sim.max().clamp(-1.0, 1.0)
