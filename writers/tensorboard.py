"""TensorBoard event files written with tensorboard's protos (scalars encoded directly): one packed
Summary per call."""

from __future__ import annotations

import itertools
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ._event_bytes import scalar_event
from ._files import AppendFile, Outage
from ._media import embedding_files, histogram, image_png, png_size, tag_step_path
from .base import (
    Backend,
    BaseWriter,
    LayoutDict,
    Location,
    ResumeGate,
    check_step,
    flatten,
    missing_extra,
    redact,
)
from .lifecycle import DEFAULT_FLUSH_INTERVAL
from .ranks import rank_suffix

log = logging.getLogger("writers.tensorboard")

LAYOUT_TAG = "custom_scalars__config__"


def _protos() -> Any:
    """The tensorboard modules this writer uses, imported on first use."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.plugins.custom_scalar import layout_pb2
        from tensorboard.plugins.hparams import api_pb2 as hparams_api_pb2
        from tensorboard.plugins.hparams import metadata as hparams_metadata
        from tensorboard.plugins.hparams import plugin_data_pb2
    except ImportError as exc:
        raise missing_extra("TensorBoard", "tensorboard") from exc
    return SimpleNamespace(
        event_pb2=event_pb2,
        summary_pb2=summary_pb2,
        tensor_pb2=tensor_pb2,
        tensor_shape_pb2=tensor_shape_pb2,
        types_pb2=types_pb2,
        layout_pb2=layout_pb2,
        hparams_metadata=hparams_metadata,
        hparams_api_pb2=hparams_api_pb2,
        plugin_data_pb2=plugin_data_pb2,
    )


def _masked_crc_function() -> Callable[[bytes], int]:
    try:
        import google_crc32c
    except ImportError:  # tensorboard's pure-Python CRC: same value, ~100x slower per byte
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

        return masked_crc32c  # type: ignore[no-any-return]

    def masked(data: bytes) -> int:
        crc = int(google_crc32c.value(data))
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    return masked


_FILE_COUNTER = itertools.count()


class EventFile:
    """TFRecord-framed ``Event`` records in ``logdir/events.out.tfevents.<time>.<host>.<pid>.<n>``.

    Written through :class:`AppendFile`: after a full disk the same file goes on where it stopped;
    after the directory was removed a new event file (with its ``file_version`` header) starts.
    """

    def __init__(self, name: str, logdir: Path, event_pb2: Any) -> None:
        self.logdir = logdir
        self._event_pb2 = event_pb2
        self._crc = _masked_crc_function()
        self._file = AppendFile(name, self._new_file)

    def _new_file(self) -> tuple[Path, bytes]:
        stamp = f"{time.time():010.0f}.{socket.gethostname()}.{os.getpid()}.{next(_FILE_COUNTER)}"
        header = self._event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
        return self.logdir / f"events.out.tfevents.{stamp}", self.record(header.SerializeToString())

    def record(self, data: bytes) -> bytes:
        """One TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C (little-endian)."""
        length = struct.pack("<Q", len(data))
        return length + struct.pack("<I", self._crc(length)) + data + struct.pack("<I", self._crc(data))

    @property
    def path(self) -> Path:
        return self._file.path

    @property
    def pending(self) -> int:
        return self._file.pending

    @property
    def outage(self) -> Outage:
        return self._file.outage

    def append(self, event: Any) -> None:
        self.append_serialized(event.SerializeToString())

    def append_serialized(self, data: bytes) -> None:
        """Append an ``Event`` already serialized."""
        self._file.append(self.record(data))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def exact_regex(tag: str) -> str:
    """A ``re.match`` pattern for exactly ``tag``: TensorBoard anchors multiline regexes at the start only."""
    return re.escape(tag) + "$"


def layout_proto(layout: LayoutDict) -> Any:
    """TensorBoard's ``Layout`` proto from a guide-format layout dict.

    A chart child ``{"title", "children": [tags]}`` becomes a multiline chart of exact-match regexes; a
    tag listed directly under a category becomes a chart of its own titled by the tag.
    """
    layout_pb2 = _protos().layout_pb2
    proto = layout_pb2.Layout()
    for cat in layout.get("category", []):
        category = proto.category.add(title=str(cat["title"]), closed=bool(cat.get("closed", False)))
        for child in cat.get("children", []):
            if isinstance(child, str):
                chart = category.chart.add(title=child)
                chart.multiline.tag.append(exact_regex(child))
            else:
                chart = category.chart.add(title=str(child["title"]))
                chart.multiline.tag.extend(exact_regex(str(t)) for t in child.get("children", []))
    return proto


# What TensorBoard's projector plugin reads in a run directory.
PROJECTOR_CONFIG = "projector_config.pbtxt"

# What resume reads from the end of an event file (doubled while it holds no scalar event).
_TAIL_BYTES = 1 << 18
_HEADER = struct.Struct("<QI")  # data length, masked CRC-32C of the length


def tail_records(path: Path, window: int = _TAIL_BYTES) -> list[bytes]:
    """The data of the whole TFRecords in the last ``window`` bytes of ``path``, in order.

    TFRecords cannot be read backwards, but each header carries a CRC of its length and each record a
    CRC of its data: an offset where both check is a record boundary (a false match has odds of about
    2⁻⁶⁴), and from there records follow one another. A torn or damaged record is skipped.
    """
    crc = _masked_crc_function()
    size = path.stat().st_size
    start = max(0, size - window)
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(size - start)

    def record_at(pos: int) -> tuple[bytes, int] | None:
        length, length_crc = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + length + 4
        if end > len(data) or crc(data[pos : pos + 8]) != length_crc:
            return None
        body = data[pos + _HEADER.size : end - 4]
        if crc(body) != struct.unpack_from("<I", data, end - 4)[0]:
            return None
        return body, end

    records: list[bytes] = []
    pos = 0
    while pos + _HEADER.size + 4 <= len(data):
        found = record_at(pos)
        if found is None:  # not a boundary (the window's start, a torn or damaged record): slide on
            pos += 1
            continue
        records.append(found[0])
        pos = found[1]
    return records


def last_step(logdir: Path) -> int | None:
    """The highest step of a scalar summary near the end of the newest event file in ``logdir`` that
    has one. Reads file tails only, so resuming a long run costs the same as a short one."""
    event_pb2 = _protos().event_pb2
    for path in sorted(logdir.glob("events.out.tfevents.*"), reverse=True):
        size = path.stat().st_size
        window = _TAIL_BYTES
        while True:
            steps: list[int] = []
            for body in tail_records(path, window):
                event = event_pb2.Event.FromString(body)
                if event.HasField("summary") and any(v.HasField("simple_value") for v in event.summary.value):
                    steps.append(event.step)
            if steps:
                return int(max(steps))
            if window >= size:
                break
            window *= 2
    return None


class TensorBoardWriter(BaseWriter):
    """Writes ``logdir/events.out.tfevents.*`` with tensorboard's protos (no torch import).

    Scalars of one call go out as one ``Summary`` (float32 ``simple_value``; NaN/±inf kept). Images are
    PNG summaries, histograms ``HistogramProto``, config the HPARAMS tab plus a text table, and the layout
    the ``custom_scalars__config__`` summary TensorBoard reads (a JSON file in the log dir is ignored).
    Events are buffered and written at most ``flush_secs`` seconds after they were logged (the timed
    flush); a full disk or a removed log dir is survived (see :class:`EventFile`).
    """

    name = "tensorboard"
    timed_flush = True

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        *,
        flush_secs: float = DEFAULT_FLUSH_INTERVAL,
        resume: bool = False,
        all_ranks: bool = False,
    ) -> None:
        self._p = _protos()
        self.logdir = Path(logdir)
        if suffix := rank_suffix(all_ranks):  # every rank writes: one TensorBoard run per rank
            self.logdir = self.logdir / suffix
        self.gate = ResumeGate(self.name, last_step(self.logdir) if resume else None)
        self._hparam_metrics: list[str] = []
        self._hparams: dict[str, Any] = {}
        self._session_started = False
        self._file = EventFile(self.name, self.logdir, self._p.event_pb2)
        super().__init__()
        self.flush_interval = float(flush_secs)

    def locations(self) -> list[Location]:
        # TensorBoard names a run by its directory under --logdir: the parent makes this run
        # `<logdir.name>` beside its siblings (opened on the run itself, it would be called ".").
        # The hint stays out of the command, so the printed command runs as pasted.
        tabs = "the guide's dashboard: Custom Scalars tab"
        if (self.logdir / PROJECTOR_CONFIG).exists():
            tabs += "; embeddings: Projector tab"
        where = f"{self.logdir}  (run {self.logdir.name!r}; {tabs})"
        return [Location("TensorBoard", where, f"tensorboard --logdir {self.logdir.parent}")]

    def _event(self, step: int, values: list[Any], wall_time: float | None = None) -> None:
        summary = self._p.summary_pb2.Summary(value=values)
        event = self._p.event_pb2.Event(
            wall_time=time.time() if wall_time is None else float(wall_time),
            step=check_step(step),
            summary=summary,
        )
        self._write(event.SerializeToString())

    def _write(self, event: bytes) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name}: write after close ({self.logdir})")
        self._file.append_serialized(event)
        self._mark_dirty()

    def _append(self, step: int, values: list[Any]) -> None:
        """An event written while closing (after :attr:`closed` is set)."""
        summary = self._p.summary_pb2.Summary(value=values)
        self._file.append(self._p.event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        step = check_step(step)
        if not self.gate.allows(step) or not metrics:
            return
        if start := self._session_start():  # once per run: with the HParams session start
            self._event(step, start + [self._scalar_value(tag, v) for tag, v in metrics.items()], wall_time)
            return
        stamp = time.time() if wall_time is None else float(wall_time)
        try:
            data = scalar_event(stamp, step, metrics)
        except (TypeError, ValueError):
            for tag, v in metrics.items():
                self._scalar_value(tag, v)  # names the value float() refuses
            raise
        self._write(data)

    def _scalar_value(self, tag: Any, v: Any) -> Any:
        try:
            return self._p.summary_pb2.Summary.Value(tag=str(tag), simple_value=float(v))
        except (TypeError, ValueError):
            raise TypeError(f"metrics[{tag!r}]: got {type(v).__name__}; expected a real number") from None

    def log_histogram(self, tag: str, values: Any, step: int) -> None:
        h = histogram(values, name=tag)
        proto = self._p.summary_pb2.HistogramProto(
            min=h.min,
            max=h.max,
            num=h.num,
            sum=h.sum,
            sum_squares=h.sum_squares,
            bucket_limit=h.bucket_limits,
            bucket=h.counts,
        )
        self._event(step, [*self._session_start(), self._p.summary_pb2.Summary.Value(tag=tag, histo=proto)])

    def log_image(self, tag: str, image: Any, step: int) -> None:
        png = image_png(image, tag)
        height, width, channels = png_size(png)
        img = self._p.summary_pb2.Summary.Image(
            height=height, width=width, colorspace=channels, encoded_image_string=png
        )
        self._event(step, [*self._session_start(), self._p.summary_pb2.Summary.Value(tag=tag, image=img)])

    def log_embedding(self, tag: str, values: Any, step: int, metadata: Sequence[str] | None = None) -> None:
        """Files for TensorBoard's projector tab: ``projector/<tag>/step_<N>/tensors.tsv`` (and
        ``metadata.tsv``) in the run directory, listed as ``<tag>:<step>`` in the run's
        ``projector_config.pbtxt``. The config is read, extended and replaced atomically on each call,
        so entries from an earlier or resumed run stay (one per tag and step)."""
        try:
            from google.protobuf import text_format
            from tensorboard.plugins.projector import projector_config_pb2
        except ImportError as exc:
            raise missing_extra("TensorBoard", "tensorboard") from exc
        step = check_step(step)
        files = embedding_files(values, metadata, tag)
        rel = tag_step_path("projector", tag, step)
        files.write_to(self.logdir / rel)
        config_path = self.logdir / PROJECTOR_CONFIG
        config = projector_config_pb2.ProjectorConfig()
        if config_path.exists():
            text_format.Parse(config_path.read_text(encoding="utf-8"), config)
        name = f"{tag}:{step}"
        kept = [e for e in config.embeddings if e.tensor_name != name]
        del config.embeddings[:]
        config.embeddings.extend(kept)
        entry = config.embeddings.add(tensor_name=name, tensor_path=(rel / "tensors.tsv").as_posix())
        entry.tensor_shape.extend(files.shape)
        if files.metadata is not None:
            entry.metadata_path = (rel / "metadata.tsv").as_posix()
        partial = config_path.with_name(PROJECTOR_CONFIG + ".tmp")
        partial.write_text(text_format.MessageToString(config), encoding="utf-8")
        os.replace(partial, config_path)

    def define_summaries(self, summaries: Mapping[str, str]) -> None:
        """The tags a run is judged by become the HParams tab's metric columns (globs are skipped)."""
        self._hparam_metrics.extend(t for t in summaries if not any(c in t for c in "*?["))

    def log_config(self, config: Mapping[str, Any]) -> None:
        """A ``config`` text table now, and the HParams tab: every config logged before the run's first
        value (they are merged) becomes its hyper-parameters, with the tags of :meth:`define_summaries`
        as metric columns, written once with that first value (TensorBoard reads only a run's first
        session start)."""
        flat = flatten(redact(config))  # secrets never reach a backend
        self._hparams.update(flat)
        rows = "\n".join(f"| {k} | {v} |" for k, v in flat.items())
        self._event(0, [self._string_value("config", "text", f"| key | value |\n|---|---|\n{rows}".encode())])

    def _session_start(self) -> list[Any]:
        """The HParams experiment and session-start values, once, if a config was logged."""
        if self._session_started or not self._hparams:
            return []
        self._session_started = True
        p = self._p
        api = p.hparams_api_pb2
        start = p.plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
        infos = []
        for key, v in self._hparams.items():
            if isinstance(v, bool):
                start.hparams[key].bool_value = v
                kind = api.DATA_TYPE_BOOL
            elif isinstance(v, (int, float)):
                start.hparams[key].number_value = float(v)
                kind = api.DATA_TYPE_FLOAT64
            else:
                start.hparams[key].string_value = str(v)
                kind = api.DATA_TYPE_STRING
            infos.append(api.HParamInfo(name=key, type=kind))
        metrics = [api.MetricInfo(name=api.MetricName(tag=t)) for t in dict.fromkeys(self._hparam_metrics)]
        experiment = api.Experiment(hparam_infos=infos, metric_infos=metrics)
        return [
            self._hparams_value(p.hparams_metadata.EXPERIMENT_TAG, experiment=experiment),
            self._hparams_value(p.hparams_metadata.SESSION_START_INFO_TAG, session_start_info=start),
        ]

    def _hparams_value(self, tag: str, **data: Any) -> Any:
        p = self._p
        content = p.plugin_data_pb2.HParamsPluginData(
            version=p.hparams_metadata.PLUGIN_DATA_VERSION, **data
        ).SerializeToString()
        metadata = p.summary_pb2.SummaryMetadata(
            plugin_data=p.summary_pb2.SummaryMetadata.PluginData(
                plugin_name=p.hparams_metadata.PLUGIN_NAME, content=content
            )
        )
        return p.summary_pb2.Summary.Value(tag=tag, metadata=metadata)

    def _string_value(self, tag: str, plugin: str, payload: bytes) -> Any:
        """A summary value holding one scalar ``DT_STRING`` tensor for ``plugin`` (text, custom_scalars)."""
        p = self._p
        tensor = p.tensor_pb2.TensorProto(
            dtype=p.types_pb2.DT_STRING,
            string_val=[payload],
            tensor_shape=p.tensor_shape_pb2.TensorShapeProto(),
        )
        metadata = p.summary_pb2.SummaryMetadata(
            plugin_data=p.summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin)
        )
        return p.summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)

    def log_layout(self, layout: LayoutDict) -> None:
        """Write the custom-scalars layout; only the latest layout of a run counts, so write it complete."""
        payload = layout_proto(layout).SerializeToString()
        self._event(0, [self._string_value(LAYOUT_TAG, "custom_scalars", payload)])

    def error_counts(self) -> dict[str, int]:
        return self._file.outage.counts()

    def _flush(self) -> None:
        self._file.flush()
        if self._file.pending:
            self._mark_dirty()  # the disk refused: try again at the next timed flush

    def _close(self, failed: bool) -> None:
        if start := self._session_start():  # a config and no value: the tab still lists the run
            self._append(0, start)
        if self._session_started:  # the HParams tab shows how the run ended
            api = self._p.hparams_api_pb2
            end = self._p.plugin_data_pb2.SessionEndInfo(
                status=api.STATUS_FAILURE if failed else api.STATUS_SUCCESS, end_time_secs=time.time()
            )
            tag = self._p.hparams_metadata.SESSION_END_INFO_TAG
            self._append(0, [self._hparams_value(tag, session_end_info=end)])
        self._file.close()


def _build(section: Mapping[str, Any], common: Mapping[str, Any]) -> TensorBoardWriter:
    # one directory per run under <log_dir>/tensorboard: TensorBoard shows it named by the experiment
    logdir = section.get("log_dir") or Path(common["log_dir"]) / "tensorboard" / common["experiment_name"]
    flush_secs = float(section.get("flush_secs") or common["flush_interval"])
    return TensorBoardWriter(
        logdir, flush_secs=flush_secs, resume=common["resume"], all_ranks=common.get("all_ranks", False)
    )


BACKEND = Backend(
    name="tensorboard",
    build=_build,
    extra="tensorboard",
    requires="tensorboard",
    options={"log_dir": None, "flush_secs": None},
    writes="one packed `Summary` per call; histograms, images (figures too), hparams, and the "
    "custom-scalars layout as the proto TensorBoard reads; a full disk or a removed log dir is survived",
    writer=TensorBoardWriter,
)
