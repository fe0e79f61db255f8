"""The writer process of :class:`writers.process.ProcessWriter` (``python -m writers._child``).

Reads frames from stdin: first the pickled factory, then calls, flushes and a close, answering
flushes and the close on the original stdout. End of file before a close means the training process
died: the writer is flushed and closed as killed, then this process exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import IO, Any

from .base import Writer
from .lifecycle import DEFAULT_TIMEOUT, lifecycle
from .process import receive_frame, send_frame

log = logging.getLogger("writers.process")

# How long a writer orphaned by its training process may take to close (a slow server included).
ORPHAN_CLOSE_TIMEOUT = 12 * DEFAULT_TIMEOUT
LOWEST_PRIORITY = 19  # the nice value of a writer process


def main() -> None:
    # Ctrl-C and a SIGTERM to the process group are the training process's to handle: it closes this
    # writer in order, or dies and leaves end of file, which closes it just the same.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(os, "setpgid"):
        # signals to the job's process group are not its own either; the session stays the job's
        # (a session of its own would also be scheduled apart from training: see below)
        os.setpgid(0, 0)
    replies: IO[bytes] = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what backends print goes to stderr
    logging.basicConfig(level=logging.WARNING, format="%(name)s (writer process): %(message)s")
    requests = sys.stdin.buffer
    build = receive_frame(requests)
    if build is None:
        return
    try:
        writer: Writer = build()
    except BaseException as exc:
        send_frame(replies, ("failed", type(exc).__name__, str(exc)))
        return
    _yield_cpu_to_training()
    send_frame(replies, ("started", writer.locations()))
    serve(writer, requests, replies)


def _yield_cpu_to_training() -> None:
    """Once the writer is up, this process, its threads and the processes it started (W&B's service)
    drop to the lowest CPU priority, so that writing never slows training down. Starting (imports,
    creating the run) runs at full speed: training waits for it."""
    if not os.path.isdir("/proc/self/task"):  # not Linux: the whole process at once
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, 0, LOWEST_PRIORITY)
        return
    # This ranks the writer below training only because it stays in the training job's session:
    # Linux shares the CPU between sessions' autogroups first. A process started in a session of its
    # own (W&B's service) is an autogroup that its nice value does not lower: lower the autogroup's
    # (the kernel takes one such change per 100 ms from an unprivileged process, hence the retries).
    own = os.getsid(0)
    for pid in [os.getpid(), *_descendants(os.getpid())]:
        with contextlib.suppress(OSError, ValueError):
            if os.getsid(pid) == own:
                for thread in os.listdir(f"/proc/{pid}/task"):  # a nice value is per thread
                    os.setpriority(os.PRIO_PROCESS, int(thread), LOWEST_PRIORITY)
                continue
            for _ in range(20):
                try:
                    with open(f"/proc/{pid}/autogroup", "w") as group:
                        group.write(str(LOWEST_PRIORITY))
                    break
                except BlockingIOError:
                    time.sleep(0.05)


def _descendants(root: int) -> list[int]:
    """The processes below ``root`` (Linux ``/proc``; none elsewhere)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{entry}/stat") as stat:
                        parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                    children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def serve(writer: Writer, requests: IO[bytes], replies: IO[bytes]) -> None:
    errors = 0

    def answer(seq: int) -> None:
        counts = dict(writer.error_counts())
        if errors:
            counts[writer.name] = counts.get(writer.name, 0) + errors
        send_frame(replies, ("ack", seq, counts))

    while True:
        message = receive_frame(requests)
        if message is None:  # the training process is gone without closing: it was killed
            lifecycle.killed = True
            _bounded_close(writer)
            return
        kind = message[0]
        try:
            if kind == "call":
                _, method, args, kwargs = message
                getattr(writer, method)(*args, **kwargs)
            elif kind == "flush":
                writer.flush()
            elif kind == "close":
                _, failed, killed, seq = message
                lifecycle.killed = lifecycle.killed or bool(killed)
                writer.close(failed=failed)
                answer(seq)
                return
        except Exception as exc:  # one failing call must not stop the others
            errors += 1
            if errors == 1:
                log.warning(
                    "%s failed in %s (%s: %s); further errors are counted",
                    writer.name,
                    kind,
                    type(exc).__name__,
                    exc,
                )
        if kind == "flush":
            answer(message[-1])


def _bounded_close(writer: Any) -> None:
    closer = threading.Thread(target=lambda: writer.close(failed=True), daemon=True)
    closer.start()
    closer.join(ORPHAN_CLOSE_TIMEOUT)


if __name__ == "__main__":
    main()
