"""The writer process of :class:`writers.process.ProcessWriter` (``python -m writers._child``).

Reads frames from stdin: first the pickled factory, then calls, flushes and a close, answering
flushes and the close on the original stdout. End of file before a close means the training process
died: the writer is flushed and closed as killed, then this process exits.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import IO, Any

from . import _priority
from .base import Writer
from .lifecycle import DEFAULT_TIMEOUT, lifecycle
from .process import receive_frame, send_frame

log = logging.getLogger("writers.process")

# How long a writer orphaned by its training process may take to close (a slow server included).
ORPHAN_CLOSE_TIMEOUT = 12 * DEFAULT_TIMEOUT


def main() -> None:
    # A session of its own (ProcessWriter starts it so) keeps Ctrl-C and a kill of the job's process
    # group away; a SIGTERM to every process (a batch scheduler's) is the training process's to
    # handle too: it closes this writer in order, or dies and leaves end of file, which closes it
    # just the same.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
    # starting (imports, creating the run) ran at full speed: training waits for it
    _priority.lower(os.getpid())
    send_frame(replies, ("started", writer.locations()))
    serve(writer, requests, replies)


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
            _priority.restore(os.getpid())  # nothing left to slow down
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
