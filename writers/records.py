"""Reading a JSONL run back: every record checked, every problem named by file and line."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

log = logging.getLogger("writers.jsonl")

DEFAULT_FILENAME = "metrics.jsonl"
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_HISTOGRAM_NUMBERS = ("min", "max", "num", "sum", "sum_squares")


class RecordError(ValueError):
    """A line of a JSONL run that is not a record this library can read; the message names the file
    and the line and says what was expected."""


def decode_float(value: Any) -> Any:
    return _NONFINITE.get(value, value) if isinstance(value, str) else value


def run_file(path: str | os.PathLike[str]) -> Path:
    """The JSONL file of a run: ``path`` itself, or ``metrics.jsonl`` in the directory ``path``."""
    p = Path(path)
    if p.is_dir():
        p = p / DEFAULT_FILENAME
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file (expected a metrics.jsonl file or its directory)")
    return p


def iter_jsonl(path: str | os.PathLike[str], *, warn_torn: bool = True) -> Iterator[dict[str, Any]]:
    """The records of a JSONL run one at a time (memory independent of the run's length), checked.

    ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` metric values become floats again. A torn last line
    (no newline, not valid JSON: a write cut short by a crash) is skipped with a warning. Anything
    else that is not a valid record raises :class:`RecordError` naming the file and the line: a line
    that is not a JSON object, a scalar record without an integer ``step``, a metric that is not a
    number, an image whose ``path`` leaves the run's directory.
    """
    p = run_file(path)
    with open(p, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:  # invalid JSON, or bytes that are not UTF-8
                # the start of a record with no end: a write cut short by a crash
                if raw.startswith(b"{") and not raw.endswith(b"\n") and not f.read(1):
                    if warn_torn:
                        log.warning("%s: skipped a torn last line (%d bytes)", p, len(raw))
                    return
                raise RecordError(f"{p}:{number}: not a JSON record: {raw[:40]!r}") from None
            yield checked_record(record, f"{p}:{number}")


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a JSONL run (a file, or ``metrics.jsonl`` in a directory); see :func:`iter_jsonl`."""
    return list(iter_jsonl(path))


def checked_record(record: Any, where: str) -> dict[str, Any]:
    """``record`` with its metric values decoded, or a :class:`RecordError` that says what is wrong."""
    if not isinstance(record, dict):
        raise RecordError(f"{where}: got a JSON {type(record).__name__}; expected an object (a record)")
    kind = record.get("kind", "scalars" if "metrics" in record else None)
    if kind in ("scalars", "histogram", "image", "embedding"):
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise RecordError(f"{where}: {kind} record has step {json.dumps(step)}; expected an integer")
    if kind == "scalars":
        metrics = record.get("metrics")
        if not isinstance(metrics, Mapping):
            raise RecordError(f"{where}: 'metrics' is {type(metrics).__name__}; expected an object")
        decoded = {}
        for tag, value in metrics.items():
            value = decode_float(value)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise RecordError(
                    f"{where}: metric {tag!r} is {json.dumps(value)}; expected a number or "
                    '"NaN"/"Infinity"/"-Infinity"'
                )
            decoded[tag] = value
        record["metrics"] = decoded
    elif kind == "histogram":
        _check_histogram(record, where)
    elif kind in ("image", "embedding"):
        if not isinstance(record.get("tag"), str):
            raise RecordError(f"{where}: {kind} record has no string 'tag'")
        record["path"] = safe_relative_path(record.get("path"), where, kind)
    elif kind in ("config", "layout") and not isinstance(record.get(kind), Mapping):
        raise RecordError(f"{where}: {kind} record has no {kind!r} object")
    return record


def _check_histogram(record: dict[str, Any], where: str) -> None:
    if not isinstance(record.get("tag"), str):
        raise RecordError(f"{where}: histogram record has no string 'tag'")
    for key in _HISTOGRAM_NUMBERS:
        record[key] = decode_float(record.get(key))
        if not isinstance(record[key], (int, float)) or isinstance(record[key], bool):
            raise RecordError(f"{where}: histogram {key!r} is {json.dumps(record[key])}; expected a number")
    edges, counts = record.get("edges"), record.get("counts")
    if not (isinstance(edges, list) and isinstance(counts, list)) or len(edges) != len(counts) + 1:
        raise RecordError(f"{where}: histogram needs 'edges' (n + 1 numbers) and 'counts' (n numbers)")
    values = [decode_float(v) for v in (*edges, *counts)]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise RecordError(f"{where}: histogram edges and counts must be numbers")
    record["edges"], record["counts"] = values[: len(edges)], values[len(edges) :]


def safe_relative_path(path: Any, where: str, kind: str = "image") -> str:
    """``path`` if it is a relative path that stays inside the run's directory, else a RecordError."""
    if not isinstance(path, str) or not path:
        raise RecordError(f"{where}: {kind} record has path {path!r}; expected a relative path")
    parts = PurePosixPath(path.replace("\\", "/")).parts
    if path.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise RecordError(f"{where}: {kind} path {path!r} leads outside the run directory; refused")
    return path


def scalar_series(records: list[dict[str, Any]], tag: str) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of one tag across the scalar records, in file order."""
    return [(r["step"], r["metrics"][tag]) for r in records if "metrics" in r and tag in r["metrics"]]


def numbered_runs(records: Iterable[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(run, record)`` pairs, ``run`` counted from 1: a new training run starts where the step goes
    back (a second training appended to the same file). Records without a step (config, layout) go
    with the run of the steps that follow them, as a training writes them before its first step."""
    run, last = 0, None
    pending: list[dict[str, Any]] = []
    for record in records:
        step = record.get("step")
        if not isinstance(step, int):
            pending.append(record)
            continue
        if last is None or step < last:
            run += 1
        last = step
        for held in pending:
            yield run, held
        pending.clear()
        yield run, record
    for held in pending:
        yield max(run, 1), held


def one_run(
    path: str | os.PathLike[str], records: Iterable[dict[str, Any]], run: int | None = None
) -> Iterator[dict[str, Any]]:
    """The records of run number ``run`` (from 1) of a file, or of its only run when ``run`` is ``None``;
    a file that holds several runs with no ``run`` chosen raises a :class:`RecordError` that says so
    (records streamed: memory flat in the file's length)."""
    runs, reached = 0, None
    for number, record in numbered_runs(records):
        step = record.get("step")
        runs = max(runs, number)
        if run is None and number > 1 and isinstance(step, int):
            raise RecordError(
                f"{run_file(path)}: holds several training runs (steps restart at {step} after "
                f"reaching {reached}: a second training wrote to the same file); choose one with "
                "--run N (1 = the first), or give each training its own log_dir"
            )
        if isinstance(step, int):
            reached = step
        if run is None or number == run:
            yield record
    if run is not None and not 1 <= run <= runs:
        raise RecordError(f"{run_file(path)}: --run {run}: the file holds {runs} run(s)")
