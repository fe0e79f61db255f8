"""What happens to open writers when the process exits, is killed, forks, or goes quiet.

One process-wide :data:`lifecycle` object:

- **exit**: every writer still open at interpreter exit is closed, before W&B's own exit hook shuts
  its service down (the hook is re-registered after each writer is built, so it runs first);
- **crash**: an uncaught exception marks runs failed;
- **SIGTERM** (preemption, ``torchrun``, ``scancel``): every open writer is flushed and closed with
  the run marked killed, then the process terminates as it would have (a handler installed before
  ours is called instead, after a flush, and decides);
- **fork** (DataLoader workers): a child never flushes, closes or writes its parent's writers;
- **quiet spells**: a writer holding unwritten records flushes them within its ``flush_interval``
  (default :data:`DEFAULT_FLUSH_INTERVAL` s), so a SIGKILL loses at most that much.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import weakref
from types import FrameType, TracebackType
from typing import Any, Protocol

log = logging.getLogger("writers")

DEFAULT_FLUSH_INTERVAL = 5.0
# The longest any call (construction, logging, flush, close, SIGTERM) may hold up training because a
# backend is slow, hung or unreachable.
DEFAULT_TIMEOUT = 10.0
_TICK = 0.25


class Closable(Protocol):
    name: str

    def close(self, failed: bool | None = None) -> None: ...

    def flush(self) -> None: ...

    def flush_if_due(self, now: float) -> None: ...


class Lifecycle:
    """Tracks open writers of this process and ends them properly whatever ends the process."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.failed = False  # an uncaught exception is killing the process
        self.killed = False  # SIGTERM was received
        self.close_timeout = DEFAULT_TIMEOUT
        self._lock = threading.Lock()
        self._open: weakref.WeakSet[Any] = weakref.WeakSet()
        self._flushable: weakref.WeakSet[Any] = weakref.WeakSet()
        self._flusher: threading.Thread | None = None
        self._wake = threading.Event()
        self._hooked = False
        self._sigterm_installed = False
        self._previous_sigterm: Any = signal.SIG_DFL

    # -- registration
    def track(self, writer: Closable, *, timed_flush: bool = True) -> None:
        """Close ``writer`` at exit and on SIGTERM; flush it when due if ``timed_flush``."""
        with self._lock:
            self._install()
            self._open.add(writer)
            if timed_flush:
                self._flushable.add(writer)
                self._start_flusher()

    def forget(self, writer: Any, *, timed_flush: bool = False) -> None:
        """Stop closing ``writer`` at exit (a wrapper owns it and closes it in order), and with
        ``timed_flush`` stop flushing it too (it is closed, or the wrapper flushes it in order)."""
        with contextlib.suppress(TypeError):  # not weak-referenceable: never tracked
            self._open.discard(writer)
            if timed_flush:
                self._flushable.discard(writer)

    def is_foreign(self, owner_pid: int) -> bool:
        """Whether a writer opened by ``owner_pid`` belongs to a parent of this (forked) process."""
        return owner_pid != self.pid

    # -- hooks
    def _install(self) -> None:
        if not self._hooked:
            self._hooked = True
            previous = sys.excepthook

            def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
                self.failed = True
                previous(exc_type, exc, tb)

            sys.excepthook = hook
            os.register_at_fork(after_in_child=self._after_fork_in_child)
        # atexit runs hooks last-registered first: moving ours to the end makes it run before the
        # hooks of backends built since (W&B's service teardown), while they still work
        atexit.unregister(self._at_exit)
        atexit.register(self._at_exit)
        self._install_sigterm()

    def _install_sigterm(self) -> None:
        if self._sigterm_installed or threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; retried when a writer is built there
        previous = signal.getsignal(signal.SIGTERM)
        if previous == signal.SIG_IGN:
            return  # the process chose to survive SIGTERM: so do its runs
        try:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main interpreter
            return
        self._previous_sigterm = previous
        self._sigterm_installed = True

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.killed = True
        previous = self._previous_sigterm
        if callable(previous):
            # someone else handles SIGTERM (Lightning's requeue, a user's checkpoint): keep the runs
            # open for them, but put everything on disk first
            self._bounded("flush", lambda w: w.flush())
            previous(signum, frame)
            return
        log.warning("SIGTERM: closing %d writer(s) as killed, then terminating", len(self._open))
        self._bounded("close", lambda w: w.close(failed=True))
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    def _bounded(self, action: str, call: Any) -> None:
        """``call`` on every open writer, on a helper thread: the signal may have interrupted the main
        thread inside a writer's lock, so waiting there could deadlock; wait ``close_timeout`` at most."""

        def each() -> None:
            for writer in list(self._open):
                try:
                    call(writer)
                except Exception:
                    log.exception("%s of %s on SIGTERM failed", action, writer.name)

        helper = threading.Thread(target=each, name=f"writers-sigterm-{action}", daemon=True)
        helper.start()
        helper.join(self.close_timeout)
        if helper.is_alive():
            log.warning("SIGTERM: writers did not %s within %.0f s; going on", action, self.close_timeout)

    def _at_exit(self) -> None:
        self._wake.set()
        for writer in list(self._open):
            try:
                writer.close(failed=self.failed or self.killed)
            except Exception:
                log.exception("closing %s at exit failed", writer.name)

    def _after_fork_in_child(self) -> None:
        # the child shares its parent's files and runs but not their threads: it must not end them
        self.pid = os.getpid()
        self._open = weakref.WeakSet()
        self._flushable = weakref.WeakSet()
        self._flusher = None
        self._wake = threading.Event()
        self._lock = threading.Lock()

    # -- timed flush
    def _start_flusher(self) -> None:
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(target=self._flush_loop, name="writers-flush", daemon=True)
            self._flusher.start()

    def _flush_loop(self) -> None:
        wake = self._wake
        while not wake.wait(_TICK):
            now = time.monotonic()
            for writer in list(self._flushable):
                try:
                    writer.flush_if_due(now)
                except Exception as exc:  # the writer reports its own failures; this thread goes on
                    log.debug("timed flush of %s failed: %s", writer.name, exc)


lifecycle = Lifecycle()


def due(dirty_since: float | None, interval: float, now: float) -> bool:
    """Whether records buffered since ``dirty_since`` must be written now to be at most ``interval``
    seconds old when the flusher next looks."""
    return dirty_since is not None and now - dirty_since >= interval - _TICK
