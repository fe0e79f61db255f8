"""One writer from whatever the caller has: writers, a config, or the guide's ``metrics_logger``."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .base import BaseWriter, Writer
from .config import build_writers
from .multi import MultiWriter

log = logging.getLogger("writers")


class MetricsLoggerWriter(BaseWriter):
    """A writer over the guide's ``metrics_logger``: any object with
    ``log_metrics(metrics, step, prefix, commit)`` and, optionally, ``log_histogram``/``log_image``
    ``(tag, value, step)`` and ``flush()``. Media it cannot take are skipped with one warning."""

    name = "metrics_logger"

    def __init__(self, target: Any) -> None:
        if not callable(getattr(target, "log_metrics", None)):
            raise TypeError(
                f"metrics_logger: got {type(target).__name__}; expected a Writer or an object with "
                "log_metrics(metrics, step, prefix, commit)"
            )
        self.target = target
        self._warned: set[str] = set()
        super().__init__()

    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        self.target.log_metrics(dict(metrics), step=step, prefix="", commit=True)

    def _media(self, kind: str, tag: str, value: Any, step: int) -> None:
        method = getattr(self.target, f"log_{kind}", None)
        if callable(method):
            method(tag, value, step)
        elif kind not in self._warned:
            self._warned.add(kind)
            log.warning(
                "%s has no log_%s; %s records are not written there", type(self.target).__name__, kind, kind
            )

    def log_histogram(self, tag: str, values: Any, step: int) -> None:
        self._media("histogram", tag, values, step)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        self._media("image", tag, image, step)

    def log_embedding(self, tag: str, values: Any, step: int, metadata: Sequence[str] | None = None) -> None:
        del metadata  # a log_metrics object's log_embedding, if any, takes (tag, values, step)
        self._media("embedding", tag, values, step)

    def _flush(self) -> None:
        flush = getattr(self.target, "flush", None)
        if callable(flush):
            flush()


def writer_from(
    writers: Writer | Sequence[Writer] | None = None,
    *,
    config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    metrics_logger: Any = None,
) -> Writer:
    """The one writer for ``writers`` (one or several), ``config`` (see :func:`build_writers`) or the
    guide's ``metrics_logger`` (a writer or a ``log_metrics`` object); give at most one of them. With
    none, :func:`build_writers` reads ``HJEPA_METRICS_*`` or uses its defaults."""
    if metrics_logger is not None:
        if writers is not None or config is not None:
            raise ValueError("metrics_logger: give either metrics_logger, writers or config, not several")
        return metrics_logger if isinstance(metrics_logger, Writer) else MetricsLoggerWriter(metrics_logger)
    if writers is not None:
        if config is not None:
            raise ValueError("writers: give either writers or config, not both")
        return writers if isinstance(writers, Writer) else MultiWriter(list(writers))
    return build_writers(config)
