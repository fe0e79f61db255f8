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


@pytest.mark.parametrize("guide", [False, True])
def test_layout_tensorboard_into_a_logdir(tmp_path: Path, guide: bool) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    from hjepa_metrics.layout import tensorboard_layout

    flags = ["--guide"] if guide else []
    out = _run(
        "layout", "--format", "tensorboard", "--num-hierarchies", "2", "--logdir", str(tmp_path), *flags
    )
    assert out.returncode == 0 and f"tensorboard --logdir {tmp_path}" in out.stdout
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    proto = layout_pb2.Layout.FromString(
        acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    )
    assert proto == tensorboard_layout(2, guide=guide)


def test_dashboard_layout_one_unit_per_chart_no_cuda_charts_and_validation_beside_training() -> None:
    from hjepa_metrics.layout import dashboard_layout, guide_layout

    out = _run("layout", "--format", "json")
    layout = json.loads(out.stdout)
    charts = [chart for c in layout["category"] for chart in c["children"]]
    for chart in charts:
        units = {registry.lookup(t).spec.unit for t in chart["children"]}  # type: ignore[union-attr]
        assert len(units) == 1, (chart["title"], units)
    tags = {t for chart in charts for t in chart["children"]}
    guide_tags = {
        t
        for c in guide_layout(3)["category"]
        for ch in c["children"]
        for t in ([ch] if isinstance(ch, str) else ch["children"])
    }
    cuda = {t for t in guide_tags if registry.lookup(t).spec.cuda_only}  # type: ignore[union-attr]
    assert cuda == {"train/performance/gpu_memory_allocated_gb"}
    assert tags & guide_tags == guide_tags - cuda  # every other chart of the guide is kept
    val = {t for t in tags if t.startswith("val/")}
    assert val == {
        t.replace("train/", "val/")
        for t in guide_tags
        if t.startswith(("train/prediction/", "train/collapse/"))
    }
    rank = next(c for c in charts if c["title"] == "Level 0 (Finest) (rank)")
    assert rank["children"] == ["train/collapse/level0_effective_rank", "val/collapse/level0_effective_rank"]
    with_cuda = dashboard_layout(3, cuda=True)
    assert "train/performance/gpu_memory_allocated_gb" in json.dumps(with_cuda)


def test_docs_tag_reference_is_up_to_date() -> None:
    from hjepa_metrics.cli import tags_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "tags.md"
    assert docs.read_text(encoding="utf-8") == tags_markdown(3), (
        "docs/tags.md is stale: run `hjepa-metrics tags --format markdown > docs/tags.md`"
    )


MALFORMED = {
    "a JSON list": (b"[1,2,3]\n", ":1: got a JSON list; expected an object"),
    "no step": (
        b'{"step": 1, "metrics": {"a": 1}}\n{"metrics": {"a": 1}}\n',
        ":2: scalars record has step null",
    ),
    "a null value": (b'{"step": 1, "metrics": {"a": null}}\n', ":1: metric 'a' is null"),
    "a bool step": (b'{"step": true, "metrics": {"a": 1}}\n', ":1: scalars record has step true"),
    "an empty file": (b"", "no records"),
    "binary": (bytes(range(256)) * 3, ":1: not a JSON record"),
    "bad JSON mid-file": (
        b'{"step": 1, "metrics": {"a": 1}}\n{"step": 2,\n{"step": 3, "metrics": {}}\n',
        ":2:",
    ),
    "a bad histogram": (b'{"kind": "histogram", "step": 1, "tag": "h", "min": "x"}\n', ":1: histogram 'min'"),
    "an escaping image path": (
        b'{"step": 1, "metrics": {"a": 1}}\n'
        b'{"kind": "image", "step": 1, "tag": "x", "path": "../../../etc/passwd"}\n',
        ":2: image path '../../../etc/passwd' leads outside the run directory",
    ),
    "an absolute image path": (
        b'{"kind": "image", "step": 1, "tag": "x", "path": "/etc/passwd"}\n',
        "leads outside the run directory",
    ),
}


@pytest.mark.parametrize("command", ["replay", "report"])
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_bad_runs_get_one_clear_line_and_a_nonzero_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, case: str
) -> None:
    from hjepa_metrics.cli import main

    content, expected = MALFORMED[case]
    run = tmp_path / "run.jsonl"
    run.write_bytes(content)
    out_dir = tmp_path / "out"
    extra = ["--to", "jsonl", "--log-dir", str(out_dir)] if command == "replay" else ["--out", str(out_dir)]
    if command == "report" and case == "an empty file":
        expected = "no scalar records"
    assert main([command, str(run), *extra]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"hjepa-metrics {command}: error: "), lines
    assert str(run) in lines[0] and expected in lines[0]
    assert not (out_dir / "metrics.jsonl").exists()  # nothing was written for a bad run


def test_a_missing_run_is_one_line_from_the_installed_command(tmp_path: Path) -> None:
    for command in ("replay", "report"):
        proc = _run(command, str(tmp_path / "nope.jsonl"))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.strip() == (
            f"hjepa-metrics {command}: error: {tmp_path / 'nope.jsonl'}: no such file "
            "(expected a metrics.jsonl file or its directory)"
        )


def test_replay_refuses_an_image_symlinked_out_of_the_run(tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not yours")
    run_dir = tmp_path / "run"
    (run_dir / "images").mkdir(parents=True)
    (run_dir / "images" / "x.png").symlink_to(outside)
    (run_dir / "metrics.jsonl").write_text(
        '{"kind": "image", "step": 1, "tag": "x", "path": "images/x.png"}\n', encoding="utf-8"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hjepa_metrics.cli",
            "replay",
            str(run_dir),
            "--to",
            "jsonl",
            "--log-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "outside the run directory" in proc.stderr, proc.stderr
    assert not list((tmp_path / "out").rglob("*.png"))
