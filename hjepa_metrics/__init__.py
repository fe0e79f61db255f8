"""Training-health metrics for hierarchical JEPA, from the "TensorBoard Integration Guide for H-JEPA".

Pure functions take tensors (any device and dtype) or numpy arrays and return ``dict[str, float]``
keyed by the guide's tag without the ``train/``/``val/`` prefix.
"""

from __future__ import annotations

from . import registry
from .collapse import collapse_metrics
from .ema import ema_dynamics
from .gradients import gradient_clipping, gradient_flow
from .hierarchy import hierarchy_feature_stats
from .learning_rate import learning_rate
from .logger import HJEPAMetricsLogger, HJEPATensorBoardLogger
from .losses import hierarchical_losses
from .masking import masking_statistics
from .performance import cuda_memory_metrics, performance_metrics, timed
from .prediction import prediction_quality
from .registry import tags
from .stability import training_stability
from .training_step import log_training_step
from .validation import ValidationAccumulator, sampler_valid_mask

__version__ = "0.1.0"

__all__ = [
    "HJEPAMetricsLogger",
    "HJEPATensorBoardLogger",
    "ValidationAccumulator",
    "__version__",
    "collapse_metrics",
    "cuda_memory_metrics",
    "ema_dynamics",
    "gradient_clipping",
    "gradient_flow",
    "hierarchical_losses",
    "hierarchy_feature_stats",
    "learning_rate",
    "log_training_step",
    "masking_statistics",
    "performance_metrics",
    "prediction_quality",
    "registry",
    "sampler_valid_mask",
    "tags",
    "timed",
    "training_stability",
]
