"""Fan-out to several writers, each isolated from the others' failures."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .base import BaseWriter, LayoutDict, Location, Writer, write_embedding
from .lifecycle import lifecycle

log = logging.getLogger("writers.multi")


class MultiWriter(BaseWriter):
    """Sends every call to every writer. A writer that raises does not stop the others or the loop:
    its first error is logged with the writer's name, every error is counted in ``errors``, and
    ``strict=True`` (for tests) re-raises instead. ``flush`` and ``close`` reach every writer."""

    name = "multi"

    def __init__(self, writers: Iterable[Writer], *, strict: bool = False, all_ranks: bool = False) -> None:
        del all_ranks  # read by BaseWriter.__new__
        self.writers: list[Writer] = list(writers)
        names = [w.name for w in self.writers]
        dupes = sorted(n for n, c in Counter(names).items() if c > 1)
        if dupes:
            raise ValueError(f"writers: got two writers named {dupes}; give each writer a distinct name")
        self.strict = strict
        self._errors: Counter[str] = Counter()
        self.failed_to_start: list[str] = []
        super().__init__()
        for writer in self.writers:
            lifecycle.forget(writer)  # closed in order by this writer; each still flushes on time

    @property
    def errors(self) -> Counter[str]:
        """Failed calls per writer name, those of background writers and backends that failed to start
        (counted once) included."""
        return Counter(self.error_counts())

    def error_counts(self) -> dict[str, int]:
        counts = Counter(self._errors) + Counter(self.failed_to_start)
        for writer in self.writers:
            counts.update(writer.error_counts())
        return dict(counts)

    def locations(self) -> list[Location]:
        return [where for writer in self.writers for where in writer.locations()]

    def _each(self, action: str, call: Callable[[Writer], Any], *, concurrently: bool = False) -> None:
        """``call`` on every writer, isolated: a failure is counted (warned once per writer) and the
        others go on. ``concurrently`` runs them side by side, so a flush or close waits for the
        slowest backend's bound, not the sum of them."""
        outcomes: list[BaseException | None] = [None] * len(self.writers)

        def run(i: int, writer: Writer) -> None:
            try:
                call(writer)
            except Exception as exc:
                outcomes[i] = exc

        if concurrently and len(self.writers) > 1:
            threads = [
                threading.Thread(target=run, args=(i, w), name=f"writers-{action}-{w.name}", daemon=True)
                for i, w in enumerate(self.writers)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        else:
            for i, writer in enumerate(self.writers):
                run(i, writer)
        first_error: BaseException | None = None
        for writer, exc in zip(self.writers, outcomes, strict=True):
            if exc is None:
                continue
            self._errors[writer.name] += 1
            if self.strict:
                first_error = first_error or exc
            elif self._errors[writer.name] == 1:
                log.warning(
                    "writer %r failed in %s (%s: %s); the other writers and training go on, "
                    "further errors of this writer are counted in MultiWriter.errors",
                    writer.name,
                    action,
                    type(exc).__name__,
                    exc,
                    exc_info=exc,
                )
        if first_error is not None:
            raise first_error

    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        self._each("log_scalars", lambda w: w.log_scalars(metrics, step, wall_time=wall_time))

    def log_histogram(self, tag: str, values: Any, step: int) -> None:
        self._each("log_histogram", lambda w: w.log_histogram(tag, values, step))

    def log_image(self, tag: str, image: Any, step: int) -> None:
        self._each("log_image", lambda w: w.log_image(tag, image, step))

    def log_embedding(self, tag: str, values: Any, step: int, metadata: Sequence[str] | None = None) -> None:
        self._each("log_embedding", lambda w: write_embedding(w, tag, values, step, metadata))

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._each("log_config", lambda w: w.log_config(config))

    def log_layout(self, layout: LayoutDict) -> None:
        self._each("log_layout", lambda w: w.log_layout(layout))

    def define_summaries(self, summaries: Mapping[str, str]) -> None:
        self._each("define_summaries", lambda w: w.define_summaries(summaries))

    def _flush(self) -> None:
        self._each("flush", lambda w: w.flush(), concurrently=True)

    def _close(self, failed: bool) -> None:
        self._each("close", lambda w: w.close(failed=failed), concurrently=True)

    def __getitem__(self, name: str) -> Writer:
        for writer in self.writers:
            if writer.name == name:
                return writer
        raise KeyError(f"no writer named {name!r}; have {[w.name for w in self.writers]}")
