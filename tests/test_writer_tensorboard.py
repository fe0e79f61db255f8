"""TensorBoard writer read back with EventAccumulator and through a real tensorboard server."""

from __future__ import annotations

import io
import json
import math
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import tensorboard_server

from hjepa_metrics.layout import guide_layout, tensorboard_layout
from writers.tensorboard import LAYOUT_TAG, TensorBoardWriter

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def _accumulator(logdir: Path) -> Any:
    acc = EventAccumulator(
        str(logdir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def test_scalars_histograms_images_hparams_read_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=1000)
    image = np.zeros((8, 6, 3), dtype=np.uint8)  # HWC
    image[..., 2] = 200
    with TensorBoardWriter(tmp_path) as w:
        for step in range(5):
            w.log_scalars(
                {"train/loss/total": 1.0 / (step + 1), "train/odd": math.nan if step == 2 else step}, step
            )
        w.log_scalars({"train/inf": math.inf, "train/ninf": -math.inf}, 7)
        w.log_histogram("feature_distributions/level0", values, 3)
        w.log_image("patches/detailed_analysis", image, 4)
        w.log_config({"model": {"dim": 384, "name": "vit"}, "lr": 1e-3, "ema": True})
    acc = _accumulator(tmp_path)
    loss = acc.Scalars("train/loss/total")
    assert [e.step for e in loss] == [0, 1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2], rel=1e-7)  # float32
    assert math.isnan(acc.Scalars("train/odd")[2].value)
    assert acc.Scalars("train/inf")[0].value == math.inf and acc.Scalars("train/ninf")[0].value == -math.inf
    hist = acc.Histograms("feature_distributions/level0")[0]
    assert hist.step == 3 and hist.histogram_value.num == 1000
    assert hist.histogram_value.sum == pytest.approx(values.sum())
    assert sum(hist.histogram_value.bucket) == 1000
    assert hist.histogram_value.min == values.min() and hist.histogram_value.max == values.max()
    img = acc.Images("patches/detailed_analysis")[0]
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(img.encoded_image_string)))
    assert img.step == 4 and (img.height, img.width) == (8, 6)
    assert np.array_equal(pixels, image)
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["model.dim"].number_value == 384
    assert start.hparams["model.name"].string_value == "vit"
    assert start.hparams["ema"].bool_value is True


def test_matplotlib_figure_image(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2), dpi=50)
    ax.imshow(np.eye(4))
    with TensorBoardWriter(tmp_path) as w:
        w.log_image("patches/detailed_analysis", fig, 1000)
    img = _accumulator(tmp_path).Images("patches/detailed_analysis")[0]
    assert img.step == 1000 and img.width > 10 and img.encoded_image_string.startswith(b"\x89PNG")
    assert not plt.fignum_exists(fig.number)  # closed after logging, no figure leak


def test_layout_written_once_as_the_proto_tensorboard_reads(tmp_path: Path) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    with TensorBoardWriter(tmp_path) as w:
        w.log_layout(guide_layout(3))
    acc = _accumulator(tmp_path)
    assert acc.PluginTagToContent("custom_scalars") is not None
    tensor = acc.Tensors(LAYOUT_TAG)[0].tensor_proto
    layout = layout_pb2.Layout.FromString(tensor.string_val[0])
    assert layout == tensorboard_layout(3)
    titles = [c.title for c in layout.category]
    assert titles[0] == "Loss Metrics" and titles[-1] == "Masking"
    ema = next(c for c in layout.category if c.title == "EMA Dynamics")
    assert ema.chart[0].title == "train/ema/momentum_current"  # direct tags become charts
    regexes = [t for c in layout.category for ch in c.chart for t in ch.multiline.tag]
    assert len(regexes) == 53
    h1 = next(r for r in regexes if r.startswith("train/loss/h1"))
    assert re.match(h1, "train/loss/h1") and not re.match(h1, "train/loss/h10")


# --- a real server -----------------------------------------------------------------------


def test_real_tensorboard_server_shows_the_layout_and_every_tag(tmp_path: Path) -> None:
    from hjepa_metrics import registry

    with TensorBoardWriter(tmp_path) as w:
        w.log_layout(guide_layout(3))
        for step in range(3):
            w.log_scalars({f"train/{t}": float(step) for t in registry.tags(3)}, step)
    with tensorboard_server(tmp_path) as get:
        deadline = time.monotonic() + 90
        layout: dict[str, Any] = {}
        tags: dict[str, Any] = {}
        while time.monotonic() < deadline:
            layout = json.loads(get("/data/plugin/custom_scalars/layout"))
            tags = json.loads(get("/data/plugin/scalars/tags"))
            if layout and tags.get(".", {}):
                break
            time.sleep(0.5)
        assert layout, "the server returned no custom-scalars layout"
        categories = [c["title"] for c in layout["category"]]
        assert categories == [c["title"] for c in guide_layout(3)["category"]]
        served = set(tags["."])
        regexes = [t for c in layout["category"] for ch in c["chart"] for t in ch["multiline"]["tag"]]
        assert len(regexes) == 53
        for regex in regexes:
            assert any(re.match(regex, tag) for tag in served), regex
        run = urllib.parse.quote(".")
        tag = urllib.parse.quote("train/loss/total")
        points = json.loads(get(f"/data/plugin/scalars/scalars?run={run}&tag={tag}"))
        assert [p[1] for p in points] == [0, 1, 2] and [p[2] for p in points] == [0.0, 1.0, 2.0]


def test_scalar_events_are_the_bytes_protobuf_writes() -> None:
    """The hand-encoded scalar event (no protobuf object per value) against ``SerializeToString``:
    zeros (a oneof member is written even when 0), -0.0, float32 overflow, NaN, infinities,
    subnormals, ints and bools, non-ASCII and long tags (multi-byte lengths), steps 0 and 2⁴⁰."""
    from tensorboard.compat.proto import event_pb2, summary_pb2

    from writers._event_bytes import scalar_event

    rng = np.random.default_rng(0)
    specials = [0.0, -0.0, 1e39, -1e39, math.inf, -math.inf, math.nan, 1e-45, 7, True, 3.5e38]
    names = ["train/loss", "é/ü/ß", "x" * 130, "a" * 20000]
    for case in range(200):
        metrics: dict[str, float] = {}
        for i in range(int(rng.integers(0, 40))):
            value = specials[int(rng.integers(len(specials)))] if rng.random() < 0.5 else rng.normal(0, 1e5)
            metrics[f"{names[int(rng.integers(len(names)))]}{i}"] = value
        step = int(rng.choice([0, 1, 127, 128, 2**40, int(rng.integers(10**9))]))
        wall_time = float(rng.choice([0.0, 1.5, time.time()]))
        values = [summary_pb2.Summary.Value(tag=t, simple_value=float(v)) for t, v in metrics.items()]
        expected = event_pb2.Event(wall_time=wall_time, step=step, summary=summary_pb2.Summary(value=values))
        assert scalar_event(wall_time, step, metrics) == expected.SerializeToString(), case


def test_bad_scalar_is_a_clear_error(tmp_path: Path) -> None:
    with TensorBoardWriter(tmp_path) as w:
        w.log_scalars({"ok": "2.5"}, 0)  # type: ignore[dict-item]  # float() takes it, as before
        with pytest.raises(TypeError, match=r"metrics\['x'\]: got NoneType; expected a real number"):
            w.log_scalars({"a": 1.0, "x": None}, 1)  # type: ignore[dict-item]
        with pytest.raises(TypeError, match=r"metrics\['y'\]: got str; expected a real number"):
            w.log_scalars({"y": "high"}, 1)  # type: ignore[dict-item]
    assert [(e.step, e.value) for e in _accumulator(tmp_path).Scalars("ok")] == [(0, 2.5)]
