"""Loss stability over a history: ``stability/*``."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np
import torch

from ._tensor import Scalar, accumulate_dtype, as_tensor, host_list, scalar_tensor, to_host
from .accumulator import RankLocal, RawValues

SMOOTHNESS_WINDOW = 50
TREND_WINDOW = 20
TREND_MIN_POINTS = 5

Losses = Sequence[Scalar] | np.ndarray | torch.Tensor
_PLAIN_NUMBERS = (float, int, np.float64, np.float32, np.int64)


class LossHistory(RankLocal):
    """The last ``maxlen`` losses (all of them for ``None``), oldest first, as host floats.

    ``update`` takes one loss or a sequence of them (list, tuple, numpy array, 1-D tensor), moved to
    the host with one transfer. The history is each rank's own: stability describes that rank's
    loss curve, so there is no cross-rank state (:meth:`sync_parts` is empty).
    """

    def __init__(self, maxlen: int | None = 1000) -> None:
        if maxlen is not None and maxlen < 1:
            raise ValueError(f"loss_history_size: got {maxlen}; expected >= 1 or None")
        self.values: deque[float] = deque(maxlen=maxlen)

    @classmethod
    def of(cls, loss_history: Losses, current_loss: Scalar | None = None) -> LossHistory:
        """An unbounded history of the caller's ``loss_history``, or of ``current_loss`` alone when
        that is empty (the guide's signature)."""
        if isinstance(loss_history, (int, float)):
            raise TypeError(f"loss_history: got {type(loss_history).__name__}; expected a sequence of losses")
        state = cls(maxlen=None)
        state.update(loss_history)
        if not len(state) and current_loss is not None:
            state.update(current_loss)
        return state

    def __len__(self) -> int:
        return len(self.values)

    def update(self, losses: Scalar | Losses) -> None:
        if isinstance(losses, (torch.Tensor, np.ndarray)):
            t = as_tensor(losses, "loss_history")
            if t.dim() > 1:
                raise ValueError(f"loss_history: got shape {tuple(t.shape)}; expected a 0-d or 1-D sequence")
            self.values.extend(host_list(t.reshape(-1).to(accumulate_dtype(t.device))))
            return
        if isinstance(losses, (str, bytes)) or not isinstance(losses, (Sequence, int, float, np.generic)):
            raise TypeError(f"loss_history: got {type(losses).__name__}; expected a sequence of losses")
        items = list(losses) if isinstance(losses, Sequence) else [losses]
        if all(type(v) in _PLAIN_NUMBERS for v in items):  # nothing to check or read: 3x faster
            self.values.extend(float(v) for v in items)
            return
        host = to_host({str(i): scalar_tensor(v, f"loss_history[{i}]") for i, v in enumerate(items)})
        self.values.extend(host.values())

    def compute(self) -> RawValues:
        """Smoothness (population std of the last 50), trend slope (least squares, last 20, needs 5)
        and spike ratio (max / min, when min > 0) of the finite values, and the non-finite count."""
        finite = np.array([v for v in self.values if math.isfinite(v)], dtype=np.float64)
        out: RawValues = {"stability/nonfinite_count": float(len(self.values) - finite.size)}
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


def training_stability(loss_history: Losses, current_loss: Scalar | None = None) -> dict[str, float]:
    """Smoothness (population std of the last 50), trend slope (least squares, last 20) and spike ratio.

    ``loss_history`` (list, tuple, numpy array or 1-D tensor) is oldest first and should already
    contain ``current_loss`` (the guide appends it before calling; ``current_loss`` is accepted for
    the guide's signature and used only if the history is empty). Non-finite values are skipped and
    counted in ``stability/nonfinite_count``. Fewer than 2 finite values: only the count is returned.
    """
    return {k: float(v) for k, v in LossHistory.of(loss_history, current_loss).compute().items()}
