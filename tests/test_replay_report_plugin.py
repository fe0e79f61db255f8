"""hjepa-metrics replay and report, and the pytest plugin's fixture and assertions."""

from __future__ import annotations

import math
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest

from hjepa_metrics.cli import main
from hjepa_metrics.testing import LoggedRun
from writers import JSONLWriter, read_jsonl


def _run(path: Path) -> Path:
    with JSONLWriter(path) as w:
        w.log_config({"lr": 0.1})
        for step in range(5):
            w.log_scalars(
                {
                    "train/loss/total": 1.0 / (step + 1),
                    "train/gradient/clipping_percentage": [20, 60, 70, 30, 80][step],
                    "train/collapse/level2_mean_similarity": 0.5,
                    "val/loss/total": math.nan,
                },
                step * 10,
                wall_time=1_700_000_000.0 + step,
            )
        w.log_histogram("feature_distributions/level0", np.arange(10.0), 40)
        w.log_image("patches/detailed_analysis", np.ones((4, 4, 3), dtype=np.uint8) * 200, 40)
    return path


def test_replay_into_tensorboard_keeps_steps_wall_times_layout_and_media(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    from hjepa_metrics.layout import tensorboard_layout

    run = _run(tmp_path / "run" / "metrics.jsonl")
    assert main(["replay", str(run), "--to", "tensorboard", "--log-dir", str(tmp_path / "out")]) == 0
    acc = EventAccumulator(
        str(tmp_path / "out" / "tensorboard" / "run"),  # the run keeps its directory's name
        size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0},
    )
    acc.Reload()
    loss = acc.Scalars("train/loss/total")
    assert [e.step for e in loss] == [0, 10, 20, 30, 40]
    assert [e.wall_time for e in loss] == [1_700_000_000.0 + i for i in range(5)]
    assert math.isnan(acc.Scalars("val/loss/total")[0].value)
    assert acc.Histograms("feature_distributions/level0")[0].histogram_value.num == 10
    assert acc.Images("patches/detailed_analysis")[0].width == 4
    layout = layout_pb2.Layout.FromString(
        acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    )
    assert layout == tensorboard_layout(3, guide=False)  # levels read from the tags (level2)


def test_replay_into_mlflow_keeps_timestamps(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run = _run(tmp_path / "m.jsonl")
    assert main(["replay", str(run), "--to", "mlflow", "--log-dir", str(tmp_path / "ml")]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'ml').resolve() / 'mlflow.db'}")
    run_id = (tmp_path / "ml" / "mlflow_run_id").read_text()
    history = client.get_metric_history(run_id, "train/loss/total")
    assert [(m.step, m.timestamp) for m in history] == [
        (10 * i, 1_700_000_000_000 + 1000 * i) for i in range(5)
    ]
    assert client.get_run(run_id).data.params == {"lr": "0.1"}


def test_report_writes_figures_alerts_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    run = _run(tmp_path / "m.jsonl")
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    pngs = sorted((tmp_path / "rep").glob("*.png"))
    assert pngs[0].name == "01_loss_metrics.png" and len(pngs) == 9
    assert all(Image.open(p).size[0] > 100 for p in pngs)
    # clipping 20, 60, 70, 30, 80: the > 50 rule crosses at steps 10 and 40; the second crossing comes
    # 10 steps after recovery, within the per-tag rate limit (100 steps), so as in the logger it is
    # counted, not listed
    assert "train/gradient/clipping_percentage = 60 at step 10" in out
    assert "at step 40" not in out
    assert "Alerts fired: 1 (2 crossings)" in out
    assert "Gradient clipping: 80.0% of logged steps (learning rate too high?" in out
    assert "Loss: 1 -> 0.2 (-80.0%)" in out
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "![01_loss_metrics](01_loss_metrics.png)" in md


def test_plugin_is_registered() -> None:
    assert "hjepa_metrics.testing" in {ep.value for ep in entry_points(group="pytest11")}


def test_plugin_fixture_and_assertions(hjepa_run: LoggedRun) -> None:
    for step, loss in enumerate([3.0, 2.0, 2.0, 1.0]):
        hjepa_run.writer.log_scalars({"train/loss/total": loss, "train/x": float(step)}, step)
    hjepa_run.assert_logged("train/loss/total")
    hjepa_run.assert_trend("train/loss/total", "decreasing")
    hjepa_run.assert_trend("train/x", "increasing", strict=True)
    hjepa_run.assert_finite()
    assert hjepa_run.value_at("train/loss/total", 3) == 1.0
    with pytest.raises(AssertionError, match="never logged"):
        hjepa_run.assert_logged("train/nope")
    with pytest.raises(AssertionError, match=r"is not decreasing: 2\.0 -> 2\.0"):
        hjepa_run.assert_trend("train/loss/total", "decreasing", strict=True)
    with pytest.raises(AssertionError, match="has no value at step 9"):
        hjepa_run.value_at("train/loss/total", 9)
    hjepa_run.writer.log_scalars({"train/loss/total": math.nan}, 4)
    with pytest.raises(
        AssertionError, match=r"non-finite values \(step, tag, value\): \[\(4, 'train/loss/total', nan\)\]"
    ):
        hjepa_run.assert_finite("train/loss/total")
    assert len(read_jsonl(hjepa_run.path)) == 5
