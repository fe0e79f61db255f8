"""``hjepa-metrics report --html``: one self-contained page, rendered by a real headless Chromium with no
console error and every chart image loaded."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from hjepa_metrics import HJEPAMetricsLogger
from hjepa_metrics.cli import main
from writers import JSONLWriter

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "dashboard_screenshot.py"


def _browser_flags() -> tuple[str | None, list[str]]:
    namespace: dict[str, object] = {"__name__": "dashboard_screenshot"}
    exec(compile(SCRIPT.read_text(encoding="utf-8"), str(SCRIPT), "exec"), namespace)
    return namespace["chromium"](), list(namespace["CHROMIUM_FLAGS"])  # type: ignore[operator,call-overload]


def _run(path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    with HJEPAMetricsLogger(JSONLWriter(path)) as logger:
        logger.log_config({"training": {"lr": 0.001, "steps": 30}, "model": "toy <b>"})
        for step in range(30):
            loss = torch.tensor(1.0 / (step + 1))
            logger.log_hierarchical_losses(
                {"loss": loss, "loss_h0": loss * 0.6, "loss_h1": loss * 0.3, "loss_h2": loss * 0.1}, step
            )
            # collapsing features: the rows align more every step, so collapse alerts fire
            base = torch.randn(1, 16, generator=gen)
            rows = base + (1.0 - step / 30) * torch.randn(128, 16, generator=gen)
            logger.log_collapse_metrics(rows, level=0, global_step=step)
        logger.log_embedding(rows, level=0, global_step=29, metadata=list(range(128)))
    return path


def test_html_report_is_self_contained_and_renders_in_chromium(tmp_path: Path) -> None:
    browser, flags = _browser_flags()
    run = _run(tmp_path / "run")
    out = tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out), "--html"]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    figures = sorted(out.glob("*.png"))
    assert len(figures) >= 11  # the dashboard categories, the eigenspectrum and the PCA scatter
    assert figures[-1].name.endswith("_embeddings_pca.png")
    assert page.count("<img ") == len(figures)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing to fetch: no network needed
    assert "Health: COLLAPSE" in page and "toy &lt;b&gt;" in page  # the verdict; config escaped
    if browser is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium; .ci/run installs it)")
    with tempfile.TemporaryDirectory(prefix="hjepa-chromium-") as profile:
        done = subprocess.run(
            [
                browser,
                *flags,
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=10000",
                "--dump-dom",
                (out / "report.html").as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', done.stdout)
    assert loaded is not None, done.stdout[:500]
    assert loaded.group(1) == loaded.group(2) == str(len(figures))  # every chart image decoded
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console  # no console message at all, errors included
