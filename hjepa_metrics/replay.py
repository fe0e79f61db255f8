"""Send a JSONL run into another backend after the fact, steps and wall times preserved."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from writers import Writer, read_jsonl
from writers._media import Histogram

from .layout import guide_layout


def levels_in(tags: Iterable[str]) -> int:
    """The number of hierarchy levels a set of tags speaks of (at least 1)."""
    found = [int(m.group(1)) for t in tags for m in [re.search(r"(?:level|_h)(\d+)", t)] if m]
    return max(found, default=0) + 1


def replay(
    path: str | os.PathLike[str], writer: Writer, *, num_hierarchies: int | None = None
) -> dict[str, int]:
    """Write every record of the JSONL file (or ``metrics.jsonl`` in a directory) to ``writer``.

    Scalars keep their step and wall time, config and layout records are replayed, histograms keep their
    buckets and images their PNG. A run without a layout record gets the guide's layout for the number of
    levels its tags show (or ``num_hierarchies``). Returns the number of records per kind.
    """
    source = Path(path)
    records = read_jsonl(source)
    base = source if source.is_dir() else source.parent
    counts: dict[str, int] = {}
    if not any(r.get("kind") == "layout" for r in records):
        tags = [t for r in records for t in r.get("metrics", {})]
        writer.log_layout(guide_layout(num_hierarchies or levels_in(tags)))
        counts["layout"] = 1
    for record in records:
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
            writer.log_image(record["tag"], (base / record["path"]).read_bytes(), record["step"])
        else:
            continue
        counts[kind] = counts.get(kind, 0) + 1
    return counts


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
