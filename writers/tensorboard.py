"""TensorBoard event files through tensorboard's own writer: one packed Summary per call."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ._media import histogram, image_png, png_size
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

log = logging.getLogger("writers.tensorboard")

LAYOUT_TAG = "custom_scalars__config__"


def _protos() -> Any:
    """The tensorboard modules this writer uses, imported on first use."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.plugins.custom_scalar import layout_pb2
        from tensorboard.plugins.hparams import metadata as hparams_metadata
        from tensorboard.plugins.hparams import plugin_data_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
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
        plugin_data_pb2=plugin_data_pb2,
        EventFileWriter=EventFileWriter,
    )


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


def last_step(logdir: Path) -> int | None:
    """The highest step of a scalar summary in the event files directly in ``logdir``."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    best: int | None = None
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(path)).Load():
            if event.HasField("summary") and any(v.HasField("simple_value") for v in event.summary.value):
                best = event.step if best is None else max(best, event.step)
    return best


class TensorBoardWriter(BaseWriter):
    """Writes ``logdir/events.out.tfevents.*`` with tensorboard's ``EventFileWriter`` (no torch import).

    Scalars of one call go out as one ``Summary`` (float32 ``simple_value``; NaN/±inf kept). Images are
    PNG summaries, histograms ``HistogramProto``, config the HPARAMS tab plus a text table, and the layout
    the ``custom_scalars__config__`` summary TensorBoard reads (a JSON file in the log dir is ignored).
    """

    name = "tensorboard"

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        *,
        flush_secs: int = 30,
        max_queue: int = 1000,
        resume: bool = False,
    ) -> None:
        self._p = _protos()
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.gate = ResumeGate(self.name, last_step(self.logdir) if resume else None)
        self._writer = self._p.EventFileWriter(
            str(self.logdir), max_queue_size=max_queue, flush_secs=flush_secs
        )
        super().__init__()

    def locations(self) -> list[Location]:
        # the hint stays out of the command, so the printed command runs as pasted
        where = f"{self.logdir}  (the guide's dashboard: Custom Scalars tab)"
        return [Location("TensorBoard", where, f"tensorboard --logdir {self.logdir}")]

    def _event(self, step: int, values: list[Any], wall_time: float | None = None) -> None:
        summary = self._p.summary_pb2.Summary(value=values)
        event = self._p.event_pb2.Event(
            wall_time=time.time() if wall_time is None else float(wall_time),
            step=check_step(step),
            summary=summary,
        )
        self._writer.add_event(event)

    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        if not self.gate.allows(check_step(step)):
            return
        value = self._p.summary_pb2.Summary.Value
        values = []
        for tag, v in metrics.items():
            try:
                values.append(value(tag=str(tag), simple_value=float(v)))
            except (TypeError, ValueError):
                raise TypeError(f"metrics[{tag!r}]: got {type(v).__name__}; expected a real number") from None
        if values:
            self._event(step, values, wall_time)

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
        self._event(step, [self._p.summary_pb2.Summary.Value(tag=tag, histo=proto)])

    def log_image(self, tag: str, image: Any, step: int) -> None:
        png = image_png(image, tag)
        height, width, channels = png_size(png)
        img = self._p.summary_pb2.Summary.Image(
            height=height, width=width, colorspace=channels, encoded_image_string=png
        )
        self._event(step, [self._p.summary_pb2.Summary.Value(tag=tag, image=img)])

    def log_config(self, config: Mapping[str, Any]) -> None:
        config = redact(config)  # secrets never reach a backend
        flat = flatten(config)
        p = self._p
        start = p.plugin_data_pb2.SessionStartInfo()
        for key, v in flat.items():
            if isinstance(v, bool):
                start.hparams[key].bool_value = v
            elif isinstance(v, (int, float)):
                start.hparams[key].number_value = float(v)
            else:
                start.hparams[key].string_value = str(v)
        start.start_time_secs = time.time()
        content = p.plugin_data_pb2.HParamsPluginData(
            session_start_info=start, version=p.hparams_metadata.PLUGIN_DATA_VERSION
        ).SerializeToString()
        metadata = p.summary_pb2.SummaryMetadata(
            plugin_data=p.summary_pb2.SummaryMetadata.PluginData(
                plugin_name=p.hparams_metadata.PLUGIN_NAME, content=content
            )
        )
        hp_value = p.summary_pb2.Summary.Value(
            tag=p.hparams_metadata.SESSION_START_INFO_TAG, metadata=metadata
        )
        rows = "\n".join(f"| {k} | {v} |" for k, v in flat.items())
        self._event(
            0,
            [hp_value, self._string_value("config", "text", f"| key | value |\n|---|---|\n{rows}".encode())],
        )

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

    def flush(self) -> None:
        self._writer.flush()

    def _close(self, failed: bool) -> None:
        del failed
        self._writer.close()


def _build(section: Mapping[str, Any], common: Mapping[str, Any]) -> TensorBoardWriter:
    logdir = section.get("log_dir") or Path(common["log_dir"]) / "tensorboard"
    return TensorBoardWriter(logdir, flush_secs=int(section["flush_secs"]), resume=common["resume"])


BACKEND = Backend(
    name="tensorboard",
    build=_build,
    extra="tensorboard",
    options={"log_dir": None, "flush_secs": 30},
    writes="one packed `Summary` per call through tensorboard's `EventFileWriter`; histograms, images "
    "(figures too), hparams, and the custom-scalars layout as the proto TensorBoard reads",
    writer=TensorBoardWriter,
)
