"""``hjepa-metrics compare``: two runs with a known difference, and one tag that differs only by noise."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from hjepa_metrics.cli import main
from hjepa_metrics.compare import step_noise
from writers import JSONLWriter


def _run(path: Path, loss_scale: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with JSONLWriter(path) as w:
        for step in range(0, 200, 10):
            w.log_scalars(
                {
                    "train/loss/total": loss_scale / (1 + step / 50),
                    # the same level in both runs, with noise of its own: not a difference
                    "train/collapse/level0_effective_rank": 12.0 + rng.normal(0, 0.5),
                },
                step,
            )
    return path


def test_step_noise_of_white_noise_is_its_std() -> None:
    values = np.random.default_rng(0).normal(0, 2.0, 20_000)
    assert step_noise(values) == pytest.approx(2.0, rel=0.03)
    assert step_noise(np.arange(10.0)) == 0.0  # a trend is not noise
    assert step_noise(np.array([1.0, math.nan])) == 0.0


def test_compare_marks_the_tag_that_differs_beyond_noise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _run(tmp_path / "baseline" / "metrics.jsonl", 1.0, seed=1)
    b = _run(tmp_path / "higher_lr" / "metrics.jsonl", 2.0, seed=2)
    assert main(["compare", str(a.parent), str(b.parent), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("train/")}
    assert out.splitlines()[0].split() == ["tag", "baseline", "higher_lr", "differs"]
    assert lines["train/loss/total"].rstrip().endswith("*")  # last 0.2 vs 0.4, noiseless
    assert "0.2083 (0.2083..1)" in lines["train/loss/total"]  # 1 / (1 + 190 / 50)
    assert not lines["train/collapse/level0_effective_rank"].rstrip().endswith("*")
    assert "1 of 2 tags differ" in out
    pngs = sorted(p.name for p in (tmp_path / "cmp").glob("*.png"))
    assert pngs == ["01_loss_metrics.png", "03_collapse_monitoring.png"]
    page = (tmp_path / "cmp" / "compare.html").read_text(encoding="utf-8")
    assert page.count("<img ") == 2 and "higher_lr" in page


def test_compare_needs_two_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _run(tmp_path / "one.jsonl", 1.0, seed=1)
    assert main(["compare", str(a)]) == 1
    assert "expected at least two" in capsys.readouterr().err
