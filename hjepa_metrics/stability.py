"""Loss stability over a history: ``stability/*``."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from itertools import islice

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

    The window's largest and smallest finite losses are kept as they come (monotonic queues) and the
    smoothness and trend windows are read from the end, so an update and a ``compute`` cost the same
    whether 10 or 1,000 losses are kept: a logger's cost per step does not grow with the run.
    """

    def __init__(self, maxlen: int | None = 1000) -> None:
        if maxlen is not None and maxlen < 1:
            raise ValueError(f"loss_history_size: got {maxlen}; expected >= 1 or None")
        self.values: deque[float] = deque(maxlen=maxlen)
        self._added = 0  # losses ever added: the index of the next one
        self._nonfinite = 0  # in the window
        # (index, loss) of the finite losses that may yet be the window's max (decreasing) and min
        self._high: deque[tuple[int, float]] = deque()
        self._low: deque[tuple[int, float]] = deque()

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
            self._extend(host_list(t.reshape(-1).to(accumulate_dtype(t.device))))
            return
        if isinstance(losses, (str, bytes)) or not isinstance(losses, (Sequence, int, float, np.generic)):
            raise TypeError(f"loss_history: got {type(losses).__name__}; expected a sequence of losses")
        items = list(losses) if isinstance(losses, Sequence) else [losses]
        if all(type(v) in _PLAIN_NUMBERS for v in items):  # nothing to check or read: 3x faster
            self._extend([float(v) for v in items])
            return
        host = to_host({str(i): scalar_tensor(v, f"loss_history[{i}]") for i, v in enumerate(items)})
        self._extend(list(host.values()))

    def _extend(self, losses: list[float]) -> None:
        if len(losses) < _BULK:
            for loss in losses:
                self._push(loss)
            return
        # many at once (a caller's whole history): the window's queues rebuilt in one numpy pass
        self.values.extend(losses)
        self._added += len(losses)
        window = np.fromiter(self.values, dtype=np.float64, count=len(self.values))
        finite = np.isfinite(window)
        self._nonfinite = int(window.size - np.count_nonzero(finite))
        index = np.flatnonzero(finite)
        kept = window[index]
        index += self._added - window.size
        if not kept.size:
            high = low = []
        elif self.values.maxlen is None:  # nothing ever leaves: only the extremes themselves matter
            top, bottom = int(kept.argmax()), int(kept.argmin())
            high, low = [(int(index[top]), float(kept[top]))], [(int(index[bottom]), float(kept[bottom]))]
        else:
            high = _monotonic_queue(index, kept, np.maximum, np.greater)
            low = _monotonic_queue(index, kept, np.minimum, np.less)
        self._high, self._low = deque(high), deque(low)

    def _push(self, loss: float) -> None:
        values, high, low, maxlen = self.values, self._high, self._low, self.values.maxlen
        if len(values) == maxlen and not math.isfinite(values[0]):
            self._nonfinite -= 1  # leaves the window below
        values.append(loss)
        index = self._added
        self._added += 1
        if maxlen is not None:  # one step of the window: at most one loss leaves each queue
            first = self._added - maxlen
            if high and high[0][0] < first:
                high.popleft()
            if low and low[0][0] < first:
                low.popleft()
        if not math.isfinite(loss):
            self._nonfinite += 1
            return
        while high and high[-1][1] <= loss:
            high.pop()
        while low and low[-1][1] >= loss:
            low.pop()
        # in an unbounded window nothing leaves: a loss that is not the new extreme can never become it
        if maxlen is not None or not high:
            high.append((index, loss))
        if maxlen is not None or not low:
            low.append((index, loss))

    def compute(self) -> RawValues:
        """Smoothness (population std of the last 50), trend slope (least squares, last 20, needs 5)
        and spike ratio (max / min, when min > 0) of the finite values, and the non-finite count."""
        out: RawValues = {"stability/nonfinite_count": float(self._nonfinite)}
        if len(self.values) - self._nonfinite < 2:
            return out
        tail = list(islice(filter(math.isfinite, reversed(self.values)), SMOOTHNESS_WINDOW))[::-1]
        mean = math.fsum(tail) / len(tail)
        out["stability/loss_smoothness"] = math.sqrt(math.fsum((v - mean) ** 2 for v in tail) / len(tail))
        recent = tail[-TREND_WINDOW:]
        k = len(recent)
        if k >= TREND_MIN_POINTS:
            recent_mean = math.fsum(recent) / k
            middle = (k - 1) / 2
            # Σ(i − middle)² over i = 0..k−1 is k(k² − 1)/12
            out["stability/loss_trend_slope"] = math.fsum(
                (i - middle) * (v - recent_mean) for i, v in enumerate(recent)
            ) / (k * (k * k - 1) / 12)
        low = self._low[0][1]
        if low > 0:
            out["stability/loss_spike_ratio"] = self._high[0][1] / low
        return out


# Losses added in one update from which the queues are rebuilt with numpy instead of one by one
_BULK = 32


def _monotonic_queue(
    index: np.ndarray, values: np.ndarray, extreme: np.ufunc, beyond: np.ufunc
) -> list[tuple[int, float]]:
    """``(index, value)`` of each value ``beyond`` (``np.greater``/``np.less``) every later one, in order:
    the queue that pushing ``values`` one by one leaves for the max (``np.maximum``) or min."""
    if not values.size:
        return []
    later = extreme.accumulate(values[::-1])[::-1]  # the extreme of each suffix
    keep = np.append(beyond(values[:-1], later[1:]), True)
    return list(zip(index[keep].tolist(), values[keep].tolist(), strict=True))


def training_stability(loss_history: Losses, current_loss: Scalar | None = None) -> dict[str, float]:
    """Smoothness (population std of the last 50), trend slope (least squares, last 20) and spike ratio.

    ``loss_history`` (list, tuple, numpy array or 1-D tensor) is oldest first and should already
    contain ``current_loss`` (the guide appends it before calling; ``current_loss`` is accepted for
    the guide's signature and used only if the history is empty). Non-finite values are skipped and
    counted in ``stability/nonfinite_count``. Fewer than 2 finite values: only the count is returned.
    """
    return {k: float(v) for k, v in LossHistory.of(loss_history, current_loss).compute().items()}
