"""Send a JSONL run into another backend after the fact, steps and wall times preserved."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from writers import RecordError, Writer, iter_jsonl
from writers._media import Histogram
from writers.base import write_embedding
from writers.records import DEFAULT_FILENAME, one_run, run_file

from . import registry
from .layout import dashboard_layout


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
    run: int | None = None

    @property
    def name(self) -> str:
        """The run's name: its directory's for a ``metrics.jsonl``, else the file's stem."""
        return self.path.parent.resolve().name if self.path.name == DEFAULT_FILENAME else self.path.stem

    def records_in_order(self, *, warn_torn: bool = False) -> Iterator[dict[str, Any]]:
        """The run's records, streamed (only run number :attr:`run` of a file that holds several)."""
        return one_run(self.path, iter_jsonl(self.path, warn_torn=warn_torn), self.run)


def scan_run(path: str | os.PathLike[str], run: int | None = None) -> RunContents:
    """Check every record of a run (memory flat in its length) and say what it holds; a bad line
    raises :class:`writers.RecordError` naming the file and the line, an empty run too, and a file
    that holds several training runs (steps restarting) unless ``run`` picks one (from 1)."""
    source = run_file(path)
    has_layout, tags, total = False, set(), 0
    for record in RunContents(source, 0, False, frozenset(), run).records_in_order(warn_torn=True):
        total += 1
        has_layout = has_layout or record.get("kind") == "layout"
        tags.update(record.get("metrics", {}))
    if total == 0:
        raise RecordError(f"{source}: no records (an empty run); nothing to replay")
    return RunContents(source, total, has_layout, frozenset(tags), run)


def replay(
    run: str | os.PathLike[str] | RunContents, writer: Writer, *, num_hierarchies: int | None = None
) -> dict[str, int]:
    """Write every record of the JSONL file (or ``metrics.jsonl`` in a directory) to ``writer``.

    Scalars keep their step and wall time, config and layout records are replayed, histograms keep their
    buckets, images their PNG and embeddings their rows and labels. A run without a layout record gets
    the dashboard layout for the number of levels its tags show (or ``num_hierarchies``). Returns the
    number of records per kind. Every record is checked before the first is written (:func:`scan_run`,
    unless ``run`` is its result): a bad line, or an image or embedding path leading outside the run's
    directory, raises :class:`writers.RecordError` naming the file and the line.
    """
    contents = run if isinstance(run, RunContents) else scan_run(run)
    base = contents.path.parent.resolve()
    counts: dict[str, int] = {}
    if not contents.has_layout:
        levels = num_hierarchies or levels_in(contents.tags)
        writer.log_layout(dashboard_layout(levels, cuda=registry.any_cuda_only(contents.tags)))
        counts["layout"] = 1
    for record in contents.records_in_order():  # the first pass warned of a torn line
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
            writer.log_image(record["tag"], inside_run(base, record["path"]).read_bytes(), record["step"])
        elif kind == "embedding":
            rows, labels = embedding_from_files(inside_run(base, record["path"]))
            write_embedding(writer, record["tag"], rows, record["step"], labels)
        else:
            continue
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def inside_run(base: Path, relative: str) -> Path:
    """The file or folder a record points to; a symlink out of the run directory is refused too."""
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise RecordError(f"{relative}: resolves to {path}, outside the run directory {base}; refused")
    return path


def embedding_from_files(folder: Path) -> tuple[np.ndarray, list[str] | None]:
    """Rows ``[N, D]`` and labels from an embedding record's ``tensors.tsv`` and ``metadata.tsv``."""
    rows = np.loadtxt(folder / "tensors.tsv", delimiter="\t", dtype=np.float32, ndmin=2)
    labels_file = folder / "metadata.tsv"
    if not labels_file.exists():
        return rows, None
    return rows, labels_file.read_text(encoding="utf-8").splitlines()


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


class DestinationError(RuntimeError):
    """A replay's destination could not be opened or written: nothing, or not everything, arrived."""


def destination_config(
    contents: RunContents,
    *,
    to: Sequence[str] | None = None,
    log_dir: str | None = None,
    run_name: str | None = None,
    experiment_name: str | None = None,
    tracking_uri: str | None = None,
    project: str | None = None,
    mode: str | None = None,
    resume: bool = False,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The logging config a replay writes with: ``base`` (a config file, or the logger's
    ``HJEPA_METRICS_*`` environment), then the given options. The run keeps its name (its directory's):
    under ``runs/replay/<name>`` by default, TensorBoard run ``<log_dir>/tensorboard/<name>``, MLflow and
    W&B run name ``<name>``. Backends' own environment variables apply where an option is not given
    (``MLFLOW_TRACKING_URI``, ``WANDB_MODE``, ``WANDB_PROJECT``...). Writers run in this process,
    strict: a destination that fails is an error, not a warning."""
    cfg: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in (base or {}).items()}
    name = run_name or contents.name
    if to:
        cfg["backends"] = list(to)
    cfg.setdefault("backends", ["tensorboard"])
    if log_dir or "log_dir" not in cfg:
        cfg["log_dir"] = log_dir or str(Path("runs") / "replay" / name)
    if experiment_name:
        cfg["experiment_name"] = experiment_name
    own: dict[str, dict[str, str | None]] = {
        "tensorboard": {"log_dir": str(Path(cfg["log_dir"]) / "tensorboard" / name)},
        "mlflow": {"run_name": name, "tracking_uri": tracking_uri},
        "wandb": {"name": name, "project": project, "mode": mode},
    }
    for backend in cfg["backends"]:
        section = cfg.setdefault(backend, {})
        for key, value in own.get(backend, {}).items():
            if value is not None and (key not in section or key in ("tracking_uri", "project", "mode")):
                section[key] = value
        section["process"] = False
    cfg.update(background=False, strict=True, resume=resume or bool(cfg.get("resume")))
    return cfg


def skipped_records(writer: Writer) -> dict[str, int]:
    """Scalar records each backend skipped because its destination already held their step (resume)."""
    inner = getattr(writer, "writers", [writer])
    skipped = {w.name: w.gate.skipped for w in inner if getattr(getattr(w, "gate", None), "skipped", 0)}
    return skipped
