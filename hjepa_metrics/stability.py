"""Loss stability over a history: ``stability/*``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ._tensor import Scalar, scalar_tensor, to_host

SMOOTHNESS_WINDOW = 50
TREND_WINDOW = 20
TREND_MIN_POINTS = 5


def training_stability(
    loss_history: Sequence[Scalar], current_loss: Scalar | None = None
) -> dict[str, float]:
    """Smoothness (population std of the last 50), trend slope (least squares, last 20) and spike ratio.

    ``loss_history`` is oldest first and should already contain ``current_loss`` (the guide appends
    it before calling; ``current_loss`` is accepted for the guide's signature and appended only if the
    history is empty). Non-finite values are skipped and counted in ``stability/nonfinite_count``.
    ``loss_spike_ratio = max / min`` over the finite history, when min > 0. Fewer than 2 finite
    values: only the count is returned.
    """
    if isinstance(loss_history, (str, bytes)) or not isinstance(loss_history, Sequence):
        raise TypeError(f"loss_history: got {type(loss_history).__name__}; expected a sequence of losses")
    items = list(loss_history)
    if not items and current_loss is not None:
        items = [current_loss]
    values = list(
        to_host({str(i): scalar_tensor(v, f"loss_history[{i}]") for i, v in enumerate(items)}).values()
    )
    finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    out: dict[str, float] = {"stability/nonfinite_count": float(len(values) - finite.size)}
    if finite.size < 2:
        return out
    out["stability/loss_smoothness"] = float(np.std(finite[-SMOOTHNESS_WINDOW:]))
    recent = finite[-TREND_WINDOW:]
    if recent.size >= TREND_MIN_POINTS:
        x = np.arange(recent.size, dtype=np.float64)
        x -= x.mean()
        out["stability/loss_trend_slope"] = float(np.dot(x, recent - recent.mean()) / np.dot(x, x))
    low = float(finite.min())
    if low > 0:
        out["stability/loss_spike_ratio"] = float(finite.max()) / low
    return out
