"""HJEPAMetricsLogger: prefixes, state, alerts, validation accumulation, the guide's constructor."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hjepa_metrics import HJEPAMetricsLogger, HJEPATensorBoardLogger, collapse_metrics, prediction_quality
from hjepa_metrics.alerts import AlertMonitor
from writers import BaseWriter, JSONLWriter, read_jsonl


class Memory(BaseWriter):
    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.scalars: list[tuple[int, dict[str, float]]] = []
        self.layouts: list[Any] = []
        self.media: list[tuple[str, str, int]] = []

    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        self.scalars.append((step, dict(metrics)))

    def log_layout(self, layout: Any) -> None:
        self.layouts.append(layout)

    def log_histogram(self, tag: str, values: Any, step: int) -> None:
        self.media.append(("histogram", tag, step))

    def log_image(self, tag: str, image: Any, step: int) -> None:
        self.media.append(("image", tag, step))


def test_prefixes_return_values_and_layout_once() -> None:
    mem = Memory()
    logger = HJEPAMetricsLogger(mem, num_hierarchies=2)
    got = logger.log_hierarchical_losses({"loss": 1.0, "loss_h0": 0.6, "loss_h1": 0.4}, global_step=7)
    assert got["train/loss/total"] == 1.0 and got["train/loss/contribution_h0"] == pytest.approx(60.0)
    val = logger.log_masking_statistics(torch.ones(2, 4), global_step=8, prefix="val/")
    assert val == {
        "val/masking/mask_ratio": 1.0,
        "val/masking/num_masked_patches": 4.0,
        "val/masking/num_unmasked_patches": 0.0,
    }
    assert mem.scalars == [(7, got), (8, val)]
    assert len(mem.layouts) == 1 and mem.layouts[0]["category"][0]["title"] == "Loss Metrics"
    logger.log_histogram("feature_distributions/level0", torch.randn(10))  # default: the last step
    assert mem.media == [("histogram", "feature_distributions/level0", 8)]


def test_clipping_percentage_over_calls_and_reset() -> None:
    logger = HJEPAMetricsLogger(Memory(), alerts=False)
    pct = [
        logger.log_gradient_clipping(before, 1.0, 1.0, global_step=i)["train/gradient/clipping_percentage"]
        for i, before in enumerate([2.0, 0.5, 3.0, 0.1])
    ]
    assert pct == [100.0, 50.0, pytest.approx(200 / 3), 50.0]
    logger.reset_clipping_stats()
    assert logger.log_gradient_clipping(0.5, 0.5, 1.0)["train/gradient/clipping_percentage"] == 0.0


def test_own_loss_history_is_bounded() -> None:
    logger = HJEPAMetricsLogger(Memory(), loss_history_size=5)
    for i in range(10):
        out = logger.log_training_stability(current_loss=torch.tensor(float(i)), global_step=i)
    assert list(logger.loss_history) == [5.0, 6.0, 7.0, 8.0, 9.0]
    assert out["train/stability/loss_spike_ratio"] == 9.0 / 5.0
    assert out["train/stability/loss_trend_slope"] == pytest.approx(1.0)


def test_alerts_fire_once_per_crossing(caplog: pytest.LogCaptureFixture) -> None:
    seen = []
    monitor = AlertMonitor(num_hierarchies=3, repeat_interval=0)  # every crossing
    logger = HJEPAMetricsLogger(Memory(), alerts=monitor, on_alert=seen.append)
    for step, pct in enumerate([20.0, 60.0, 70.0, 30.0, 80.0]):
        logger.log_scalars({"gradient/clipping_percentage": pct}, global_step=step)
    assert [(a.step, a.value) for a in logger.alerts] == [(1, 60.0), (4, 80.0)]
    assert seen == logger.alerts
    assert caplog.text.count("alert: train/gradient/clipping_percentage") == 2
    assert "learning rate too high" in caplog.text


def test_an_oscillating_value_is_rate_limited_and_the_history_bounded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    monitor = AlertMonitor(num_hierarchies=3, max_kept=5)  # default repeat interval: 100 steps
    tag = "train/collapse/level0_mean_similarity"
    for step in range(20_000):  # crosses 0.7 and recovers (hysteresis included) every other step
        monitor.check({tag: 0.8 if step % 2 else 0.5}, step)
    assert monitor.crossings[tag] == 10_000
    # reports at step 1, then 100, 200, 400, ... steps later: doubling intervals
    reported = caplog.text.count(f"alert: {tag}")
    assert reported == 8  # 1, 101, 301, 701, 1501, 3101, 6301, 12701
    expected = [1 + sum(100 * 2**i for i in range(k)) for k in range(reported)]
    assert [a.step for a in monitor.fired] == expected[-5:]  # only the last max_kept are kept
    assert "crossed 49 more time(s)" in caplog.text  # the first 100-step gap held 49 crossings back
    assert monitor.fired[-1].repeats == (12701 - 6301) // 2 - 1
    # a tag that stayed in range for the interval crosses anew: reported at once
    monitor.check({tag: 0.5}, 30_000)
    monitor.check({tag: 0.9}, 30_200)
    assert monitor.fired[-1].step == 30_200 and monitor.fired[-1].repeats > 0


def test_effective_rank_alert_scales_with_feature_dim() -> None:
    logger = HJEPAMetricsLogger(Memory())
    collapsed = torch.randn(500, 1) * torch.randn(1, 384)  # rank 1 < 100·384/768
    logger.log_collapse_metrics(collapsed, level=1, global_step=3)
    tags = {a.tag for a in logger.alerts}
    assert "train/collapse/level1_effective_rank" in tags
    quiet = HJEPAMetricsLogger(Memory(), alerts=False)
    quiet.log_collapse_metrics(collapsed, level=1, global_step=3)
    assert quiet.alerts == []


def test_validation_accumulates_every_batch_per_level(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [
        (
            [torch.randn(4, n, 8, generator=gen) for n in (8, 4, 2)],
            [torch.randn(4, n, 8, generator=gen) for n in (8, 4, 2)],
            torch.randn(4, 9, 8, generator=gen)[:, 1:, :],
        )  # non-contiguous, as the guide's CLS slice
        for _ in range(3)
    ]
    logger = HJEPAMetricsLogger(JSONLWriter(tmp_path))
    val = logger.validation()
    for preds, targs, feats in batches:
        val.update(predictions=preds, targets=targs, features=feats)
    logged = val.log(global_step=100)
    logger.close()
    want_pred = prediction_quality(
        [torch.cat([b[0][lvl] for b in batches]) for lvl in range(3)],
        [torch.cat([b[1][lvl] for b in batches]) for lvl in range(3)],
    )
    want_collapse = collapse_metrics(torch.cat([b[2].reshape(-1, 8) for b in batches]))
    for key, value in {**want_pred, **want_collapse}.items():
        assert logged["val/" + key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert read_jsonl(tmp_path)[-1]["step"] == 100


def test_guide_flattened_validation_list_is_regrouped_by_level() -> None:
    gen = torch.Generator().manual_seed(1)
    per_batch = [
        (
            [torch.randn(2, n, 4, generator=gen) for n in (6, 3, 1)],
            [torch.randn(2, n, 4, generator=gen) for n in (6, 3, 1)],
        )
        for _ in range(2)
    ]
    all_predictions: list[torch.Tensor] = []
    all_targets: list[torch.Tensor] = []
    for preds, targs in per_batch:
        all_predictions.extend(preds)  # the guide's snippet, verbatim
        all_targets.extend(targs)
    logger = HJEPAMetricsLogger(Memory())
    got = logger.log_prediction_quality(predictions=all_predictions, targets=all_targets, prefix="val/")
    want = prediction_quality(
        [torch.cat([p[lvl] for p, _ in per_batch]) for lvl in range(3)],
        [torch.cat([t[lvl] for _, t in per_batch]) for lvl in range(3)],
    )
    assert got == {"val/" + k: pytest.approx(v, rel=1e-6) for k, v in want.items()}


def test_level_count_mismatch_is_a_clear_error() -> None:
    logger = HJEPAMetricsLogger(Memory(), num_hierarchies=3)
    with pytest.raises(ValueError, match="predictions: got 2 levels; expected num_hierarchies=3"):
        logger.log_prediction_quality([torch.ones(1, 2, 3)] * 2, [torch.ones(1, 2, 3)] * 2)
    with pytest.raises(ValueError, match="hierarchy_weights: got 2 weights"):
        HJEPAMetricsLogger(Memory(), hierarchy_weights=[1.0, 0.5])


class GuideMetricsLogger:
    """The shape of the guide's original metrics logger: log_metrics(metrics, step, prefix, commit)."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], int, str, bool]] = []

    def log_metrics(
        self, metrics: dict[str, float], step: int, prefix: str = "", commit: bool = True
    ) -> None:
        self.calls.append((metrics, step, prefix, commit))


def test_guide_constructor_with_a_log_metrics_object(caplog: pytest.LogCaptureFixture) -> None:
    target = GuideMetricsLogger()
    logger = HJEPATensorBoardLogger(metrics_logger=target, num_hierarchies=3)
    assert HJEPATensorBoardLogger is HJEPAMetricsLogger
    model = nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    logger.log_gradient_flow(model, global_step=5)
    metrics, step, prefix, commit = target.calls[0]
    assert step == 5 and prefix == "" and commit is True
    assert metrics["train/gradient_flow/global_norm"] == pytest.approx(
        float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf))
    )
    logger.log_image("patches/x", torch.zeros(3, 4, 4), 5)
    logger.log_image("patches/x", torch.zeros(3, 4, 4), 6)
    assert caplog.text.count("has no log_image") == 1
    with pytest.raises(TypeError, match="metrics_logger: got int"):
        HJEPATensorBoardLogger(metrics_logger=3)


def test_guide_constructor_with_a_writer(tmp_path: Path) -> None:
    with HJEPATensorBoardLogger(metrics_logger=JSONLWriter(tmp_path), num_hierarchies=3) as logger:
        logger.log_learning_rate(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.25), global_step=1)
    records = read_jsonl(tmp_path)
    assert records[0]["kind"] == "layout"
    # the alert settings, so that `hjepa-metrics report` judges the run as the logger did
    assert records[1]["config"] == {
        "hjepa_metrics": {"alerts": {"num_hierarchies": 3, "warmup_steps": 0, "repeat_interval": 100}}
    }
    assert records[2]["metrics"] == {
        "train/learning_rate/base_lr": 0.25,
        "train/learning_rate/param_group_0": 0.25,
    }


def test_alert_hysteresis_ignores_hovering_at_the_threshold() -> None:
    logger = HJEPAMetricsLogger(Memory(), alerts=AlertMonitor(num_hierarchies=3, repeat_interval=0))
    # threshold 0.7 (above): recovery needs <= 0.7 - 5% of 0.7 = 0.665
    values = [0.69, 0.71, 0.69, 0.71, 0.66, 0.71, float("nan"), 0.60, 0.72]
    for step, v in enumerate(values):
        logger.log_scalars({"collapse/level0_mean_similarity": v}, global_step=step)
    assert [a.step for a in logger.alerts] == [1, 5, 8]  # 0.69 is not recovery; 0.66 is; NaN changes nothing
