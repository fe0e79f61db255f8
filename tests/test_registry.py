"""Registry completeness against the guide's own text, uniqueness, and backend name rules."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from hjepa_metrics import registry
from hjepa_metrics.layout import guide_layout

SPEC = Path(__file__).resolve().parents[1] / ".." / "shared" / "spec"
GUIDE_FILE = SPEC / "tensorboard-integration-guide.md"
needs_guide = pytest.mark.skipif(
    not GUIDE_FILE.exists(), reason="shared/spec not checked out beside the repo"
)

# The 53 layout tags of the guide, copied from its JSON (kept here so the test runs without shared/).
GUIDE_LAYOUT_TAGS_WITHOUT_PREFIX = [
    "loss/total",
    "loss/h0",
    "loss/h1",
    "loss/h2",
    "loss/unweighted",
    "loss/contribution_h0",
    "loss/contribution_h1",
    "loss/contribution_h2",
    "ema/momentum_current",
    "ema/momentum_target",
    "ema/avg_parameter_divergence",
    "ema/weight_magnitude_ratio",
    "collapse/level0_mean_std_per_dim",
    "collapse/level0_effective_rank",
    "collapse/level0_mean_similarity",
    "collapse/level1_mean_std_per_dim",
    "collapse/level1_effective_rank",
    "collapse/level1_mean_similarity",
    "collapse/level2_mean_std_per_dim",
    "collapse/level2_effective_rank",
    "collapse/level2_mean_similarity",
    "prediction/level0_cosine_sim_mean",
    "prediction/level0_cosine_sim_std",
    "prediction/level0_cosine_sim_min",
    "prediction/level0_cosine_sim_max",
    "prediction/level1_cosine_sim_mean",
    "prediction/level1_cosine_sim_std",
    "prediction/level2_cosine_sim_mean",
    "prediction/level2_cosine_sim_std",
    "gradient_flow/global_norm",
    "gradient_flow/context_encoder_mean",
    "gradient_flow/predictor_mean",
    "gradient/global_norm_before_clip",
    "gradient/global_norm_after_clip",
    "gradient/clipping_percentage",
    "learning_rate/base_lr",
    "stability/loss_smoothness",
    "stability/loss_trend_slope",
    "stability/loss_spike_ratio",
    "performance/forward_time_ms",
    "performance/backward_time_ms",
    "performance/samples_per_second",
    "performance/gpu_memory_allocated_gb",
    "hierarchy/level0_feat_mean",
    "hierarchy/level0_feat_std",
    "hierarchy/level0_num_patches",
    "hierarchy/level1_feat_mean",
    "hierarchy/level1_num_patches",
    "hierarchy/level2_feat_mean",
    "hierarchy/level2_num_patches",
    "masking/mask_ratio",
    "masking/num_masked_patches",
    "masking/num_unmasked_patches",
]

# Names the guide's tables, snippets and debugging notes use, some without a level.
GUIDE_NAMED = [
    "performance/peak_memory_gb",
    "prediction/levelX_normalized_mse",
    "collapse/min_std_per_dim",
    "collapse/mean_std_per_dim",
    "collapse/effective_rank",
    "collapse/mean_similarity",
    "ema/parameter_divergence",
    "prediction/levelX_cosine_sim_mean",
    "hierarchy/level2_feat_std",
]


def _guide_json() -> dict[str, object]:
    text = GUIDE_FILE.read_text(encoding="utf-8")
    match = re.search(r"```json\n(.*?)```", text, re.S)
    assert match
    return dict(json.loads(match.group(1)))


def test_expansion_contains_every_layout_tag() -> None:
    assert len(GUIDE_LAYOUT_TAGS_WITHOUT_PREFIX) == 53
    assert set(GUIDE_LAYOUT_TAGS_WITHOUT_PREFIX) <= set(registry.tags(3))


@needs_guide
def test_layout_tags_from_the_guide_file_itself() -> None:
    tags = re.findall(r'"train/([^"]+)"', json.dumps(_guide_json()))
    assert sorted(tags) == sorted(GUIDE_LAYOUT_TAGS_WITHOUT_PREFIX)
    # every `group/name` in backticks of the guide's tables maps to a registry tag
    text = GUIDE_FILE.read_text(encoding="utf-8")
    for name in set(
        re.findall(
            r"`((?:loss|ema|collapse|prediction|gradient_flow|gradient|hierarchy)/[a-zA-Z0-9_]+)`", text
        )
    ):
        assert registry.canonical(name) in registry.tags(3), name


@needs_guide
def test_guide_layout_equals_the_guide_json() -> None:
    assert guide_layout(3) == _guide_json()


@pytest.mark.parametrize("name", GUIDE_NAMED)
def test_names_the_guide_uses_resolve(name: str) -> None:
    tag = registry.canonical(name)
    assert tag in registry.tags(3)


def test_levelless_names_map_to_level_forms() -> None:
    assert registry.canonical("collapse/mean_std_per_dim") == "collapse/level0_mean_std_per_dim"
    assert registry.canonical("collapse/effective_rank", level=2) == "collapse/level2_effective_rank"
    assert registry.canonical("ema/parameter_divergence") == "ema/avg_parameter_divergence"
    with pytest.raises(KeyError, match="unknown tag"):
        registry.canonical("collapse/whatever")


@pytest.mark.parametrize("n", [1, 2, 3, 5, 12])
def test_no_tag_defined_twice_and_names_are_valid(n: int) -> None:
    tags = registry.tags(n)
    assert len(tags) == len(set(tags))
    templates = [s.template for s in registry.REGISTRY]
    assert len(templates) == len(set(templates))
    mlflow_key = re.compile(r"^[A-Za-z0-9_\-. :/]+$")
    for tag in tags:
        full = "train/" + tag
        assert mlflow_key.match(full) and len(full) <= 250 and "//" not in full and ".." not in full, tag
        assert not full.endswith("/")
        match = registry.lookup(full)
        assert match is not None and match.spec.expand(n) and tag in match.spec.expand(n)


def test_every_tag_maps_back_to_exactly_one_spec() -> None:
    for tag in registry.tags(3):
        owners = [s for s in registry.REGISTRY if s.pattern.match(tag)]
        assert len(owners) == 1, (tag, [s.template for s in owners])


def test_lookup_of_dynamic_names() -> None:
    match = registry.lookup("val/gradient_flow/decoder_max")
    assert (
        match is not None and match.name == "decoder" and match.spec.template == "gradient_flow/{module}_max"
    )
    assert registry.lookup("train/collapse/level11_effective_rank").level == 11  # type: ignore[union-attr]
    assert registry.lookup("something/else") is None


def test_alert_rules_from_the_guide() -> None:
    def rule(template: str) -> registry.AlertRule:
        spec = next(s for s in registry.REGISTRY if s.template == template)
        assert spec.alert is not None
        return spec.alert

    assert rule("collapse/level{level}_mean_std_per_dim").fires(0.009)
    assert not rule("collapse/level{level}_mean_std_per_dim").fires(0.011)
    assert rule("collapse/level{level}_min_std_per_dim").fires(0.0009)
    erank = rule("collapse/level{level}_effective_rank")
    assert erank.fires(99.0, dim=768) and not erank.fires(101.0, dim=768)
    assert erank.fires(49.0, dim=384) and not erank.fires(51.0, dim=384)  # scales with D
    assert not erank.fires(1.0)  # unknown D: no guess
    assert rule("collapse/level{level}_mean_similarity").fires(0.71)
    assert rule("gradient/clipping_percentage").fires(50.1) and not rule(
        "gradient/clipping_percentage"
    ).fires(50.0)
    ratio = rule("ema/weight_magnitude_ratio")
    assert ratio.fires(0.94) and ratio.fires(1.06) and not ratio.fires(1.0)
    share = rule("loss/contribution_h{level}")
    assert share.fires(45.0, level=0, num_hierarchies=3) and not share.fires(60.0, level=0, num_hierarchies=3)
    assert share.fires(20.0, level=2, num_hierarchies=3) and not share.fires(10.0, level=2, num_hierarchies=3)
    assert not share.fires(45.0, level=0, num_hierarchies=2)  # the guide's targets are for 3 levels
    assert rule("prediction/level{level}_cosine_sim_mean").fires(0.69)
    assert not ratio.fires(float("nan"))


def test_guide_layout_generalizes_to_other_level_counts() -> None:
    two = guide_layout(2)
    collapse = next(c for c in two["category"] if c["title"] == "Collapse Monitoring")
    assert [c["title"] for c in collapse["children"]] == ["Level 0 (Finest)", "Level 1 (Coarse)"]
    five = guide_layout(5, prefix="val/")
    pred = next(c for c in five["category"] if c["title"] == "Prediction Quality")
    assert [c["title"] for c in pred["children"]] == [f"Level {i} Similarity" for i in range(5)]
    assert pred["children"][4]["children"] == [
        "val/prediction/level4_cosine_sim_mean",
        "val/prediction/level4_cosine_sim_std",
    ]


def test_the_monitor_fires_exactly_where_each_rule_does() -> None:
    """AlertMonitor keeps each tag's bounds as two floats for its per-step check; it must fire where
    the rule's own ``fires`` (the registry's range test) does, for every rule, level and edge value."""
    from hjepa_metrics.alerts import AlertMonitor

    levels, dim = 3, 384
    values = [-math.inf, -1.0, 0.0, 1e-4, 0.009, 0.5, 1.0, 5.0, 20.0, 49.0, 51.0, 60.0, 99.0, 1e6, math.inf]
    values.append(math.nan)
    checked = 0
    for tag in registry.tags(levels):
        match = registry.lookup(tag)
        assert match is not None
        rule = match.spec.alert
        if rule is None:
            continue
        bounds = rule.bounds(level=match.level, num_hierarchies=levels, dim=dim) or ()
        edges = [math.nextafter(b, d) for b in bounds if b is not None for d in (-math.inf, math.inf)]
        for value in values + [b for b in bounds if b is not None] + edges:
            monitor = AlertMonitor(num_hierarchies=levels, log_alerts=False)
            monitor.set_feature_dim(match.level or 0, dim)
            fired = monitor.check({"train/" + tag: value}, step=1)
            want = rule.fires(value, level=match.level, num_hierarchies=levels, dim=dim)
            assert bool(fired) == want, (tag, value)
            checked += 1
    assert checked > 100
