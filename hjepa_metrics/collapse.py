"""Representation-collapse indicators: ``collapse/level{l}_*``.

Everything except ``max_similarity`` comes from running sums over the L2-normalized rows u (Σu, the
D×D Gram Σuuᵀ, Σ‖u‖² and Σ‖u‖⁴), accumulated in float64 over row chunks. That makes the statistics
exact over all M rows with O(D²) memory and one pass, instead of a full SVD and an M×M cosine matrix,
and lets validation accumulate them over batches (:class:`CollapseAccumulator`).
"""

from __future__ import annotations

import math

import torch

from ._tensor import ArrayLike, accumulate_dtype, as_features, host_list, to_host
from .accumulator import RawValues, slots

EPS = 1e-8
# Keeps each float64 chunk near 8 MB, whatever D is.
_CHUNK_ELEMENTS = 1 << 20


def unit_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` as a new ``dtype`` tensor divided by their L2 norm (clamped at 1e-8), and each
    result row's squared norm (1, or 0 for a zero row). One temporary of ``x``'s size, divided in place."""
    u = x.to(dtype, copy=True)
    length = torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    clamped = length.clamp_min(EPS)
    u.div_(clamped)
    return u, (length / clamped).square_().squeeze(-1)


# Below this many columns (rows for the products) a split GEMM loses more to overhead than it saves
_SPLIT_MIN = 128


def symmetric_gram(u: torch.Tensor) -> torch.Tensor:
    """``uᵀu`` ``[D, D]`` for ``u`` ``[rows, D]``. On the CPU, from the three upper blocks of a 2×2
    split (the lower one is the transpose): 3/4 of the multiply-adds of one GEMM, the same float64
    sums (52 → 44 ms for ViT-S's 6,272 × 384 on 2 cores); accelerators take the one GEMM."""
    d = u.shape[1]
    if u.device.type != "cpu" or d < _SPLIT_MIN:
        return u.T @ u
    a, b = u[:, : d // 2], u[:, d // 2 :]
    ab = a.T @ b
    return torch.cat([torch.cat([a.T @ a, ab], 1), torch.cat([ab.T, b.T @ b], 1)])


def max_offdiagonal_product(u: torch.Tensor) -> torch.Tensor:
    """``max_{i≠j} u_i·u_j`` over the rows of ``u`` ``[n, D]`` (−inf for one row), as exact as the
    float64 products. On the CPU, float64 rows are screened in float32 first (see
    :func:`_screened_max_product`); otherwise from the upper blocks of a 2×2 split of ``u uᵀ``, as
    :func:`symmetric_gram`."""
    n = u.shape[0]
    if u.device.type != "cpu" or n < _SPLIT_MIN:
        sim = u @ u.T
        sim.fill_diagonal_(-math.inf)
        return sim.max()
    if u.dtype == torch.float64:
        screened = _screened_max_product(u)
        if screened is not None:
            return screened
    return _split_max_product(u)


def _split_products(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The upper blocks ``(aa, ab, bb)`` of ``v vᵀ`` split at ``n // 2`` rows, the diagonals of ``aa``
    and ``bb`` (each row with itself) set to −inf."""
    n = v.shape[0]
    a, b = v[: n // 2], v[n // 2 :]
    aa, ab, bb = a @ a.T, a @ b.T, b @ b.T
    aa.fill_diagonal_(-math.inf)
    bb.fill_diagonal_(-math.inf)
    return aa, ab, bb


def _split_max_product(u: torch.Tensor) -> torch.Tensor:
    aa, ab, bb = _split_products(u)
    return torch.stack([aa.max(), ab.max(), bb.max()]).max()


def _screened_max_product(u: torch.Tensor) -> torch.Tensor | None:
    """The float64 max product, from float32 products (a split GEMM at ~2.5x the float64 speed on the
    CPU) that only pick the rows to recompute exactly: a float32 product of unit rows is within
    ``(D + 2)·2⁻²⁴`` of the true one (the GEMM's γ_D bound plus rounding u to float32), so the rows of
    the true maximum pair have a float32 row maximum within twice that of the float32 maximum. Those
    rows' products are then computed in float64 against every row. ``None`` when the screen keeps
    more than a quarter of the rows (near-identical rows: the plain float64 product is then cheaper)
    or the products are not finite."""
    n, d = u.shape
    aa, ab, bb = _split_products(u.to(torch.float32))
    row_max = torch.cat(
        [torch.maximum(aa.amax(dim=1), ab.amax(dim=1)), torch.maximum(ab.amax(dim=0), bb.amax(dim=1))]
    )
    margin = 2.0 * (d + 2) * torch.finfo(torch.float32).eps  # eps = 2⁻²³: twice the bound, twice over
    rows = torch.nonzero(row_max >= row_max.max() - margin).squeeze(1)  # none if a product is NaN
    if not 0 < rows.shape[0] <= n // 4:
        return None
    exact = u.index_select(0, rows) @ u.T
    exact[torch.arange(rows.shape[0]), rows] = -math.inf
    return exact.max()


def gram_spectrum(centered_gram: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(λ, finite)``: the eigenvalues of a symmetric PSD ``[D, D]`` Gram, largest first, with those
    below ``16·D·eps·scale`` (the rounding level of a Gram whose trace is ``scale``) set to 0, and
    whether the Gram was finite (if not, λ is that of a zero Gram: the eigensolver would raise, and the
    check must not synchronize the device)."""
    finite = torch.isfinite(centered_gram).all()
    eig = torch.linalg.eigvalsh(torch.where(finite, centered_gram, torch.zeros_like(centered_gram)))
    tol = 16.0 * centered_gram.shape[0] * torch.finfo(eig.dtype).eps * scale
    return torch.where(eig > tol, eig, torch.zeros_like(eig)).flip(0), finite


def effective_rank_from_spectrum(eig: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """Roy–Vetterli ``exp(H(σ/Σσ))`` with σ² = the Gram eigenvalues of :func:`gram_spectrum`: 0 when
    every σ is zero (all rows equal), by definition, and NaN for a non-finite Gram."""
    sigma = eig.sqrt()
    total = sigma.sum()
    p = sigma / total.clamp_min(torch.finfo(eig.dtype).tiny)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum()
    rank = torch.where(total > 0, entropy.exp(), torch.zeros_like(entropy))
    return torch.where(finite, rank, torch.full_like(rank, math.nan))


def spectrum_alpha(eig: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """Power-law decay exponent α of the eigenvalues λ₁ ≥ … ≥ λ_k > 0 of :func:`gram_spectrum` (the
    centered covariance of the unit rows, up to a scale α does not see): minus the least-squares slope
    of ``log λ_i`` against ``log i``, ``i = 1..k``; NaN when ``k < 3`` or the Gram is not finite.
    Computed on the device with masks (k is never read)."""
    kept = eig > 0  # a prefix: eig is sorted, largest first
    w = kept.to(eig.dtype)
    k = w.sum()
    x = torch.arange(1, eig.shape[0] + 1, dtype=eig.dtype, device=eig.device).log()
    y = torch.where(kept, eig, torch.ones_like(eig)).log()
    n = k.clamp_min(1)
    dx = (x - (w * x).sum() / n) * w
    dy = (y - (w * y).sum() / n) * w
    slope = (dx * dy).sum() / (dx * dx).sum().clamp_min(torch.finfo(eig.dtype).tiny)
    return torch.where(finite & (k >= 3), -slope, torch.full_like(slope, math.nan))


def feature_rows(features: ArrayLike, name: str = "features") -> torch.Tensor:
    """``features`` ``[M, D]`` or ``[..., D]`` as rows ``[M, D]`` (leading dims flattened), D ≥ 1."""
    x = as_features(features, name)
    if x.shape[-1] == 0:
        raise ValueError(f"{name}: got shape {tuple(x.shape)}; expected at least one feature dim")
    return x.reshape(-1, x.shape[-1])


class CollapseAccumulator:
    """Exact collapse statistics over rows seen in any number of :meth:`update` calls.

    Tags are those of ``level``. Holds Σu, Σuuᵀ, Σ‖u‖², Σ‖u‖⁴ and the row count (float64, on the
    features' device), plus a sample of at most ``max_similarity_rows`` rows for ``max_similarity``:
    each row gets a key from a private generator seeded with ``seed`` and the rows with the smallest
    keys are kept, so the sample (and the result) is the same however the rows are split into batches.
    With ``labelled=True`` every :meth:`update` also takes a number per row (a class id, say) that the
    sample carries along (for :func:`hjepa_metrics.embedding.embedding_projection`).
    """

    def __init__(
        self, *, level: int = 0, max_similarity_rows: int = 1024, seed: int = 0, labelled: bool = False
    ) -> None:
        if max_similarity_rows < 2:
            raise ValueError(f"max_similarity_rows: got {max_similarity_rows}; expected at least 2")
        self.level = level
        self.max_similarity_rows = max_similarity_rows
        self._generator = torch.Generator(device="cpu").manual_seed(seed)
        self.count = 0
        self.gram: torch.Tensor | None = None
        self.row_sum: torch.Tensor | None = None
        self.sq_norm_sum: torch.Tensor | None = None
        self.fourth_sum: torch.Tensor | None = None
        self.nonfinite_rows: torch.Tensor | None = None
        self._sample: torch.Tensor | None = None
        self._sample_keys: torch.Tensor | None = None
        self.labelled = labelled
        self._sample_labels: torch.Tensor | None = None
        # after compute(): log10(λ_i / λ₁) of the eigenvalues behind the effective rank, largest first,
        # −inf for those below the rounding level (a histogram drops them), on the device
        self.spectrum: torch.Tensor | None = None

    @property
    def dim(self) -> int | None:
        return None if self.gram is None else int(self.gram.shape[0])

    def update(self, features: ArrayLike, labels: torch.Tensor | None = None) -> None:
        """Add rows: ``[M, D]`` or ``[..., D]`` (flattened; non-contiguous views are fine), M, D ≥ 1;
        ``labels`` ``[M]`` (any shape with M values) when the accumulator is ``labelled``."""
        x = feature_rows(features)
        m, d = x.shape
        if self.labelled != (labels is not None):
            raise ValueError(
                "labels: expected one per feature row (labelled accumulator)"
                if self.labelled
                else "labels: got labels; expected none (the accumulator was made with labelled=False)"
            )
        if labels is not None:
            labels = labels.reshape(-1).to(torch.float64)
            if labels.shape[0] != m:
                raise ValueError(f"labels: got {labels.shape[0]} values; expected one per feature row ({m})")
        if self.gram is None:
            acc = accumulate_dtype(x.device)
            self.gram = torch.zeros(d, d, dtype=acc, device=x.device)
            self.row_sum = torch.zeros(d, dtype=acc, device=x.device)
            self.sq_norm_sum = torch.zeros((), dtype=acc, device=x.device)
            self.fourth_sum = torch.zeros((), dtype=acc, device=x.device)
            self.nonfinite_rows = torch.zeros((), dtype=acc, device=x.device)
        elif d != self.dim:
            raise ValueError(f"features: got feature dim {d}; expected {self.dim} as in earlier batches")
        assert self.row_sum is not None and self.sq_norm_sum is not None and self.fourth_sum is not None
        assert self.nonfinite_rows is not None
        if x.device != self.gram.device:
            x = x.to(self.gram.device)
        acc = self.gram.dtype
        chunk = max(1, _CHUNK_ELEMENTS // d)
        for start in range(0, m, chunk):
            u, sq = unit_rows(x[start : start + chunk], acc)
            self.gram += symmetric_gram(u)
            self.row_sum += u.sum(dim=0)
            self.sq_norm_sum += sq.sum()
            self.fourth_sum += (sq * sq).sum()
            # a NaN/inf anywhere in a row makes its squared norm non-finite: no [rows, D] mask needed
            self.nonfinite_rows += (~torch.isfinite(sq)).sum()
        self.count += m
        if m:  # no rows (a batch of padding only): the state is set up, nothing is added
            self._update_sample(x, labels)

    def _update_sample(self, x: torch.Tensor, labels: torch.Tensor | None) -> None:
        keep = self.max_similarity_rows
        keys = torch.rand(x.shape[0], generator=self._generator).to(x.device)
        labels = None if labels is None else labels.to(x.device)
        if keys.shape[0] > keep:  # only this batch's best candidates, never a copy of the whole batch
            idx = torch.topk(keys, keep, largest=False).indices
            rows, keys = x.index_select(0, idx), keys.index_select(0, idx)
            labels = None if labels is None else labels.index_select(0, idx)
        else:
            rows = x.clone()  # the sample must not alias (or pin) the caller's tensor
        if self._sample is not None and self._sample_keys is not None:
            rows = torch.cat([self._sample, rows.to(self._sample.dtype)])
            keys = torch.cat([self._sample_keys, keys])
            if labels is not None and self._sample_labels is not None:
                labels = torch.cat([self._sample_labels, labels])
        self._keep_smallest(rows, keys, labels)

    def _keep_smallest(self, rows: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Keep the sample's ``max_similarity_rows`` rows (and labels) with the smallest keys."""
        if keys.shape[0] > self.max_similarity_rows:
            idx = torch.topk(keys, self.max_similarity_rows, largest=False).indices
            rows, keys = rows.index_select(0, idx), keys.index_select(0, idx)
            labels = None if labels is None else labels.index_select(0, idx)
        self._sample, self._sample_keys, self._sample_labels = rows, keys, labels

    @property
    def sample(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sampled rows ``[n, D]`` (the features as given) and their labels ``[n]`` (float64, or
        ``None`` unless ``labelled``), in key order across calls and ranks."""
        if self._sample is None:
            raise ValueError("features: no rows were given; expected at least one row")
        return self._sample, self._sample_labels

    def sync_parts(self, rank: int, world: int, device: torch.device) -> list[torch.Tensor]:
        """This rank's state as tensors whose SUM over ranks is the global state (see :meth:`load_sync`)."""
        del device  # the state lives where the features were
        if self.gram is None:
            raise ValueError("features: no batch was given on this rank; every rank must call with features")
        assert self.row_sum is not None and self.sq_norm_sum is not None and self.fourth_sum is not None
        assert self.nonfinite_rows is not None
        k, d = self.max_similarity_rows, self.gram.shape[0]
        sample = torch.zeros(k, d, dtype=self.gram.dtype, device=self.gram.device)
        keys = torch.zeros(k, dtype=self.gram.dtype, device=self.gram.device)
        n = 0 if self._sample is None else self._sample.shape[0]
        if self._sample is not None and self._sample_keys is not None:
            sample[:n] = self._sample.to(sample.device, sample.dtype)
            keys[:n] = self._sample_keys.to(keys.device, keys.dtype)
        count = torch.tensor([float(self.count), float(n)], dtype=self.gram.dtype, device=self.gram.device)
        parts = [
            self.gram,
            self.row_sum,
            self.sq_norm_sum,
            self.fourth_sum,
            self.nonfinite_rows,
            slots(count, rank, world),
            slots(sample, rank, world),
            slots(keys, rank, world),
        ]
        if self.labelled:
            labels = torch.zeros(k, dtype=self.gram.dtype, device=self.gram.device)
            if self._sample_labels is not None:
                labels[:n] = self._sample_labels.to(labels.device, labels.dtype)
            parts.append(slots(labels, rank, world))
        return parts

    def load_sync(self, parts: list[torch.Tensor]) -> None:
        """Take the summed :meth:`sync_parts`; the ``max_similarity`` sample merges every rank's sample."""
        self.gram, self.row_sum, self.sq_norm_sum, self.fourth_sum, self.nonfinite_rows = parts[:5]
        counts, samples, keys = parts[5], parts[6], parts[7]
        per_rank = host_list(counts)  # [count_0, n_0, count_1, n_1, ...]
        self.count = int(sum(per_rank[0::2]))
        sizes = [int(n) for n in per_rank[1::2]]
        rows = torch.cat([samples[r, :n] for r, n in enumerate(sizes)])
        row_keys = torch.cat([keys[r, :n] for r, n in enumerate(sizes)])
        labels = torch.cat([parts[8][r, :n] for r, n in enumerate(sizes)]) if self.labelled else None
        self._keep_smallest(rows, row_keys, labels)

    def _centered_gram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, G − M·μμᵀ)``: the mean unit row and the centered Gram (one D×D temporary)."""
        if self.gram is None or self.row_sum is None or self.count == 0:
            raise ValueError("features: no rows were given; expected at least one row")
        mean = self.row_sum / self.count
        return mean, torch.addr(self.gram, mean, mean, alpha=-self.count)

    def principal_axes(self, k: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean [D], axes [D, k], variances [k], total)``: the mean unit row (the center), the top-``k``
        eigenvectors of the centered Gram of the unit rows (the effective rank's matrix) with their
        eigenvalues, largest first, and its trace, all divided by M − 1 (per-row variances). Signs are
        fixed so each axis's largest component is positive (an eigensolver may return either sign)."""
        mean, centered = self._centered_gram()
        centered = centered / max(self.count - 1, 1)
        # a non-finite row makes the Gram non-finite: the eigensolver would raise (zero axes instead)
        finite = torch.isfinite(centered).all()
        values, vectors = torch.linalg.eigh(torch.where(finite, centered, torch.zeros_like(centered)))
        top = min(k, values.shape[0])
        axes = vectors[:, -top:].flip(1)
        signs = axes.gather(0, axes.abs().argmax(dim=0)[None]).sign()
        axes = axes * torch.where(signs == 0, torch.ones_like(signs), signs)
        return mean, axes, values[-top:].flip(0).clamp_min(0.0), centered.trace()

    def compute(self) -> RawValues:
        """Device-side results keyed by tag (no host transfer; see :func:`collapse_metrics`)."""
        level = self.level
        tag = f"collapse/level{level}_"
        names = (
            "mean_std_per_dim",
            "min_std_per_dim",
            "effective_rank",
            "mean_similarity",
            "std_similarity",
            "max_similarity",
        )
        m = self.count
        if m == 0 or self.gram is None:
            raise ValueError("features: no rows were given; expected at least one row")
        assert self.row_sum is not None and self.sq_norm_sum is not None and self.fourth_sum is not None
        raw: RawValues = dict.fromkeys((tag + n for n in names), math.nan)
        assert self.nonfinite_rows is not None
        raw[f"health/collapse_level{level}_nonfinite"] = self.nonfinite_rows
        # the width the effective-rank threshold scales with, so a report judges as the logger did
        raw[tag + "feature_dim"] = float(self.gram.shape[0])
        mean, centered = self._centered_gram()
        spectrum, finite = gram_spectrum(centered, self.sq_norm_sum)  # one eigensolve for all three
        raw[tag + "effective_rank"] = effective_rank_from_spectrum(spectrum, finite)
        raw[tag + "spectrum_alpha"] = spectrum_alpha(spectrum, finite)
        self.spectrum = torch.log10(spectrum / spectrum[0].clamp_min(torch.finfo(spectrum.dtype).tiny))
        if m < 2:
            return raw
        std = ((self.gram.diagonal() - m * mean * mean) / (m - 1)).clamp_min(0.0).sqrt()
        raw[tag + "mean_std_per_dim"] = std.mean()
        raw[tag + "min_std_per_dim"] = std.min()
        pairs = m * (m - 1)
        mean_sim = ((self.row_sum.dot(self.row_sum) - self.sq_norm_sum) / pairs).clamp(-1.0, 1.0)
        raw[tag + "mean_similarity"] = mean_sim
        # Over the M(M−1)/2 distinct pairs, unbiased: Σ_{i<j} c² = (‖G‖²_F − Σ‖u‖⁴) / 2.
        n_pairs = pairs / 2
        if n_pairs > 1:
            sum_sq = (torch.linalg.vector_norm(self.gram).square() - self.fourth_sum) / 2
            raw[tag + "std_similarity"] = (
                ((sum_sq - n_pairs * mean_sim**2) / (n_pairs - 1)).clamp_min(0.0).sqrt()
            )
        assert self._sample is not None
        u, _ = unit_rows(self._sample, self.gram.dtype)
        raw[tag + "max_similarity"] = max_offdiagonal_product(u).clamp(-1.0, 1.0)
        return raw


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
    if x.numel() == 0:
        raise ValueError(f"features: got shape {tuple(x.shape)}; expected at least one row and dim")
    state = CollapseAccumulator(level=level, max_similarity_rows=max_similarity_rows, seed=seed)
    state.update(x)
    return to_host(state.compute())
