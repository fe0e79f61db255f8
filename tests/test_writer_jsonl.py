"""JSONL writer read back through read_jsonl and the stdlib json parser."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from writers import BackgroundWriter, BaseWriter, JSONLWriter, read_jsonl
from writers.records import scalar_series

# each test of scalar records runs on the writer itself and behind a BackgroundWriter, which encodes
# them on the caller's thread (JSONLWriter.encode_scalars) and hands the worker bytes
VIA = ["direct", "background"]


def _jsonl(path: Path, via: str) -> BaseWriter:
    writer = JSONLWriter(path)
    return writer if via == "direct" else BackgroundWriter(writer)


@pytest.mark.parametrize("via", VIA)
def test_scalars_round_trip_losslessly(tmp_path: Path, via: str) -> None:
    with _jsonl(tmp_path, via) as w:
        w.log_scalars(
            {"train/a": 1.25, "train/nan": math.nan, "train/inf": math.inf, "train/ninf": -math.inf}, 3
        )
        w.log_scalars({"train/np": np.float32(0.5), "train/t": torch.tensor(2.0), "train/i": np.int64(7)}, 4)
        w.log_scalars({"train/f": 0.5, "train/n": 3, "train/b": True}, 5)  # JSON numbers, but not floats
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    for line in lines:  # strict JSON: the stdlib parser refuses bare NaN/Infinity
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    first = json.loads(lines[0])
    assert first["step"] == 3 and isinstance(first["wall_time"], float)
    assert first["metrics"]["train/nan"] == "NaN" and first["metrics"]["train/ninf"] == "-Infinity"
    records = read_jsonl(tmp_path)
    m = records[0]["metrics"]
    assert m["train/a"] == 1.25 and math.isnan(m["train/nan"]) and m["train/inf"] == math.inf
    assert m["train/ninf"] == -math.inf
    assert records[1]["metrics"] == {"train/np": 0.5, "train/t": 2.0, "train/i": 7.0}
    assert records[2]["metrics"] == {"train/f": 0.5, "train/n": 3.0, "train/b": 1.0}
    assert '"train/n":3.0,"train/b":1.0}' in lines[2]  # written as floats: never `3` or `true`
    assert scalar_series(records, "train/a") == [(3, 1.25)]


def test_histogram_image_config_layout_records(tmp_path: Path) -> None:
    values = np.array([0.0, 1.0, 1.0, 2.0, np.nan])
    image = np.zeros((3, 4, 5), dtype=np.float32)  # CHW
    image[0] = 1.0
    with JSONLWriter(tmp_path / "run.jsonl") as w:
        w.log_histogram("train/h", values, 1)
        w.log_image("train/../../escape", image, 2)
        w.log_config({"model": {"dim": 8}, "lr": math.inf})
        w.log_layout({"category": []})
    hist, img, cfg, layout = read_jsonl(tmp_path / "run.jsonl")
    assert hist["kind"] == "histogram" and hist["num"] == 4 and sum(hist["counts"]) == 4
    assert hist["min"] == 0.0 and hist["max"] == 2.0 and hist["sum_squares"] == 6.0
    assert img["kind"] == "image" and (img["height"], img["width"], img["channels"]) == (4, 5, 3)
    png = tmp_path / img["path"]
    assert png.resolve().is_relative_to(tmp_path.resolve()) and ".." not in img["path"]
    from PIL import Image

    pixels = np.asarray(Image.open(png))
    assert pixels.shape == (4, 5, 3) and (pixels[..., 0] == 255).all() and (pixels[..., 1:] == 0).all()
    assert cfg["config"] == {"model": {"dim": 8}, "lr": "Infinity"}
    assert layout["layout"] == {"category": []}


def test_append_on_reopen_and_torn_tail(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "m.jsonl"
    with JSONLWriter(path) as w:
        w.log_scalars({"a": 1.0}, 1)
    with path.open("ab") as f:
        f.write(b'{"step": 2, "wall_time": 1.0, "metr')  # a crash mid-line
    assert [r["step"] for r in read_jsonl(path)] == [1]  # the reader skips the torn tail
    assert "torn last line" in caplog.text
    with JSONLWriter(path) as w:  # resume: cut the torn tail, append
        w.log_scalars({"a": 3.0}, 3)
    assert [r["step"] for r in read_jsonl(path)] == [1, 3]


def test_bad_values_and_steps_are_clear_errors(tmp_path: Path) -> None:
    with JSONLWriter(tmp_path) as w:
        with pytest.raises(TypeError, match=r"metrics\['x'\]: got str"):
            w.log_scalars({"x": "high"}, 1)  # type: ignore[dict-item]
        with pytest.raises(ValueError, match=r"step: got 1\.5"):
            w.log_scalars({"x": 1.0}, 1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"step: got bool True"):  # an int subclass, still refused
            w.log_scalars({"x": 1.0}, True)
        w.log_scalars({"x": 1.0}, 3.0)  # type: ignore[arg-type]  # an integral float is its int
    assert [r["step"] for r in read_jsonl(tmp_path)] == [3] and type(read_jsonl(tmp_path)[0]["step"]) is int
    with pytest.raises(RuntimeError, match="write after close"):
        w.log_scalars({"x": 1.0}, 2)


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "metrics": {}}\nnot json\n{"step": 2, "metrics": {}}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not a JSON record"):
        read_jsonl(path)


def test_stdlib_fallback_writes_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    record = {"x": 1.5, "y": math.nan, "z": -math.inf}
    with JSONLWriter(tmp_path / "a.jsonl") as fast:
        fast.log_scalars(record, 1, wall_time=10.0)
    monkeypatch.setitem(sys.modules, "orjson", None)  # as if orjson were not installed
    with JSONLWriter(tmp_path / "b.jsonl") as slow:
        slow.log_scalars(record, 1, wall_time=10.0)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert json.loads((tmp_path / "b.jsonl").read_text()) == {
        "step": 1,
        "wall_time": 10.0,
        "metrics": {"x": 1.5, "y": "NaN", "z": "-Infinity"},
    }


@pytest.mark.parametrize("via", VIA)
def test_plain_float_records_keep_every_value(tmp_path: Path, via: str) -> None:
    """Dicts of plain finite floats are written without a per-value pass; values whose sum overflows,
    subclasses of float and non-string tags still come out exact and strict."""

    class Loss(float):
        pass

    cases = [
        {f"train/m{i}": float(i) / 7 for i in range(100)},
        {"big": 1.7e308, "bigger": 1.7e308, "tiny": 5e-324},  # the sum overflows: finite values all
        {"a": Loss(0.25), "b": -0.0},
        {1: 2.0, "c": 3.0},  # type: ignore[dict-item]
        {"n": 1.0, "nan": math.nan},
    ]
    with _jsonl(tmp_path, via) as w:
        for step, metrics in enumerate(cases):
            w.log_scalars(metrics, step)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    got = [json.loads(line, parse_constant=lambda c: pytest.fail(c))["metrics"] for line in lines]
    assert got[0] == cases[0] and got[1] == cases[1] and got[2] == {"a": 0.25, "b": -0.0}
    assert math.copysign(1, got[2]["b"]) == -1 and type(got[2]["a"]) is float
    assert got[3] == {"1": 2.0, "c": 3.0} and got[4] == {"n": 1.0, "nan": "NaN"}
