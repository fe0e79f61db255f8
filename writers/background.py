"""Run any writer on a background thread, so logging costs the training loop a queue put."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal

from ._media import Histogram, image_png, is_figure, to_numpy
from .base import BaseWriter, LayoutDict, Location, Writer, check_step, crash_watch

log = logging.getLogger("writers.background")

WhenFull = Literal["block", "drop"]
_STOP = object()


class BackgroundWriter(BaseWriter):
    """Queues every call for ``inner`` and runs it on one worker thread.

    Back-pressure: the queue holds ``max_queue`` calls. When it is full, ``when_full="block"`` (the
    default) makes the caller wait for room, so no record is ever lost; ``"drop"`` discards the new
    record instead and counts it in :attr:`dropped` (warned once). A backend that makes no progress for
    ``stall_timeout`` seconds (a hung server) is reported once as stalled and its new records are dropped
    and counted until it has room again, so it cannot stop training; ``flush`` and ``close`` wait at most
    that long for it. Values are snapshotted when queued:
    metrics are copied, tensors copied to host arrays, figures rendered to PNG, wall time stamped.
    ``flush()`` returns when everything queued before it is written and flushed by ``inner``;
    ``close()`` drains the queue, then closes ``inner``. An error in ``inner`` is logged once with the
    backend's name, counted in :attr:`errors`, and with ``strict=True`` raised by the next call.
    """

    def __init__(
        self,
        inner: Writer,
        *,
        max_queue: int = 10_000,
        when_full: WhenFull = "block",
        strict: bool = False,
        stall_timeout: float = 120.0,
    ) -> None:
        if when_full not in ("block", "drop"):
            raise ValueError(f"when_full: got {when_full!r}; expected 'block' or 'drop'")
        if max_queue < 1:
            raise ValueError(f"max_queue: got {max_queue}; expected >= 1")
        self.inner = inner
        self.name = inner.name
        self.when_full = when_full
        self.strict = strict
        self.errors = 0
        self.dropped = 0
        self.stall_timeout = stall_timeout
        self.stalled = False
        self._first_error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._work, name=f"writers-{self.name}", daemon=True)
        self._thread.start()
        super().__init__()
        crash_watch.forget(inner)

    # -- worker
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                method, args, kwargs, done = item
                try:
                    getattr(self.inner, method)(*args, **kwargs)
                except Exception as exc:  # isolation: a backend failure must not kill the worker
                    self._record_error(method, exc)
                finally:
                    if done is not None:
                        done.set()
            finally:
                self._queue.task_done()

    def _record_error(self, method: str, exc: BaseException) -> None:
        self.errors += 1
        if self._first_error is None:
            self._first_error = exc
            log.warning(
                "writer %r failed in %s (%s: %s); training and the other writers go on, further errors "
                "of this writer are counted",
                self.name,
                method,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )

    # -- caller side
    def _raise_if_strict(self) -> None:
        if self.strict and self._first_error is not None:
            error, self._first_error = self._first_error, None
            raise RuntimeError(f"writer {self.name!r} failed in the background") from error

    def _put(self, method: str, *args: Any, wait: bool = False, **kwargs: Any) -> None:
        self._raise_if_strict()
        if self.closed:
            raise RuntimeError(f"{self.name}: write after close")
        if not self._thread.is_alive():
            raise RuntimeError(f"{self.name}: the background worker has stopped")
        done = threading.Event() if wait else None
        item = (method, args, kwargs, done)
        try:
            if self.when_full == "drop" or self.stalled:
                self._queue.put_nowait(item)
            else:
                self._queue.put(item, timeout=self.stall_timeout)
            self.stalled = False
        except queue.Full:
            self._drop(stalled=self.when_full == "block")
            return
        if done is not None:
            if not done.wait(self.stall_timeout):
                self._drop(stalled=True, count=False)
                return
            self._raise_if_strict()

    def _drop(self, *, stalled: bool, count: bool = True) -> None:
        if count:
            self.dropped += 1
        if stalled and not self.stalled:
            self.stalled = True
            log.warning(
                "writer %r made no progress for %.0f s; its new records are dropped and counted until it "
                "catches up (training and the other writers go on)",
                self.name,
                self.stall_timeout,
            )
        elif not stalled and self.dropped == 1:
            log.warning("writer %r: queue full, dropping records (when_full='drop')", self.name)

    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        stamped = time.time() if wall_time is None else wall_time
        self._put("log_scalars", dict(metrics), check_step(step), wall_time=stamped)

    def log_histogram(self, tag: str, values: Any, step: int) -> None:
        snapshot = values if isinstance(values, Histogram) else to_numpy(values, tag).copy()
        self._put("log_histogram", tag, snapshot, check_step(step))

    def log_image(self, tag: str, image: Any, step: int) -> None:
        # matplotlib is not thread-safe: render figures here; copy arrays so training may reuse them
        snapshot = image_png(image, tag) if is_figure(image) else to_numpy(image, tag).copy()
        self._put("log_image", tag, snapshot, check_step(step))

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._put("log_config", dict(config))

    def log_layout(self, layout: LayoutDict) -> None:
        self._put("log_layout", layout)

    def define_summaries(self, summaries: Mapping[str, str]) -> None:
        self._put("define_summaries", dict(summaries))

    def locations(self) -> list[Location]:
        return self.inner.locations()

    def error_counts(self) -> dict[str, int]:
        return {self.name: self.errors} if self.errors else {}

    def flush(self) -> None:
        self._put("flush", wait=True)

    def _close(self, failed: bool) -> None:
        if self._thread.is_alive():
            try:
                self._queue.put(("close", (), {"failed": failed}, None), timeout=self.stall_timeout)
                self._queue.put(_STOP, timeout=self.stall_timeout)
            except queue.Full:
                pass
            self._thread.join(self.stall_timeout)
            if self._thread.is_alive():
                log.warning(
                    "writer %r did not finish within %.0f s; abandoned at close",
                    self.name,
                    self.stall_timeout,
                )
        self._raise_if_strict()
