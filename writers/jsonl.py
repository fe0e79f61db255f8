"""JSON Lines: one strict-JSON object per line, lossless for NaN/±inf, never a torn line."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._files import WRITE_BYTES, AppendFile
from ._media import embedding_files, histogram, image_png, png_size, tag_step_path
from .base import Backend, BaseWriter, LayoutDict, Location, ResumeGate, check_step, redact
from .ranks import rank_suffix
from .records import DEFAULT_FILENAME

log = logging.getLogger("writers.jsonl")


def _dumps_stdlib(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _dumps_factory() -> Callable[[Any], bytes]:
    try:
        import orjson
    except ImportError:  # the stdlib encoder is ~8x slower but equally strict here
        return _dumps_stdlib
    dumps: Callable[[Any], bytes] = orjson.dumps
    return dumps


def encode_float(value: Any, tag: str = "value") -> float | str:
    """A JSON-safe float: non-finite values become ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metrics[{tag!r}]: got {type(value).__name__}; expected a real number") from None
    if math.isfinite(f):
        return f
    return "NaN" if f != f else ("Infinity" if f > 0 else "-Infinity")


def encode_metrics(metrics: Mapping[str, float]) -> dict[str, float | str]:
    """``metrics`` with string tags and JSON-safe values (see :func:`encode_float`)."""
    return {str(tag): encode_float(value, str(tag)) for tag, value in metrics.items()}


def scalar_line(
    dumps: Callable[[Any], bytes], step: int, wall_time: float, metrics: Mapping[str, float]
) -> bytes:
    """The JSON line of one scalar record, ``metrics`` encoded by :func:`encode_metrics`."""
    # the common case, a dict of finite floats, is JSON-safe as it is, without a copy (a finite sum
    # means every value is finite); a key that is not a string makes the encoder refuse it
    if type(metrics) is dict:
        values = metrics.values()
        for value in values:  # a plain loop: 3x faster than set(map(type, values)) here
            if type(value) is not float:
                break
        else:
            if math.isfinite(sum(values)):
                try:
                    return dumps({"step": step, "wall_time": wall_time, "metrics": metrics}) + b"\n"
                except TypeError:
                    pass
    return dumps({"step": step, "wall_time": wall_time, "metrics": encode_metrics(metrics)}) + b"\n"


def jsonable(obj: Any) -> Any:
    """Config values as strict JSON: mappings, sequences, numbers (non-finite encoded), else ``str``."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return encode_float(obj)
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and hasattr(obj, "shape"):  # numpy arrays and scalars, torch tensors
        return jsonable(obj.tolist())
    return str(obj)


class JSONLWriter(BaseWriter):
    """Appends records to ``path`` (a ``.jsonl`` file, or a directory holding ``metrics.jsonl``).

    Scalars: ``{"step", "wall_time", "metrics": {tag: value}}``. Other records carry a ``kind``:
    ``histogram``, ``image`` (the PNG is saved under ``images/`` beside the file), ``config``,
    ``layout``. Records are buffered and written as whole lines; ``flush()`` writes and fsyncs.
    An existing file is appended to (a torn last line from a crash is cut off first).
    """

    name = "jsonl"

    timed_flush = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        buffer_bytes: int = WRITE_BYTES,
        resume: bool = False,
        all_ranks: bool = False,
    ) -> None:
        p = Path(path)
        if p.suffix not in (".jsonl", ".json", ".ndjson"):
            p = p / DEFAULT_FILENAME
        if suffix := rank_suffix(all_ranks):  # every rank writes: metrics.rank1.jsonl
            p = p.with_name(f"{p.stem}.{suffix}{p.suffix}")
        self.path = p
        self._dumps = _dumps_factory()
        _cut_torn_tail(p)
        self.gate = ResumeGate(self.name, _last_step(p) if resume else None)
        self._file = AppendFile(self.name, lambda: (p, b""), write_bytes=buffer_bytes)
        super().__init__()

    def locations(self) -> list[Location]:
        # the report draws the guide's dashboard from the file; writers.read_jsonl reads it in Python
        return [Location("JSONL", str(self.path), f"hjepa-metrics report {self.path}")]

    # -- records
    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        self.write_encoded(self.encode_scalars(metrics, check_step(step), wall_time))

    def encode_scalars(
        self, metrics: Mapping[str, float], step: int, wall_time: float | None = None
    ) -> bytes:
        """The line :meth:`write_encoded` appends for these scalars (``b""`` at a step that a resumed
        run already holds). No I/O and no state: a :class:`~writers.background.BackgroundWriter`
        calls it on the caller's thread, so its own thread only appends bytes."""
        if self.gate.last_step is not None and not self.gate.allows(step):
            return b""
        return scalar_line(self._dumps, step, time.time() if wall_time is None else float(wall_time), metrics)

    def write_encoded(self, data: bytes) -> None:
        """Append lines made by :meth:`encode_scalars`."""
        if data:
            self._append_line(data)

    def log_histogram(self, tag: str, values: Any, step: int) -> None:
        hist = histogram(values, name=tag)
        self._append(
            {
                "kind": "histogram",
                "step": check_step(step),
                "wall_time": time.time(),
                "tag": tag,
                **jsonable(hist.as_dict()),
            }
        )

    def log_image(self, tag: str, image: Any, step: int) -> None:
        step = check_step(step)
        png = image_png(image, tag)
        rel = tag_step_path("images", tag, step, ".png")
        target = self.path.parent / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png)
        height, width, channels = png_size(png)
        self._append(
            {
                "kind": "image",
                "step": step,
                "wall_time": time.time(),
                "tag": tag,
                "path": rel.as_posix(),
                "height": height,
                "width": width,
                "channels": channels,
            }
        )

    def log_embedding(self, tag: str, values: Any, step: int, metadata: Sequence[str] | None = None) -> None:
        """The projector's TSV files beside the JSONL file, and a record pointing to them."""
        step = check_step(step)
        files = embedding_files(values, metadata, tag)
        rel = tag_step_path("embeddings", tag, step)
        files.write_to(self.path.parent / rel)
        self._append(
            {
                "kind": "embedding",
                "step": step,
                "wall_time": time.time(),
                "tag": tag,
                "path": rel.as_posix(),
                "rows": files.shape[0],
                "dim": files.shape[1],
                "metadata": files.metadata is not None,
            }
        )

    def log_config(self, config: Mapping[str, Any]) -> None:
        config = redact(config)  # secrets never reach a backend
        self._append({"kind": "config", "wall_time": time.time(), "config": jsonable(config)})

    def log_layout(self, layout: LayoutDict) -> None:
        self._append({"kind": "layout", "wall_time": time.time(), "layout": jsonable(layout)})

    # -- I/O
    def _append(self, record: Mapping[str, Any]) -> None:
        self._append_line(self._dumps(record) + b"\n")

    def _append_line(self, data: bytes) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name}: write after close ({self.path})")
        self._file.append(data)
        self._mark_dirty()

    def error_counts(self) -> dict[str, int]:
        return self._file.outage.counts()

    def _flush(self) -> None:
        self._file.flush()
        if self._file.pending:
            self._mark_dirty()  # the disk refused: try again at the next timed flush

    def _close(self, failed: bool) -> None:
        del failed
        self._file.close()


# What resume reads from the end of the file to find the last step (doubled while it holds no scalars).
_TAIL_BYTES = 1 << 20


def _last_step(path: Path) -> int | None:
    """The highest step among the last scalar records of an existing file, read from its tail only:
    the time and memory of a resume do not grow with the length of the run."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    window = _TAIL_BYTES
    with open(path, "rb") as f:
        while True:
            start = max(0, size - window)
            f.seek(start)
            lines = f.read(size - start).split(b"\n")
            if start > 0:
                lines = lines[1:]  # the first piece may be the end of a longer line
            steps = [step for line in lines if (step := _scalar_step(line)) is not None]
            if steps or start == 0:
                return max(steps) if steps else None
            window *= 2


def _scalar_step(line: bytes) -> int | None:
    if b'"metrics"' not in line:
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None  # a torn line
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _cut_torn_tail(path: Path) -> None:
    """Truncate a partial last line (a crash mid-write) so appended records start on a new line."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        block = 1 << 16
        end = size
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            end = start
        else:
            keep = 0
        log.warning("%s: cut a torn last line (%d bytes) left by an interrupted write", path, size - keep)
        f.truncate(keep)


def _build(section: Mapping[str, Any], common: Mapping[str, Any]) -> JSONLWriter:
    writer = JSONLWriter(
        section.get("path") or Path(common["log_dir"]) / "metrics.jsonl",
        resume=common["resume"],
        all_ranks=common.get("all_ranks", False),
    )
    writer.flush_interval = common["flush_interval"]
    return writer


BACKEND = Backend(
    name="jsonl",
    build=_build,
    extra="jsonl",
    options={"path": None},
    writes='one strict-JSON line per record, NaN/±inf as `"NaN"`/`"Infinity"`, never a torn line '
    "(orjson when the extra is installed, else the standard library: same bytes)",
    writer=JSONLWriter,
)
