"""Run any writer on a background thread, so logging costs the training loop a queue append."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from ._media import Histogram, embedding_rows, image_png, is_figure, to_numpy
from .base import BaseWriter, LayoutDict, Location, Writer, check_step
from .lifecycle import DEFAULT_TIMEOUT, due, lifecycle

log = logging.getLogger("writers.background")

WhenFull = Literal["block", "drop"]
_STOP = object()
# While records come, the worker wakes every _TICK to write what came, rather than at each call: a wake
# per call hands the GIL to the worker between the training thread's every two torch ops. Idle for
# _IDLE, it sleeps until the next call; a flush, a close or a full queue wakes it at once.
_TICK = 0.05
_IDLE = 1.0


class BackgroundWriter(BaseWriter):
    """Queues every call for ``inner`` and runs it on one worker thread.

    ``inner`` may be a writer or a function that builds one: then it is built on the worker (a
    backend that starts slowly, such as an unreachable tracking server, starts in the background).
    The constructor waits ``timeout`` seconds at most for the build: an error within that time is
    raised here; after it, records are queued and the build's outcome is reported when known.

    Back-pressure: the queue holds ``max_queue`` calls. When it is full, ``when_full="block"`` (the
    default) makes the caller wait for room, so no record is ever lost; ``"drop"`` discards the new
    record instead and counts it in :attr:`dropped` (warned once). A backend that makes no progress for
    ``timeout`` seconds (a hung server) is reported once as stalled and its new records are dropped
    and counted until it has room again (reported once too), so it cannot stop training; ``flush``
    and ``close`` wait at most that long for it. Values are snapshotted when queued:
    metrics are copied, tensors copied to host arrays, figures rendered to PNG, wall time stamped.
    ``flush()`` returns when everything queued before it is written and flushed by ``inner``;
    ``close()`` drains the queue, then closes ``inner``. An error in ``inner`` is logged once with the
    backend's name, counted in :attr:`errors`, and with ``strict=True`` raised by the next call.
    """

    timed_flush = True

    def __init__(
        self,
        inner: Writer | Callable[[], Writer],
        *,
        name: str | None = None,
        max_queue: int = 10_000,
        when_full: WhenFull = "block",
        strict: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        all_ranks: bool = False,
    ) -> None:
        del all_ranks  # read by BaseWriter.__new__: on other ranks no thread is started
        if when_full not in ("block", "drop"):
            raise ValueError(f"when_full: got {when_full!r}; expected 'block' or 'drop'")
        if max_queue < 1:
            raise ValueError(f"max_queue: got {max_queue}; expected >= 1")
        if not timeout > 0:
            raise ValueError(f"timeout: got {timeout!r}; expected seconds > 0")
        if not isinstance(inner, Writer) and name is None:
            raise ValueError("name: required when inner is a function that builds the writer")
        self.inner: Writer | None = inner if isinstance(inner, Writer) else None
        self._encode: Callable[[Mapping[str, float], int, float], bytes] | None = None
        self._running = True
        self.name: str = name or str(getattr(inner, "name", "writer"))
        self.when_full = when_full
        self.strict = strict
        self.errors = 0
        self.dropped = 0
        self.timeout = timeout
        self.stalled = False
        self._first_error: BaseException | None = None
        self._started = threading.Event()
        self._handshake = threading.Lock()
        self._waiting = True
        self._start_error: BaseException | None = None
        self.max_queue = max_queue
        self._items: deque[Any] = deque()
        self._wake = threading.Event()
        self._asleep = True  # the worker waits for a wake, not for its tick
        self._room = threading.Condition()  # callers blocked on a full queue wait here
        self._room_wanted = False
        super().__init__()
        build = None if isinstance(inner, Writer) else inner
        self._thread = threading.Thread(
            target=self._work, args=(build,), name=f"writers-{self.name}", daemon=True
        )
        self._thread.start()
        if build is not None:
            self._await_start()
        else:
            self._adopt(inner)  # type: ignore[arg-type]

    def _adopt(self, inner: Writer) -> None:
        self.inner = inner
        self.flush_interval = getattr(inner, "flush_interval", self.flush_interval)
        lifecycle.forget(inner, timed_flush=True)  # closed and flushed in queue order, by this writer
        if callable(getattr(inner, "write_encoded", None)):
            # scalars are encoded on the caller's thread, where the values are at hand anyway: the
            # worker only appends bytes, and a record costs the training thread's GIL a few µs in all
            self._encode = getattr(inner, "encode_scalars", None)

    def _await_start(self) -> None:
        self._started.wait(self.timeout)
        with self._handshake:  # the worker reports a late failure itself, an early one is raised here
            self._waiting = False
            error = self._start_error if self._started.is_set() else None
        if error is not None:
            self._enqueue(_STOP, wake=True)
            self._thread.join(self.timeout)
            raise error
        if not self._started.is_set():
            log.warning(
                "writer %r is still starting after %.0f s (a slow or unreachable server?); its records "
                "are queued and written once it is up, training goes on",
                self.name,
                self.timeout,
            )

    # -- worker
    def _work(self, build: Callable[[], Writer] | None) -> None:
        try:
            self._serve(build)
        finally:
            self._running = False

    def _serve(self, build: Callable[[], Writer] | None) -> None:
        if build is not None:
            try:
                self._adopt(build())
                self._started.set()
            except Exception as exc:
                with self._handshake:
                    self._start_error = exc
                    self._started.set()
                    late = not self._waiting
                if late:
                    self._record_error("start", exc)
        idle_since = time.monotonic()
        while True:
            if not self._items:
                self._asleep = time.monotonic() - idle_since >= _IDLE
                if not self._asleep or not self._items:  # a caller may have queued before seeing it
                    self._wake.wait(None if self._asleep else _TICK)
                self._wake.clear()
                continue
            idle_since = time.monotonic()
            item = self._items.popleft()
            if type(item) is bytes:  # encoded scalars: those queued next to each other in one append
                parts = [item]
                while self._items and type(self._items[0]) is bytes:
                    parts.append(self._items.popleft())
                item = ("write_encoded", (b"".join(parts),), {}, None)
            if self._room_wanted:
                with self._room:
                    self._room.notify_all()
            if item is _STOP:
                return
            method, args, kwargs, done = item
            try:
                if self.inner is None:  # it never started: what was queued for it is lost
                    self.dropped += 1
                else:
                    getattr(self.inner, method)(*args, **kwargs)
                    if method == "flush" and getattr(self.inner, "dirty", False):
                        self._mark_dirty()  # it could not write everything: retry when due
            except Exception as exc:  # isolation: a backend failure must not kill the worker
                self._record_error(method, exc)
            finally:
                if done is not None:
                    done.set()

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
        done = threading.Event() if wait else None
        if not self._admit((method, args, kwargs, done), wake=done is not None, dirty=method != "flush"):
            return
        if done is not None:
            if not done.wait(self.timeout):
                self.errors += 1
                self._drop(stalled=True, count=False)
                return
            self._raise_if_strict()

    def _admit(self, item: Any, *, wake: bool = False, dirty: bool = True) -> bool:
        """Queue ``item`` (a call, or the bytes of encoded scalars); ``False`` when it was dropped."""
        if self._first_error is not None:
            self._raise_if_strict()
        if self._closed:
            raise RuntimeError(f"{self.name}: write after close")
        if not self._running:
            raise RuntimeError(f"{self.name}: the background worker has stopped")
        if len(self._items) >= self.max_queue and (
            self.when_full == "drop" or self.stalled or not self._wait_for_room(self.timeout)
        ):
            self._drop(stalled=self.when_full == "block")
            return False
        self._enqueue(item, wake=wake)
        if self.stalled:  # room again: the backend is making progress
            self.stalled = False
            log.warning(
                "writer %r is making progress again; %d record(s) were dropped while it stalled",
                self.name,
                self.dropped,
            )
        if dirty:
            self._mark_dirty()
        return True

    def _enqueue(self, item: Any, *, wake: bool) -> None:
        self._items.append(item)
        if wake or self._asleep or len(self._items) >= self.max_queue:
            self._wake.set()

    def _wait_for_room(self, timeout: float) -> bool:
        """Wait until the queue has room; ``False`` if it has none after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._room:
            self._room_wanted = True
            try:
                while len(self._items) >= self.max_queue:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._thread.is_alive():
                        return False
                    self._wake.set()
                    self._room.wait(min(left, _TICK))
            finally:
                self._room_wanted = False
        return True

    def _drop(self, *, stalled: bool, count: bool = True) -> None:
        if count:
            self.dropped += 1
        if stalled and not self.stalled:
            self.stalled = True
            log.warning(
                "writer %r made no progress for %.0f s; its new records are dropped and counted until it "
                "catches up (training and the other writers go on)",
                self.name,
                self.timeout,
            )
        elif not stalled and self.dropped == 1:
            log.warning("writer %r: queue full, dropping records (when_full='drop')", self.name)

    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        stamped = time.time() if wall_time is None else wall_time
        step = check_step(step)
        if self._encode is None:
            self._put("log_scalars", dict(metrics), step, wall_time=stamped)
        elif data := self._encode(metrics, step, stamped):  # b"": a step the resumed run already has
            self._admit(data)

    def log_histogram(self, tag: str, values: Any, step: int) -> None:
        snapshot = values if isinstance(values, Histogram) else to_numpy(values, tag).copy()
        self._put("log_histogram", tag, snapshot, check_step(step))

    def log_image(self, tag: str, image: Any, step: int) -> None:
        # matplotlib is not thread-safe: render figures here; copy arrays so training may reuse them
        snapshot = image_png(image, tag) if is_figure(image) else to_numpy(image, tag).copy()
        self._put("log_image", tag, snapshot, check_step(step))

    def log_embedding(self, tag: str, values: Any, step: int, metadata: Sequence[str] | None = None) -> None:
        if self.inner is not None and not hasattr(self.inner, "log_embedding"):  # optional in the protocol
            return
        rows = embedding_rows(values, metadata, tag).copy()  # training may reuse its tensor
        self._put("log_embedding", tag, rows, check_step(step), None if metadata is None else list(metadata))

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._put("log_config", dict(config))

    def log_layout(self, layout: LayoutDict) -> None:
        self._put("log_layout", layout)

    def define_summaries(self, summaries: Mapping[str, str]) -> None:
        self._put("define_summaries", dict(summaries))

    def locations(self) -> list[Location]:
        return self.inner.locations() if self.inner is not None else []

    def error_counts(self) -> dict[str, int]:
        """Failed calls, timed-out waits and dropped records, the inner writer's own included."""
        own = self.errors + self.dropped
        counts = dict(self.inner.error_counts()) if self.inner is not None else {}
        if own:
            counts[self.name] = counts.get(self.name, 0) + own
        return counts

    def flush_if_due(self, now: float) -> None:
        # from the timed-flush thread: queue the flush in order, never wait for it
        if due(self._dirty_since, self.flush_interval, now) and not self.closed and not self.stalled:
            self._dirty_since = None
            if len(self._items) < self.max_queue:
                self._enqueue(("flush", (), {}, None), wake=True)

    def _flush(self) -> None:
        self._put("flush", wait=True)

    def _close(self, failed: bool) -> None:
        deadline = time.monotonic() + self.timeout
        if self._thread.is_alive():
            for item in (("close", (), {"failed": failed}, None), _STOP):
                if len(self._items) >= self.max_queue and not self._wait_for_room(
                    max(0.0, deadline - time.monotonic())
                ):
                    break
                self._enqueue(item, wake=True)
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                self.errors += 1
                log.warning(
                    "writer %r did not finish within %.0f s; abandoned at close (what it had not "
                    "written is lost)",
                    self.name,
                    self.timeout,
                )
        self._raise_if_strict()
