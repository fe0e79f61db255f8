"""An append-only record file that survives a full disk and a removed directory (JSONL, TensorBoard)."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("writers")

# Records are gathered and written with one os.write per batch: whole records, few syscalls.
WRITE_BYTES = 1 << 18
# What an outage may hold in memory before new records are dropped (and counted).
MAX_PENDING_BYTES = 64 << 20


class Outage:
    """Reports a backend's failure once when it starts and once when it ends, counting in between."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.errors = 0
        self.dropped = 0
        self._since: float | None = None
        self._dropped_at_start = 0

    @property
    def active(self) -> bool:
        return self._since is not None

    def failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        if self._since is None:
            self._since = time.monotonic()
            self._dropped_at_start = self.dropped
            log.warning(
                "%s: %s failed (%s: %s); records are kept and retried (dropped and counted beyond the "
                "buffer), training goes on",
                self.name,
                what,
                type(exc).__name__,
                exc,
            )

    def drop(self, records: int = 1) -> None:
        self.dropped += records

    def recovered(self) -> None:
        if self._since is not None:
            lost = self.dropped - self._dropped_at_start
            log.warning(
                "%s: recovered after %.1f s%s",
                self.name,
                time.monotonic() - self._since,
                f"; {lost} record(s) dropped during the outage" if lost else "; nothing was lost",
            )
            self._since = None

    def counts(self) -> dict[str, int]:
        return {self.name: self.errors + self.dropped} if self.errors or self.dropped else {}


class AppendFile:
    """Whole records appended to a file through a buffer, written in batches and on :meth:`flush`.

    A failed write (disk full, file-size limit, I/O error) keeps the unwritten bytes and tries again
    at the next write; a file whose directory was removed is opened anew (``open_file`` returns the
    path and the bytes a fresh file starts with). While failing, at most ``max_pending`` bytes are
    kept; later records are dropped and counted. Each outage is reported once, as is its end.
    Thread-safe (a timed flush may run beside the writer's own thread); never raises ``OSError``.
    """

    def __init__(
        self,
        name: str,
        open_file: Callable[[], tuple[Path, bytes]],
        *,
        write_bytes: int = WRITE_BYTES,
        max_pending: int = MAX_PENDING_BYTES,
    ) -> None:
        self.outage = Outage(name)
        self._open_file = open_file
        self._write_bytes = write_bytes
        self._max_pending = max_pending
        self._lock = threading.RLock()  # re-entrant: a SIGTERM handler may flush from inside append
        self._buffer = bytearray()
        self._fd = -1
        self.closed = False
        # the first open raises: a path that cannot be written at all is the user's to fix
        self.path, header = open_file()
        self._fd = _create(self.path)
        self._buffer += header

    def _open(self) -> bool:
        try:
            path, header = self._open_file()
            fd = _create(path)
        except OSError as exc:
            self.outage.failed("opening the file", exc)
            return False
        self._fd, self.path = fd, path
        self._buffer[:0] = header
        return True

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def append(self, data: bytes) -> None:
        with self._lock:
            if self.closed:
                raise RuntimeError(f"{self.outage.name}: write after close")
            if self.outage.active and len(self._buffer) + len(data) > self._max_pending:
                self.outage.drop()
                return
            self._buffer += data
            if len(self._buffer) >= self._write_bytes:
                self._write()

    def _write(self) -> bool:
        """Write the buffer; ``False`` (reported, bytes kept) when the file system refuses."""
        if self._fd >= 0 and os.fstat(self._fd).st_nlink == 0:
            # the file (or its directory) was removed: writing on would vanish with the inode
            log.warning("%s: %s was removed; writing to a new file", self.outage.name, self.path)
            os.close(self._fd)
            self._fd = -1
        if self._fd < 0 and not self._open():
            return False
        # No memoryview: one held by a failed write's traceback would pin the buffer's size.
        try:
            while self._buffer:
                written = os.write(self._fd, self._buffer)
                del self._buffer[:written]  # a partial write leaves the rest for later: no torn record
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO, errno.ESTALE):
                log.debug("%s: unexpected write error %s", self.outage.name, exc)
            self.outage.failed("writing", exc)
            return False
        self.outage.recovered()
        return True

    def flush(self, *, sync: bool = True) -> None:
        """Write what is buffered (and ``fsync`` it); a failure is reported, never raised."""
        with self._lock:
            if self.closed:
                return
            if self._write() and sync:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    self.outage.failed("fsync", exc)

    def close(self) -> None:
        with self._lock:
            self.flush()
            if self._buffer:
                self.outage.drop()
                log.warning(
                    "%s: closed with %d unwritten bytes (the file system kept refusing)",
                    self.outage.name,
                    len(self._buffer),
                )
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = -1
            self.closed = True
            self._buffer.clear()


def _create(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
