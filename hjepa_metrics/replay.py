"""Send a JSONL run into another backend after the fact, steps and wall times preserved."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from writers import RecordError, Writer, iter_jsonl
from writers._media import Histogram
from writers.records import run_file

from .layout import guide_layout


def levels_in(tags: Iterable[str]) -> int:
    """The number of hierarchy levels a set of tags speaks of (at least 1)."""
    found = [int(m.group(1)) for t in tags for m in [re.search(r"(?:level|_h)(\d+)", t)] if m]
    return max(found, default=0) + 1


@dataclass(frozen=True)
class RunContents:
    """What a first, streamed pass over a JSONL run found (every record checked on the way)."""

    path: Path
    records: int
    has_layout: bool
    tags: frozenset[str]


def scan_run(path: str | os.PathLike[str]) -> RunContents:
    """Check every record of a run (memory flat in its length) and say what it holds; a bad line
    raises :class:`writers.RecordError` naming the file and the line, an empty run too."""
    source = run_file(path)
    has_layout, tags, total = False, set(), 0
    for record in iter_jsonl(source):
        total += 1
        has_layout = has_layout or record.get("kind") == "layout"
        tags.update(record.get("metrics", {}))
    if total == 0:
        raise RecordError(f"{source}: no records (an empty run); nothing to replay")
    return RunContents(source, total, has_layout, frozenset(tags))


def replay(
    run: str | os.PathLike[str] | RunContents, writer: Writer, *, num_hierarchies: int | None = None
) -> dict[str, int]:
    """Write every record of the JSONL file (or ``metrics.jsonl`` in a directory) to ``writer``.

    Scalars keep their step and wall time, config and layout records are replayed, histograms keep their
    buckets and images their PNG. A run without a layout record gets the guide's layout for the number of
    levels its tags show (or ``num_hierarchies``). Returns the number of records per kind. Every record
    is checked before the first is written (:func:`scan_run`, unless ``run`` is its result): a bad
    line, or an image path leading outside the run's directory, raises :class:`writers.RecordError`
    naming the file and the line.
    """
    contents = run if isinstance(run, RunContents) else scan_run(run)
    base = contents.path.parent.resolve()
    counts: dict[str, int] = {}
    if not contents.has_layout:
        writer.log_layout(guide_layout(num_hierarchies or levels_in(contents.tags)))
        counts["layout"] = 1
    for record in iter_jsonl(contents.path, warn_torn=False):  # the first pass warned
        kind = record.get("kind", "scalars" if "metrics" in record else "unknown")
        if kind == "scalars":
            writer.log_scalars(record["metrics"], record["step"], wall_time=record.get("wall_time"))
        elif kind == "config":
            writer.log_config(record["config"])
        elif kind == "layout":
            writer.log_layout(record["layout"])
        elif kind == "histogram":
            writer.log_histogram(record["tag"], _histogram(record), record["step"])
        elif kind == "image":
            writer.log_image(record["tag"], _image_bytes(base, record["path"]), record["step"])
        else:
            continue
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _image_bytes(base: Path, relative: str) -> bytes:
    """The PNG an image record points to; a symlink out of the run directory is refused too."""
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise RecordError(f"{relative}: resolves to {path}, outside the run directory {base}; refused")
    return path.read_bytes()


def _histogram(record: dict[str, Any]) -> Histogram:
    return Histogram(
        min=float(record["min"]),
        max=float(record["max"]),
        num=int(record["num"]),
        sum=float(record["sum"]),
        sum_squares=float(record["sum_squares"]),
        edges=[float(e) for e in record["edges"]],
        counts=[float(c) for c in record["counts"]],
    )
