"""The console script, run as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hjepa_metrics import registry


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("hjepa-metrics")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "hjepa_metrics.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_tags_prints_the_registry() -> None:
    out = _run("tags", "--num-hierarchies", "3")
    assert out.returncode == 0, out.stderr
    printed = [line.split()[0] for line in out.stdout.splitlines()]
    assert printed == registry.tags(3)


def test_tags_json_has_meaning_unit_and_alerts() -> None:
    out = _run("tags", "--format", "json", "--prefix", "train/", "--num-hierarchies", "2")
    rows = json.loads(out.stdout)
    by_tag = {r["tag"]: r for r in rows}
    erank = by_tag["train/collapse/level1_effective_rank"]
    assert (
        erank["unit"] == "rank" and "< 100" in erank["alert"] and erank["category"] == "Collapse Monitoring"
    )
    assert by_tag["train/gradient_flow/predictor_mean"]["meaning"].endswith("top-level module predictor")
    assert all(row["formula"] for row in rows)  # every tag documents how it is computed


def test_bad_level_count_is_a_clear_error() -> None:
    out = _run("tags", "--num-hierarchies", "0")
    assert out.returncode == 2 and "--num-hierarchies: got 0" in out.stderr


@pytest.mark.parametrize("n", [3, 4])
def test_layout_guide_json(n: int) -> None:
    from hjepa_metrics.layout import guide_layout

    out = _run("layout", "--format", "guide-json", "--num-hierarchies", str(n))
    assert json.loads(out.stdout) == guide_layout(n)


def test_layout_tensorboard_into_a_logdir(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    from hjepa_metrics.layout import tensorboard_layout

    out = _run("layout", "--format", "tensorboard", "--num-hierarchies", "2", "--logdir", str(tmp_path))
    assert out.returncode == 0 and f"tensorboard --logdir {tmp_path}" in out.stdout
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    proto = layout_pb2.Layout.FromString(
        acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    )
    assert proto == tensorboard_layout(2)


def test_docs_tag_reference_is_up_to_date() -> None:
    from hjepa_metrics.cli import tags_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "tags.md"
    assert docs.read_text(encoding="utf-8") == tags_markdown(3), (
        "docs/tags.md is stale: run `hjepa-metrics tags --format markdown > docs/tags.md`"
    )
