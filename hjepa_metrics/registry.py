"""Every tag of the H-JEPA guide, defined once.

A :class:`TagSpec` is a name template over ``{level}`` (hierarchy level) and at most one other
placeholder (``{module}``, ``{group}``, ``{param}``) whose default expansion the guide names. Layouts,
docs, alerts and backend key checks are all generated from :data:`REGISTRY`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache

# The guide's custom-scalars categories, in the guide's order.
CATEGORIES = (
    "Loss Metrics",
    "EMA Dynamics",
    "Collapse Monitoring",
    "Prediction Quality",
    "Gradient Flow",
    "Learning Dynamics",
    "Performance",
    "Hierarchy Structure",
    "Masking",
)


Bounds = tuple[float | None, float | None] | None


def outside(value: float, bounds: Bounds) -> bool:
    """Whether ``value`` is outside :meth:`AlertRule.bounds` (NaN, or no bounds, never is)."""
    if bounds is None or value != value:
        return False
    low, high = bounds
    return (low is not None and value < low) or (high is not None and value > high)


def inside(value: float, bounds: Bounds, margin: float = 0.05) -> bool:
    """Whether ``value`` is back inside ``bounds`` by ``margin`` of each bound's size (no bounds: it is;
    NaN never is)."""
    if bounds is None:
        return True
    if value != value:
        return False
    low, high = bounds
    width = abs(high - low) if low is not None and high is not None else None
    ok_low = low is None or value >= low + margin * (width if width is not None else abs(low))
    ok_high = high is None or value <= high - margin * (width if width is not None else abs(high))
    return ok_low and ok_high


@dataclass(frozen=True)
class AlertRule:
    """A threshold from the guide's interpretation tables.

    Fires when ``value < below`` or ``value > above``. ``reference_dim`` scales ``below`` by
    ``dim / reference_dim`` (the guide's effective-rank threshold is for 768-dim features).
    ``level_ranges`` gives a target ``(low, high)`` range per level, valid only when the number of
    levels equals ``len(level_ranges)`` (the guide's contribution targets are for 3 levels).
    """

    message: str
    below: float | None = None
    above: float | None = None
    reference_dim: int | None = None
    level_ranges: tuple[tuple[float, float], ...] = ()

    def bounds(
        self, *, level: int | None = None, num_hierarchies: int | None = None, dim: int | None = None
    ) -> Bounds:
        """``(low, high)`` outside which the rule fires, or ``None`` where it does not apply."""
        if self.level_ranges:
            if level is None or num_hierarchies != len(self.level_ranges) or level >= len(self.level_ranges):
                return None
            return self.level_ranges[level]
        below = self.below
        if below is not None and self.reference_dim is not None:
            if dim is None:
                return None
            below = below * dim / self.reference_dim
        return below, self.above

    def fires(
        self,
        value: float,
        *,
        level: int | None = None,
        num_hierarchies: int | None = None,
        dim: int | None = None,
    ) -> bool:
        """Whether ``value`` crosses the rule (NaN never fires; it is reported as non-finite instead)."""
        return outside(value, self.bounds(level=level, num_hierarchies=num_hierarchies, dim=dim))

    def recovered(
        self,
        value: float,
        *,
        level: int | None = None,
        num_hierarchies: int | None = None,
        dim: int | None = None,
        margin: float = 0.05,
    ) -> bool:
        """Back inside the healthy range by ``margin`` of each bound's size (hysteresis), so a value
        hovering at a threshold does not fire on every other step. NaN never counts as recovered."""
        return inside(value, self.bounds(level=level, num_hierarchies=num_hierarchies, dim=dim), margin)

    def describe(self, *, level: int | None = None, dim: int | None = None) -> str:
        """The rule in words; with ``level`` (and ``dim`` for rules that scale with D), the threshold
        in force for that level and width, as an alert must show it."""
        if self.level_ranges:
            if level is not None and level < len(self.level_ranges):
                lo, hi = self.level_ranges[level]
                return f"outside {lo:g}-{hi:g} (h{level} of {len(self.level_ranges)} levels): {self.message}"
            ranges = ", ".join(f"h{i}: {lo:g}-{hi:g}" for i, (lo, hi) in enumerate(self.level_ranges))
            return f"outside {ranges} (for {len(self.level_ranges)} levels): {self.message}"
        parts = []
        if self.below is not None:
            if self.reference_dim is not None and dim is not None:
                scaled = self.below * dim / self.reference_dim
                reference = f"{self.below:g} at D={self.reference_dim}"
                parts.append(f"< {scaled:.3g} (for {dim}-dim features: {reference})")
            elif self.reference_dim is not None:
                parts.append(f"< {self.below:g} (for {self.reference_dim}-dim features; scales with D)")
            else:
                parts.append(f"< {self.below:g}")
        if self.above is not None:
            parts.append(f"> {self.above:g}")
        return f"{' or '.join(parts)}: {self.message}"


@dataclass(frozen=True)
class TagSpec:
    """One tag template and everything the project knows about it."""

    template: str
    group: str
    unit: str
    meaning: str
    category: str | None = None
    chart: str | None = None
    layout_levels: tuple[int, ...] | None = None
    alert: AlertRule | None = None
    defaults: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    formula: str = ""
    healthy: str = ""
    cuda_only: bool = False  # measured on CUDA devices only: no chart for it on a CPU run

    @property
    def validated(self) -> bool:
        """Whether validation logs this tag too (under its own prefix, ``val/``)."""
        return self.group in VALIDATION_GROUPS

    @property
    def per_level(self) -> bool:
        return "{level}" in self.template

    @property
    def placeholder(self) -> str | None:
        """The non-level placeholder name, if any (``module``, ``group``, ``param``)."""
        names = [n for _, n, _, _ in string.Formatter().parse(self.template) if n and n != "level"]
        return names[0] if names else None

    def expand(self, num_hierarchies: int) -> list[str]:
        """Concrete tags for ``num_hierarchies`` levels and the placeholder's default names."""
        levels = range(num_hierarchies) if self.per_level else [None]
        names = self.defaults if self.placeholder else (None,)
        out = []
        for level in levels:
            for name in names:
                kwargs: dict[str, object] = {}
                if level is not None:
                    kwargs["level"] = level
                if name is not None and self.placeholder:
                    kwargs[self.placeholder] = name
                out.append(self.template.format(**kwargs))
        return out

    def in_layout(self, level: int | None) -> bool:
        if self.category is None:
            return False
        return level is None or self.layout_levels is None or level in self.layout_levels

    @property
    def pattern(self) -> re.Pattern[str]:
        return _template_pattern(self.template)


@cache
def _template_pattern(template: str) -> re.Pattern[str]:
    regex = ""
    for literal, name, _, _ in string.Formatter().parse(template):
        regex += re.escape(literal)
        if name == "level":
            regex += r"(?P<level>\d+)"
        elif name:
            regex += rf"(?P<{name}>.+?)"
    return re.compile(regex + "$")


# the groups that ``HJEPAMetricsLogger.validation`` logs
VALIDATION_GROUPS = ("prediction", "collapse")

_COLLAPSE = "collapse! (increase LR, reduce EMA momentum, check augmentation and masking)"
_LEVEL_SCALE = "Level {level} ({scale})"

REGISTRY: tuple[TagSpec, ...] = (
    # --- losses
    TagSpec(
        "loss/total",
        "losses",
        "loss",
        "Weighted sum of all hierarchy losses; should decrease",
        "Loss Metrics",
        "Hierarchical Losses",
        formula="loss_dict['loss'] (Σ w_i·loss_h{i} plus any other terms)",
    ),
    TagSpec(
        "loss/h{level}",
        "losses",
        "loss",
        "Prediction loss of level {level} (unweighted); finest is h0, coarser levels decrease slightly",
        "Loss Metrics",
        "Hierarchical Losses",
        formula="loss_dict['loss_h{level}']",
    ),
    TagSpec(
        "loss/unweighted",
        "losses",
        "loss",
        "Unweighted loss (given, or the mean of the level losses)",
        "Loss Metrics",
        "Hierarchical Losses",
        formula="loss_dict['loss_unweighted'], else mean_i loss_h{i}",
    ),
    TagSpec(
        "loss/contribution_h{level}",
        "losses",
        "%",
        "Share of level {level} in the weighted hierarchical loss (shares sum to 100)",
        "Loss Metrics",
        "Loss Contributions",
        alert=AlertRule(
            "imbalanced levels: adjust loss.hierarchy_weights",
            level_ranges=((50.0, 70.0), (25.0, 40.0), (5.0, 15.0)),
        ),
        formula="100·w_l·loss_h{level} / Σ_j w_j·loss_h{j}",
    ),
    # --- EMA
    TagSpec(
        "ema/momentum_current",
        "ema",
        "momentum",
        "EMA momentum in use; scheduled 0.996 -> 1.0",
        "EMA Dynamics",
        formula="input",
    ),
    TagSpec(
        "ema/momentum_target",
        "ema",
        "momentum",
        "Final EMA momentum of the schedule",
        "EMA Dynamics",
        formula="input",
    ),
    TagSpec(
        "ema/avg_parameter_divergence",
        "ema",
        "L2 distance",
        "Mean L2 distance between target and context parameter tensors; should increase initially",
        "EMA Dynamics",
        aliases=("ema/parameter_divergence",),
        formula="mean over tensors of ‖θ_target − θ_context‖₂ (matched by name)",
    ),
    TagSpec(
        "ema/weight_magnitude_ratio",
        "ema",
        "ratio",
        "Global weight norm of target over context encoder",
        "EMA Dynamics",
        alert=AlertRule(
            "target and context weights drifted apart (target ~0.95-1.05)", below=0.95, above=1.05
        ),
        formula="‖θ_target‖₂ / ‖θ_context‖₂ (global norms)",
    ),
    # --- collapse
    TagSpec(
        "collapse/level{level}_mean_std_per_dim",
        "collapse",
        "std",
        "Mean per-dimension std of L2-normalized features (at most 1/sqrt(D))",
        "Collapse Monitoring",
        _LEVEL_SCALE,
        alert=AlertRule(_COLLAPSE, below=0.01),
        aliases=("collapse/mean_std_per_dim",),
        formula="mean_d std_d(û), û = rows / ‖row‖ (unbiased std)",
    ),
    TagSpec(
        "collapse/level{level}_min_std_per_dim",
        "collapse",
        "std",
        "Minimum per-dimension std of L2-normalized features",
        alert=AlertRule(_COLLAPSE, below=0.001),
        aliases=("collapse/min_std_per_dim",),
        formula="min_d std_d(û)",
    ),
    TagSpec(
        "collapse/level{level}_effective_rank",
        "collapse",
        "rank",
        "Roy-Vetterli effective rank of the centered normalized features (1..D)",
        "Collapse Monitoring",
        _LEVEL_SCALE,
        alert=AlertRule("dimensional collapse", below=100.0, reference_dim=768),
        aliases=("collapse/effective_rank",),
        formula="exp(−Σ p_k log p_k), p = σ/Σσ, σ² = eig(Ûcᵀ Ûc) in float64, Ûc centered",
    ),
    TagSpec(
        "collapse/level{level}_spectrum_alpha",
        "collapse",
        "exponent",
        "Power-law decay exponent of the level {level} feature spectrum (the eigenvalues behind the "
        "effective rank); large: the spectrum collapses onto few directions",
        formula="−slope of the least-squares fit of log λ_i on log i over the eigenvalues λ_1 ≥ … ≥ λ_k "
        "of the centered covariance of the unit rows above the effective rank's rounding tolerance; NaN "
        "for k < 3",
        healthy="near 1 (the range reported for good self-supervised representations)",
    ),
    TagSpec(
        "collapse/level{level}_spectrum",
        "collapse",
        "log10(λ/λ₁)",
        "Histogram of the level {level} feature spectrum, log10(λ_i/λ₁), every spectrum_every calls "
        "(a histogram, not a scalar)",
        formula="log10 of the eigenvalues behind the effective rank over the largest, those above the "
        "rounding tolerance",
    ),
    TagSpec(
        "collapse/level{level}_embedding",
        "collapse",
        "rows",
        "A sample of the level {level} features for the backends' embedding projectors, from "
        "log_embedding (rows, not a scalar)",
        formula="at most max_rows rows [n, D] chosen by the max_similarity sampler, with one label per row",
    ),
    TagSpec(
        "collapse/level{level}_pca",
        "collapse",
        "image",
        "The level {level} embedding sample on the two principal axes of all rows, from log_embedding "
        "(an image, not a scalar); one tight cluster or a line: collapse",
        formula="(û_i − mean û) · v_k, v_1, v_2 the top eigenvectors of the centered Gram of the unit rows",
    ),
    TagSpec(
        "collapse/level{level}_feature_dim",
        "collapse",
        "dims",
        "Width D of the level {level} features (the effective-rank threshold scales with it)",
        formula="D",
    ),
    TagSpec(
        "collapse/level{level}_mean_similarity",
        "collapse",
        "cosine",
        "Exact mean cosine similarity over all distinct pairs of features",
        "Collapse Monitoring",
        _LEVEL_SCALE,
        alert=AlertRule("concerning: features align", above=0.7),
        aliases=("collapse/mean_similarity",),
        formula="(‖Σû‖² − Σ‖û‖²) / (M(M−1))",
    ),
    TagSpec(
        "collapse/level{level}_std_similarity",
        "collapse",
        "cosine",
        "Exact std (unbiased) of the cosine similarity over all distinct pairs",
        aliases=("collapse/std_similarity",),
        formula="unbiased std of û_i·û_j over i<j, from ‖ÛᵀÛ‖²_F − Σ‖û‖⁴",
    ),
    TagSpec(
        "collapse/level{level}_max_similarity",
        "collapse",
        "cosine",
        "Max cosine similarity over distinct pairs of a seeded sample of at most 1024 features",
        aliases=("collapse/max_similarity",),
        formula="max_{i≠j} û_i·û_j over a seeded sample of ≤ 1024 rows",
    ),
    # --- prediction
    TagSpec(
        "prediction/level{level}_cosine_sim_mean",
        "prediction",
        "cosine",
        "Mean cosine similarity of predicted to target tokens; target > 0.7",
        "Prediction Quality",
        "Level {level} Similarity",
        alert=AlertRule("predictions do not match targets", below=0.7),
        aliases=("prediction/levelX_cosine_sim_mean",),
        formula="mean over tokens of cos(p, t)",
    ),
    TagSpec(
        "prediction/level{level}_cosine_sim_std",
        "prediction",
        "cosine",
        "Std of the token cosine similarity (diversity of prediction quality); target > 0.1",
        "Prediction Quality",
        "Level {level} Similarity",
        aliases=("prediction/levelX_cosine_sim_std",),
        formula="unbiased std over tokens of cos(p, t)",
    ),
    TagSpec(
        "prediction/level{level}_cosine_sim_min",
        "prediction",
        "cosine",
        "Worst token cosine similarity",
        "Prediction Quality",
        "Level {level} Similarity",
        layout_levels=(0,),
        formula="min over tokens of cos(p, t)",
    ),
    TagSpec(
        "prediction/level{level}_cosine_sim_max",
        "prediction",
        "cosine",
        "Best token cosine similarity",
        "Prediction Quality",
        "Level {level} Similarity",
        layout_levels=(0,),
        formula="max over tokens of cos(p, t)",
    ),
    TagSpec(
        "prediction/level{level}_normalized_mse",
        "prediction",
        "squared distance",
        "Mean squared distance of L2-normalized prediction and target per token (0..4); decreasing",
        aliases=("prediction/levelX_normalized_mse",),
        formula="mean over tokens of ‖p/‖p‖ − t/‖t‖‖² = 2(1 − cos)",
    ),
    TagSpec(
        "prediction/level{level}_l2_distance",
        "prediction",
        "L2 distance",
        "Mean L2 distance between raw predicted and target tokens",
        formula="mean over tokens of ‖p − t‖₂",
    ),
    # --- gradient flow and clipping
    TagSpec(
        "gradient_flow/global_norm",
        "gradient_flow",
        "L2 norm",
        "Global L2 norm of all gradients (as clip_grad_norm_ returns); should decrease over training",
        "Gradient Flow",
        formula="sqrt(Σ_t ‖g_t‖²)",
    ),
    TagSpec(
        "gradient_flow/{module}_mean",
        "gradient_flow",
        "abs(grad)",
        "Mean absolute gradient over the parameters of top-level module {module}",
        "Gradient Flow",
        defaults=("context_encoder", "predictor"),
        formula="Σ|g| / numel over the module's parameters",
    ),
    TagSpec(
        "gradient_flow/{module}_max",
        "gradient_flow",
        "abs(grad)",
        "Max absolute gradient over the parameters of top-level module {module}",
        defaults=("context_encoder", "predictor"),
        formula="max |g| over the module's parameters",
    ),
    TagSpec(
        "gradients/{param}_mean",
        "gradient_flow",
        "abs(grad)",
        "Mean absolute gradient of tensor {param} (opt-in)",
        formula="mean |g| of the tensor",
    ),
    TagSpec(
        "gradients/{param}_max",
        "gradient_flow",
        "abs(grad)",
        "Max absolute gradient of tensor {param} (opt-in)",
        formula="max |g| of the tensor",
    ),
    TagSpec(
        "gradient/global_norm_before_clip",
        "gradient_clipping",
        "L2 norm",
        "Gradient norm before clipping; stable",
        "Gradient Flow",
        formula="input (clip_grad_norm_'s return value)",
    ),
    TagSpec(
        "gradient/global_norm_after_clip",
        "gradient_clipping",
        "L2 norm",
        "Gradient norm after clipping (= clipping ratio * before)",
        "Gradient Flow",
        formula="input",
    ),
    TagSpec(
        "gradient/was_clipped",
        "gradient_clipping",
        "0/1",
        "1 when this step's norm exceeded the threshold",
        formula="1 if before > threshold else 0",
    ),
    TagSpec(
        "gradient/clipping_ratio",
        "gradient_clipping",
        "ratio",
        "Norm after clipping over norm before",
        formula="after / before (0 when before = 0)",
    ),
    TagSpec(
        "gradient/clipping_percentage",
        "gradient_clipping",
        "%",
        "Share of logged steps where clipping applied; < 10% is good",
        "Gradient Flow",
        alert=AlertRule("learning rate too high", above=50.0),
        formula="100 · clipped calls / calls",
        healthy="< 10 %",
    ),
    # --- learning rate
    TagSpec(
        "learning_rate/base_lr",
        "learning_rate",
        "lr",
        "Learning rate of param group 0 (is it decaying?)",
        "Learning Dynamics",
        formula="optimizer.param_groups[0]['lr']",
    ),
    TagSpec(
        "learning_rate/param_group_{group}",
        "learning_rate",
        "lr",
        "Learning rate of param group {group}",
        defaults=("0",),
        formula="optimizer.param_groups[{group}]['lr']",
    ),
    # --- stability
    TagSpec(
        "stability/loss_smoothness",
        "stability",
        "loss",
        "Population std of the last 50 losses",
        "Learning Dynamics",
        formula="population std of the last 50 finite losses",
    ),
    TagSpec(
        "stability/loss_trend_slope",
        "stability",
        "loss/step",
        "Least-squares slope of the last 20 losses (negative = improving)",
        "Learning Dynamics",
        formula="least-squares slope of the last 20 finite losses (≥ 5)",
    ),
    TagSpec(
        "stability/loss_spike_ratio",
        "stability",
        "ratio",
        "Max over min loss in the history",
        "Learning Dynamics",
        formula="max / min of the finite losses (min > 0)",
    ),
    TagSpec(
        "stability/nonfinite_count",
        "stability",
        "count",
        "Non-finite losses skipped in the history",
        formula="count of NaN/inf in the history",
    ),
    # --- performance
    TagSpec(
        "performance/forward_time_ms",
        "performance",
        "ms",
        "Forward pass time",
        "Performance",
        formula="1000 · forward seconds",
    ),
    TagSpec(
        "performance/backward_time_ms",
        "performance",
        "ms",
        "Backward pass time",
        "Performance",
        formula="1000 · backward seconds",
    ),
    TagSpec(
        "performance/total_time_ms",
        "performance",
        "ms",
        "Forward plus backward time",
        formula="1000 · (forward + backward)",
    ),
    TagSpec(
        "performance/samples_per_second",
        "performance",
        "samples/s",
        "Training throughput",
        "Performance",
        formula="batch_size / (forward + backward)",
    ),
    TagSpec(
        "performance/forward_backward_ratio",
        "performance",
        "ratio",
        "Forward time over backward time",
        formula="forward / backward",
    ),
    TagSpec(
        "performance/gpu_memory_allocated_gb",
        "performance",
        "GB",
        "CUDA memory allocated by tensors",
        "Performance",
        formula="torch.cuda.memory_allocated / 1e9",
        cuda_only=True,
    ),
    TagSpec(
        "performance/gpu_memory_reserved_gb",
        "performance",
        "GB",
        "CUDA memory reserved by the allocator",
        formula="torch.cuda.memory_reserved / 1e9",
        cuda_only=True,
    ),
    TagSpec(
        "performance/peak_memory_gb",
        "performance",
        "GB",
        "Peak CUDA memory allocated",
        formula="torch.cuda.max_memory_allocated / 1e9",
        cuda_only=True,
    ),
    # --- hierarchy
    TagSpec(
        "hierarchy/level{level}_feat_mean",
        "hierarchy",
        "feature",
        "Mean of the level {level} predictions",
        "Hierarchy Structure",
        formula="mean of all elements of pred[l]",
    ),
    TagSpec(
        "hierarchy/level{level}_feat_std",
        "hierarchy",
        "feature",
        "Std of the level {level} predictions (is feature variance sufficient?)",
        "Hierarchy Structure",
        layout_levels=(0,),
        formula="unbiased std of all elements of pred[l]",
    ),
    TagSpec(
        "hierarchy/level{level}_feat_range",
        "hierarchy",
        "feature",
        "Max minus min of the level {level} predictions",
        formula="max − min of pred[l]",
    ),
    TagSpec(
        "hierarchy/level{level}_feat_norm",
        "hierarchy",
        "L2 norm",
        "Mean token L2 norm of the level {level} predictions",
        formula="mean over tokens of ‖pred[l]‖₂",
    ),
    TagSpec(
        "hierarchy/level{level}_num_patches",
        "hierarchy",
        "tokens",
        "Predicted tokens at level {level} (coarser levels have fewer)",
        "Hierarchy Structure",
        formula="N_l (second-to-last dim of pred[l])",
    ),
    # --- input health
    TagSpec(
        "health/loss_nonfinite",
        "health",
        "count",
        "Non-finite values among the logged losses",
        alert=AlertRule("non-finite loss", above=0.0),
        formula="count of NaN/inf among the loss values",
    ),
    TagSpec(
        "health/prediction_level{level}_nonfinite",
        "health",
        "tokens",
        "Level {level} tokens whose prediction or target has a non-finite element, or whose cosine or "
        "distance overflows float32 (their statistics are NaN/inf)",
        alert=AlertRule("non-finite predictions or targets", above=0.0),
        formula="tokens with a NaN/inf in p or t",
    ),
    TagSpec(
        "health/collapse_level{level}_nonfinite",
        "health",
        "rows",
        "Level {level} feature rows with a non-finite element (the collapse statistics are NaN)",
        alert=AlertRule("non-finite features", above=0.0),
        formula="rows with a NaN/inf",
    ),
    TagSpec(
        "health/gradient_nonfinite_tensors",
        "health",
        "tensors",
        "Parameter tensors whose gradient has a non-finite element or a norm beyond float32's range",
        alert=AlertRule("non-finite gradients", above=0.0),
        formula="tensors whose ‖g‖ is NaN/inf",
    ),
    TagSpec(
        "health/hierarchy_level{level}_nonfinite",
        "health",
        "tokens",
        "Level {level} predicted tokens with a non-finite element or an L2 norm beyond float32's range",
        alert=AlertRule("non-finite predicted features", above=0.0),
        formula="tokens whose ‖pred[l]‖ is NaN/inf",
    ),
    TagSpec(
        "health/ema_nonfinite_tensors",
        "health",
        "tensors",
        "Parameter tensors of either encoder (or their difference) whose L2 norm is NaN/inf",
        alert=AlertRule("non-finite EMA parameters", above=0.0),
        formula="tensors whose ‖θ_t‖, ‖θ_c‖ or ‖θ_t − θ_c‖ is NaN/inf",
    ),
    # --- masking
    TagSpec(
        "masking/mask_ratio",
        "masking",
        "ratio",
        "Fraction of patches masked (predicted)",
        "Masking",
        formula="mean_b Σ_n mask[b, n] / num_patches (K blocks OR-ed)",
    ),
    TagSpec(
        "masking/num_masked_patches",
        "masking",
        "patches",
        "Mean masked patches per sample",
        "Masking",
        formula="mean_b Σ_n mask[b, n]",
    ),
    TagSpec(
        "masking/num_unmasked_patches",
        "masking",
        "patches",
        "Mean visible patches per sample",
        "Masking",
        formula="num_patches − num_masked_patches",
    ),
    # --- media (the guide's "Advanced" section): histograms and images, not scalars
    TagSpec(
        "feature_distributions/level{level}",
        "media",
        "histogram",
        "Distribution of the level-{level} predicted feature values",
        formula="histogram of pred[l] (non-finite values dropped)",
    ),
    TagSpec(
        "patches/{image}",
        "media",
        "image",
        "A per-patch visualization ({image}): image, prediction cosine and mask",
        defaults=("detailed_analysis",),
        formula="a matplotlib figure or an HW/CHW/HWC array",
    ),
)

GROUPS = tuple(dict.fromkeys(spec.group for spec in REGISTRY))
# the tags a report's summary sentences are read from
TOTAL_LOSS = "loss/total"
CLIPPING_SHARE = "gradient/clipping_percentage"


def tags(num_hierarchies: int = 3) -> list[str]:
    """Every concrete tag (no ``train/`` prefix) for ``num_hierarchies`` levels, in registry order."""
    if num_hierarchies < 1:
        raise ValueError(f"num_hierarchies: got {num_hierarchies}; expected >= 1")
    return [tag for spec in REGISTRY for tag in spec.expand(num_hierarchies)]


@dataclass(frozen=True)
class TagMatch:
    spec: TagSpec
    level: int | None
    name: str | None


def lookup(tag: str) -> TagMatch | None:
    """The spec of a concrete tag (prefix such as ``train/`` allowed), or ``None`` if unknown.

    >>> lookup("val/collapse/level2_effective_rank").level
    2
    """
    return _lookup_full(tag)


@lru_cache(maxsize=1 << 16)  # every logged value is looked up (alerts): a tag is parsed once
def _lookup_full(tag: str) -> TagMatch | None:
    return _lookup(strip_prefix(tag))


@cache
def _lookup(tag: str) -> TagMatch | None:
    for spec in REGISTRY:
        m = spec.pattern.match(tag)
        if m:
            groups = m.groupdict()
            level = int(groups.pop("level")) if "level" in groups else None
            name = next(iter(groups.values()), None)
            return TagMatch(spec, level, name)
    return None


def any_cuda_only(tags: Iterable[str]) -> bool:
    """Whether any of ``tags`` is measured on CUDA devices only (a run that has them ran on CUDA)."""
    return any((m := lookup(t)) is not None and m.spec.cuda_only for t in tags)


def strip_prefix(tag: str) -> str:
    """``train/loss/total`` → ``loss/total``: drop leading components until a known group root remains."""
    parts = tag.split("/")
    for i in range(len(parts)):
        if parts[i] in _ROOTS:
            return "/".join(parts[i:])
    return tag


_ROOTS = frozenset(spec.template.split("/", 1)[0] for spec in REGISTRY)


def canonical(name: str, level: int = 0) -> str:
    """Map a name the guide uses without a level (``collapse/mean_std_per_dim``) to its concrete tag.

    >>> canonical("collapse/effective_rank", level=1)
    'collapse/level1_effective_rank'
    """
    for spec in REGISTRY:
        if name in spec.aliases:
            return spec.template.format(level=level) if spec.per_level else spec.template
    if lookup(name) is None:
        raise KeyError(f"unknown tag {name!r}; see `hjepa-metrics tags`")
    return name


def summary_kinds(num_hierarchies: int = 3, prefix: str = "train/") -> dict[str, str]:
    """Which extreme of each tag matters, for trackers' run summaries (W&B's ``define_metric``):
    ``min`` for losses and for tags alerting when low, ``max`` for tags alerting when high."""
    out: dict[str, str] = {}
    for spec in REGISTRY:
        rule = spec.alert
        if spec.group == "losses" and spec.unit == "loss":
            kind = "min"
        elif rule is not None and not rule.level_ranges and (rule.below is None) != (rule.above is None):
            kind = "min" if rule.below is not None else "max"
        else:
            continue
        out.update({prefix + tag: kind for tag in spec.expand(num_hierarchies)})
    return out


def specs_by_category() -> Mapping[str, list[TagSpec]]:
    """Layout categories in the guide's order, each with its specs in registry order."""
    out: dict[str, list[TagSpec]] = {c: [] for c in CATEGORIES}
    for spec in REGISTRY:
        if spec.category is not None:
            out[spec.category].append(spec)
    return out
