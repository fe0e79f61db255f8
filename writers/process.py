"""A writer in a child Python process: off the training process's GIL, and alive after it dies.

The child is a fresh interpreter (``python -m writers._child``, so the training script is never
re-imported) that builds the writer from a pickled factory and runs every call it is sent, in
order. Its timed flush runs there. If the training process dies, even of SIGKILL or an OOM kill, the
child reads end-of-file on its pipe, flushes, closes the run as killed and exits: what the training
process had sent is written, and the run does not stay "running".
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

from . import _priority
from ._media import embedding_rows, image_png, is_figure, to_numpy
from .base import BaseWriter, LayoutDict, Location, Writer, check_step
from .lifecycle import DEFAULT_TIMEOUT, lifecycle

log = logging.getLogger("writers.process")

_LENGTH = struct.Struct("<I")
# The pipe to the child holds this much; beyond it, calls wait in memory up to MAX_PENDING_BYTES.
_PIPE_BYTES = 1 << 20
MAX_PENDING_BYTES = 64 << 20
# a flush still unanswered after this long gets the writer process normal priority until it answers
BOOST_AFTER = 0.5
# Errors the parent re-raises as themselves (a missing extra, a bad option): the user's to fix.
_USER_ERRORS: dict[str, type[Exception]] = {
    "ImportError": ImportError,
    "ModuleNotFoundError": ImportError,
    "ValueError": ValueError,
    "TypeError": TypeError,
}


def frame(message: Any) -> bytes:
    """``message`` pickled, behind its length."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def send_frame(stream: IO[bytes], message: Any) -> None:
    stream.write(frame(message))
    stream.flush()


def receive_frame(stream: IO[bytes]) -> Any:
    """The next message, or ``None`` at end of file (the other process is gone)."""
    header = _read_exactly(stream, _LENGTH.size)
    if header is None:
        return None
    data = _read_exactly(stream, _LENGTH.unpack(header)[0])
    return None if data is None else pickle.loads(data)


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


_open_writers: weakref.WeakSet[ProcessWriter] = weakref.WeakSet()


def _detach_in_forked_child() -> None:
    # A fork (a DataLoader worker) inherits the pipes; were they kept open, the writer process would
    # not see end-of-file when the training process dies. Point them at /dev/null: nothing the fork
    # does, garbage collection included, can reach the writer process.
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for writer in list(_open_writers):
            writer._detach(devnull)
    finally:
        os.close(devnull)


os.register_at_fork(after_in_child=_detach_in_forked_child)


class ProcessWriter(BaseWriter):
    """Runs the writer that ``build()`` returns in a child process (``build`` must pickle: a
    module-level function or a ``functools.partial`` of one).

    Calls never block: each is pickled into the pipe to the child, or, while the child is slow and
    the pipe full, kept in memory (up to ``max_pending`` bytes, then dropped and counted) and pushed
    on by the timed flush. The constructor waits ``timeout`` seconds at most for the child to build
    its writer: a failure by then is raised here (as ``ImportError``/``ValueError``/``TypeError``
    where it is the user's to fix); a slower start goes on in the background, and a late failure is
    logged and counted. ``flush()`` waits until the child has written everything sent before it,
    ``close()`` until it has closed the run, each for ``timeout`` seconds at most: a child still busy
    then finishes on its own, one that never started is stopped. The child runs at the lowest CPU
    priority except while training waits for it (the close, a flush not answered within
    ``BOOST_AFTER`` seconds): see :mod:`writers._priority`. Errors in the child are logged
    there (on this process's stderr) and counted back with each flush; with ``strict=True`` a flush
    or close that finds new errors raises.
    """

    timed_flush = True  # pushes on what the pipe could not take yet

    def __init__(
        self,
        build: Callable[[], Writer],
        *,
        name: str,
        timeout: float = DEFAULT_TIMEOUT,
        max_pending: int = MAX_PENDING_BYTES,
        strict: bool = False,
        all_ranks: bool = False,
    ) -> None:
        del all_ranks  # read by BaseWriter.__new__: on other ranks no process is started
        self.name = name
        self.timeout = timeout
        self.strict = strict
        self.dropped = 0
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._out = bytearray(frame(build))  # the factory goes first; pickling fails here, not there
        self._replies: dict[int, threading.Event] = {}
        self._counts: dict[str, int] = {}
        self._errors = 0
        self._seq = 0
        self._gone = False
        self._slow = False
        self._closing = False
        self._started = threading.Event()
        self._awaiting = True  # the constructor raises a failure it sees; the reader reports a later one
        self._start_failure: tuple[str, str] | None = None
        self._locations: list[Location] = []
        env = dict(os.environ)
        # the child imports what this process imports (a source checkout, a user's backend module)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "writers._child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
            close_fds=True,
            # Ctrl-C and a kill of the job's process group are not its own (it closes the runs
            # after them), and a session is what Linux schedules first: see _priority
            start_new_session=True,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._to_child = self._proc.stdin
        self._from_child: IO[bytes] = self._proc.stdout
        _grow_pipe(self._to_child.fileno())
        os.set_blocking(self._to_child.fileno(), False)
        with self._lock:
            self._drain()
        self._reader = threading.Thread(
            target=self._read_replies, name=f"writers-{name}-replies", daemon=True
        )
        self._reader.start()
        _open_writers.add(self)
        super().__init__()
        self._await_start()

    def _await_start(self) -> None:
        started = self._started.wait(self.timeout)
        with self._lock:
            self._awaiting = False
        if not started:
            log.warning(
                "%s: its writer process is still starting after %.0f s (a slow import, or a slow or "
                "unreachable server?); records are queued for it, training goes on",
                self.name,
                self.timeout,
            )
            return
        if self._start_failure is not None:
            kind, message = self._start_failure
            self._end_child()
            super().close()
            raise _USER_ERRORS.get(kind, RuntimeError)(
                f"{self.name} (in its writer process): {kind}: {message}"
            )

    # -- replies
    def _read_replies(self) -> None:
        first = receive_frame(self._from_child)
        if first is not None and first[0] == "started":
            self._locations = list(first[1])
        elif first is not None:
            with self._lock:
                self._start_failure = (first[1], first[2])
                late = not self._awaiting
            if late:
                self._errors += 1
                log.warning(
                    "%s failed to start in its writer process (%s: %s); its records are dropped and "
                    "counted, training goes on",
                    self.name,
                    first[1],
                    first[2],
                )
        with self._lock:
            self._started.set()
            closing = self._closing
        if first is not None and first[0] == "started":
            if closing:  # it lowered itself as it started, while training already waits for it
                _priority.restore(self._proc.pid)
            while (reply := receive_frame(self._from_child)) is not None:
                _, seq, counts = reply
                self._counts = dict(counts)
                event = self._replies.pop(seq, None)
                if event is not None:
                    event.set()
        with self._lock:
            self._gone = True
        with contextlib.suppress(OSError):
            self._from_child.close()
        for event in list(self._replies.values()):
            event.set()
        if self._start_failure is None and not self._closed:
            log.warning(
                "%s: its writer process exited (code %s); further records are dropped and counted",
                self.name,
                self._proc.wait(),
            )

    # -- sending
    def _enqueue(self, message: tuple[Any, ...], *, reply: bool = False) -> threading.Event | None:
        """Queue ``message`` for the child and push what the pipe takes now; never blocks."""
        event = threading.Event() if reply else None
        with self._lock:
            if self._gone:
                self.dropped += 1
                return None
            if event is not None:
                self._seq += 1
                self._replies[self._seq] = event
                message = (*message, self._seq)
            data = frame(message)
            if self._out and len(self._out) + len(data) > self._max_pending:
                self.dropped += 1
                if self.dropped == 1 or not self._slow:
                    self._slow = True
                    log.warning(
                        "%s: its writer process is not keeping up (%d bytes waiting); new records are "
                        "dropped and counted until it catches up",
                        self.name,
                        len(self._out),
                    )
                return None
            self._out += data
            self._drain()
            if self._out:
                self._mark_dirty()
        return event

    def _drain(self) -> None:
        """Write what waits into the pipe, as much as it takes without blocking (lock held)."""
        while self._out and not self._gone:
            try:
                written = os.write(self._to_child.fileno(), self._out)
            except BlockingIOError:
                return
            except (OSError, ValueError):  # the child is gone, or the pipe closed
                self._gone = True
                self.dropped += 1
                self._out.clear()
                return
            del self._out[:written]

    def _push(self, deadline: float) -> bool:
        """Drain until everything is in the pipe, waiting for room until ``deadline``."""
        while True:
            with self._lock:
                self._drain()
                if not self._out or self._gone:
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(OSError, ValueError):
                select.select([], [self._to_child.fileno()], [], min(left, 0.25))

    def flush_if_due(self, now: float) -> None:
        # the timed flush: push on what waits in memory; the child flushes its writer on its own timer
        del now
        with self._lock:
            self._drain()
            if not self._out:
                self._dirty_since = None

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name}: write after close")
        self._enqueue(("call", method, args, kwargs))

    def _request(self, message: tuple[Any, ...], what: str, *, boost_after: float | None = None) -> bool:
        """Send ``message`` and wait (``timeout`` at most) for the child to answer it. A child that has
        not answered after ``boost_after`` seconds runs at normal priority until it does: training is
        waiting for it meanwhile (see :mod:`writers._priority`)."""
        start = time.monotonic()
        deadline = start + self.timeout
        event = self._enqueue(message, reply=True)
        if event is None:
            return False

        def answered(until: float) -> bool:
            return self._push(until) and event.wait(max(0.0, until - time.monotonic()))

        if boost_after is None:
            done = answered(deadline)
        else:
            done = answered(min(deadline, start + boost_after))
            if not done:
                with self._boosted():
                    done = answered(deadline)
        if done:
            self._slow = False
        elif not self._slow:
            self._slow = True
            self._errors += 1
            log.warning(
                "%s: its writer process did not %s within %.0f s; it goes on in the background",
                self.name,
                what,
                self.timeout,
            )
        return done

    @contextlib.contextmanager
    def _boosted(self) -> Iterator[None]:
        """The child at normal priority for the block, then back to the lowest (a child still starting
        or already closing is left as it is)."""
        with self._lock:
            boost = self._started.is_set() and not self._closing
        if boost:
            _priority.restore(self._proc.pid)
        try:
            yield
        finally:
            if boost:
                _priority.lower(self._proc.pid)

    # -- the writer protocol
    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        stamped = time.time() if wall_time is None else wall_time
        self._call("log_scalars", {str(k): float(v) for k, v in metrics.items()}, check_step(step), stamped)

    def log_histogram(self, tag: str, values: Any, step: int) -> None:
        snapshot = values if hasattr(values, "edges") else to_numpy(values, tag)
        self._call("log_histogram", tag, snapshot, check_step(step))

    def log_image(self, tag: str, image: Any, step: int) -> None:
        snapshot = image_png(image, tag) if is_figure(image) else image
        if not isinstance(snapshot, (bytes, bytearray)):
            snapshot = to_numpy(snapshot, tag)
        self._call("log_image", tag, snapshot, check_step(step))

    def log_embedding(self, tag: str, values: Any, step: int, metadata: Sequence[str] | None = None) -> None:
        labels = None if metadata is None else list(metadata)
        self._call("log_embedding", tag, embedding_rows(values, metadata, tag), check_step(step), labels)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._call("log_config", dict(config))

    def log_layout(self, layout: LayoutDict) -> None:
        self._call("log_layout", dict(layout))

    def define_summaries(self, summaries: Mapping[str, str]) -> None:
        self._call("define_summaries", dict(summaries))

    def locations(self) -> list[Location]:
        return list(self._locations)

    def error_counts(self) -> dict[str, int]:
        """The child writer's counts (as of its last answer), plus calls that timed out or never
        reached it."""
        counts = dict(self._counts)
        own = self._errors + self.dropped
        if own:
            counts[self.name] = counts.get(self.name, 0) + own
        return counts

    def _flush(self) -> None:
        before = sum(self.error_counts().values())
        self._request(("flush",), "flush", boost_after=BOOST_AFTER)
        self._raise_if_strict(before)

    def _raise_if_strict(self, before: int) -> None:
        if self.strict and sum(self.error_counts().values()) > before:
            raise RuntimeError(f"writer {self.name!r} failed in its writer process: {self.error_counts()}")

    def _close(self, failed: bool) -> None:
        _open_writers.discard(self)
        deadline = time.monotonic() + self.timeout
        before = sum(self.error_counts().values())
        with self._lock:
            self._closing = True
            started = self._started.is_set()
        if started:  # training waits for it now: full speed for what is queued and the close
            _priority.restore(self._proc.pid)
        self._request(("close", failed, lifecycle.killed), "close")
        if not self._started.is_set():
            self._errors += 1
            log.warning(
                "%s: its writer process never started; stopped at close, its records were not written",
                self.name,
            )
        if not self._started.is_set() or self._start_failure is not None:
            self._end_child()  # it never started: nothing of the run is in flight
        with self._lock:
            if self._out:
                self.dropped += 1
                log.warning("%s: %d bytes never reached its writer process", self.name, len(self._out))
                self._out.clear()
            self._gone = True
            with contextlib.suppress(OSError):
                self._to_child.close()  # end of file: the child exits once it has closed the run
        with contextlib.suppress(subprocess.TimeoutExpired):
            # reaped now when it is done; a busy one finishes on its own
            self._proc.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
        self._reader.join(timeout=0.1)
        self._raise_if_strict(before)

    def _end_child(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(OSError):
                # with what it started in its group (W&B's service, in a session of its own, watches
                # its parent's pid and exits after it)
                os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()

    def _detach(self, devnull: int) -> None:
        for stream in (self._to_child, self._from_child):
            with contextlib.suppress(OSError, ValueError):
                os.dup2(devnull, stream.fileno())
        self._gone = True


def _grow_pipe(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # not a POSIX system: the default pipe size will do
        return
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
    if setsize is not None:
        with contextlib.suppress(OSError):  # above pipe-max-size: the default 64 KiB will do
            fcntl.fcntl(fd, setsize, _PIPE_BYTES)
