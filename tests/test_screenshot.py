"""``scripts/dashboard_screenshot.py`` renders a live TensorBoard's Custom Scalars tab in Chromium."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "dashboard_screenshot.py"


def _script() -> object:
    spec = importlib.util.spec_from_file_location("dashboard_screenshot", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["dashboard_screenshot"] = module
    spec.loader.exec_module(module)
    return module


def test_the_dashboard_renders_into_a_png(tmp_path: Path) -> None:
    from PIL import Image, ImageStat

    from hjepa_metrics.layout import dashboard_layout
    from writers import TensorBoardWriter

    shot: object = _script()
    browser = shot.chromium()  # type: ignore[attr-defined]
    if browser is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium; .ci/run installs it)")
    with TensorBoardWriter(tmp_path / "tb" / "demo") as writer:
        writer.log_layout(dashboard_layout(3))
        for step in range(20):
            writer.log_scalars({"train/loss/total": 1 / (step + 1), "train/loss/h0": 0.5 / (step + 1)}, step)
    proc, port = shot.serve(tmp_path / "tb")  # type: ignore[attr-defined]
    try:
        out = tmp_path / "shot.png"
        shot.screenshot(f"http://127.0.0.1:{port}/#custom_scalars", out, browser, size="1000,700")  # type: ignore[attr-defined]
    finally:
        shot.stop(proc)  # type: ignore[attr-defined]
    assert proc.poll() is not None
    image = Image.open(out).convert("L")
    assert image.size == (1000, 700)
    assert ImageStat.Stat(image).stddev[0] > 10  # a drawn page, not a blank one
