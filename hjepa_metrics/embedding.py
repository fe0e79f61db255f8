"""Embeddings of a level's features: a row sample for a projector and its 2-D PCA scatter.

The sample is the ``max_similarity`` one (private-seeded keys, the same rows however the batches are
split, merged over ranks); the principal axes are the top eigenvectors of the exact Gram the collapse
statistics accumulate (L2-normalised rows, centered), so the scatter shows the directions the effective
rank counts, over all rows, not only the sampled ones.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._tensor import ArrayLike
from .collapse import CollapseAccumulator, feature_rows, unit_rows

log = logging.getLogger(__name__)

# matplotlib's tab10: colours of the first ten labels (more labels cycle)
_PALETTE = np.array(
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ],
    dtype=np.uint8,
)


@dataclass(frozen=True)
class Projection:
    """A level's embedding sample: ``rows`` ``[n, D]`` (the features as given, float32, CPU), one
    ``labels`` string per row (or ``None``), ``coords`` ``[n, 2]`` (the centered unit rows on the two
    principal axes, float64), ``explained``: the fraction of the total variance on each axis, and
    ``codes`` ``[n]``: the labels as numbers (what colours the scatter), or ``None``."""

    rows: torch.Tensor
    labels: list[str] | None
    coords: torch.Tensor
    explained: tuple[float, float]
    codes: torch.Tensor | None


def label_codes(metadata: Any, world: int = 1) -> tuple[torch.Tensor | None, list[str] | None]:
    """``(codes [M] float64, names)`` for per-row ``metadata``: numbers (a tensor, array or sequence of
    numbers, e.g. class ids) are their own codes (``names`` is ``None``); strings are coded by their
    index in the sorted distinct strings. Strings cannot travel between ranks (``world > 1``)."""
    if metadata is None:
        return None, None
    if isinstance(metadata, torch.Tensor):
        return metadata.detach().reshape(-1).to("cpu", torch.float64), None
    values = list(np.asarray(metadata, dtype=object).reshape(-1))
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values):
        return torch.tensor([float(v) for v in values], dtype=torch.float64), None
    if world > 1:
        raise ValueError(
            f"metadata: got strings under torch.distributed with {world} ranks; strings cannot be "
            "gathered with the features, expected numbers per row (a tensor of class ids, say)"
        )
    names = sorted({str(v) for v in values})
    index = {name: i for i, name in enumerate(names)}
    return torch.tensor([float(index[str(v)]) for v in values], dtype=torch.float64), names


def finite_rows(
    features: ArrayLike, codes: torch.Tensor | None, name: str = "features"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows ``[M, D]`` of ``features`` (leading dims flattened) without those holding a NaN or an
    inf, with their label codes: one such row would make the Gram, and so every coordinate, NaN. Says
    how many were left out (a warning: training goes on)."""
    x = feature_rows(features, name)
    if codes is not None and codes.shape[0] != x.shape[0]:
        raise ValueError(f"labels: got {codes.shape[0]} values; expected one per feature row ({x.shape[0]})")
    finite = torch.isfinite(x).all(dim=1)
    kept = int(finite.sum())  # a host read: embeddings are logged now and then, not every step
    if kept == x.shape[0]:
        return x, codes
    log.warning(
        "%s: %d of %d rows hold NaN/inf values and are left out of the embedding and its PCA",
        name,
        x.shape[0] - kept,
        x.shape[0],
    )
    return x[finite], None if codes is None else codes[finite.to(codes.device)]


def embedding_projection(state: CollapseAccumulator, names: Sequence[str] | None = None) -> Projection | None:
    """The sample of ``state`` (already reduced over ranks) projected on its two principal axes, or
    ``None`` when it holds no row; ``names`` turns label codes back into the strings they came from
    (see :func:`label_codes`)."""
    if state.count == 0:
        return None
    rows, codes = state.sample
    mean, axes, variances, total = state.principal_axes(2)
    u, _ = unit_rows(rows, axes.dtype)
    coords = (u - mean) @ axes
    if coords.shape[1] < 2:  # one feature dim: a second axis of zeros
        coords = torch.cat([coords, torch.zeros_like(coords)], 1)
    shares = (variances / total).tolist() if float(total) > 0 else []
    shares += [0.0] * (2 - len(shares))
    labels = None
    if codes is not None:
        host = codes.cpu().tolist()
        labels = [names[int(c)] for c in host] if names is not None else [f"{c:g}" for c in host]
    return Projection(
        rows=rows.detach().to("cpu", torch.float32),
        labels=labels,
        coords=coords.cpu(),
        explained=(float(shares[0]), float(shares[1])),
        codes=None if codes is None else codes.cpu(),
    )


def scatter_image(coords: torch.Tensor, codes: torch.Tensor | None = None, size: int = 360) -> np.ndarray:
    """A ``uint8 [size, size, 3]`` scatter of ``coords`` ``[n, 2]`` centred on 0 (the mean), equal scale
    on both axes, axes through 0 in grey, a point per row coloured by its label code (tab10), non-finite
    points left out. Drawn with numpy, so training needs no plotting library."""
    img = np.full((size, size, 3), 255, dtype=np.uint8)
    margin = 10
    span = size - 2 * margin - 1
    xy = coords.detach().to("cpu", torch.float64).numpy()
    keep = np.isfinite(xy).all(axis=1)
    xy = xy[keep]
    reach = float(np.abs(xy).max()) * 1.05 if xy.size else 0.0
    reach = reach if reach > 0 else 1.0
    centre = margin + span // 2
    img[margin : size - margin, centre] = 215
    img[centre, margin : size - margin] = 215
    img[[margin, size - margin - 1], margin : size - margin] = 120
    img[margin : size - margin, [margin, size - margin - 1]] = 120
    if not xy.size:
        return img
    col = np.rint(margin + (xy[:, 0] + reach) / (2 * reach) * span).astype(np.int64)
    row = np.rint(margin + (reach - xy[:, 1]) / (2 * reach) * span).astype(np.int64)
    label = np.zeros(len(xy), dtype=np.int64)
    if codes is not None:
        label = np.asarray(codes.detach().cpu().numpy()[keep], dtype=np.float64)
        label = np.nan_to_num(label).astype(np.int64) % len(_PALETTE)
    colour = _PALETTE[label]
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            if dx * dx + dy * dy <= 5:
                img[np.clip(row + dy, 0, size - 1), np.clip(col + dx, 0, size - 1)] = colour
    return img
