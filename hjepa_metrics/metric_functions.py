"""The eleven pure metric functions in one namespace (the logger's view of the metric modules)."""

from __future__ import annotations

from .collapse import collapse_metrics
from .ema import ema_dynamics
from .gradients import gradient_clipping, gradient_flow
from .hierarchy import hierarchy_feature_stats
from .learning_rate import learning_rate
from .losses import hierarchical_losses
from .masking import masking_statistics
from .performance import performance_metrics
from .prediction import prediction_quality
from .stability import training_stability

__all__ = [
    "collapse_metrics",
    "ema_dynamics",
    "gradient_clipping",
    "gradient_flow",
    "hierarchical_losses",
    "hierarchy_feature_stats",
    "learning_rate",
    "masking_statistics",
    "performance_metrics",
    "prediction_quality",
    "training_stability",
]
