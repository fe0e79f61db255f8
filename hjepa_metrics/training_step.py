"""Which of the guide's calls a training step's outputs allow, made in one place.

Used by the example trainer and the Lightning callback; a plain loop can call it too::

    log_training_step(logger, global_step=step, loss_dict=loss_dict, mask=mask,
                      predictions=out["predictions"], targets=out["targets"],
                      collapse_features=[out["context_features"][:, 1:]], model=model,
                      grad_norm_before=norm, clip_threshold=1.0, optimizer=optimizer)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._params import NamedTensors
from ._tensor import ArrayLike, Scalar
from .logger import HJEPAMetricsLogger


def log_training_step(
    logger: HJEPAMetricsLogger,
    *,
    global_step: int,
    loss_dict: Mapping[str, Scalar] | None = None,
    current_loss: Scalar | None = None,
    mask: ArrayLike | Sequence[ArrayLike] | None = None,
    num_patches: int | None = None,
    predictions: Sequence[ArrayLike] | None = None,
    targets: Sequence[ArrayLike] | None = None,
    collapse_features: Sequence[ArrayLike] | None = None,
    model: NamedTensors | None = None,
    grad_norm_before: Scalar | None = None,
    grad_norm_after: Scalar | None = None,
    clip_threshold: float | None = None,
    optimizer: Any = None,
    batch_size: int | None = None,
    forward_time: float | None = None,
    backward_time: float | None = None,
    device: torch.device | str | None = None,
    context_encoder: NamedTensors | None = None,
    target_encoder: NamedTensors | None = None,
    momentum: Scalar | None = None,
    target_momentum: Scalar = 1.0,
) -> dict[str, float]:
    """Make every guide call whose inputs are given, at ``global_step``; returns all that was written.

    - ``loss_dict`` → losses, and stability over the logger's history of ``loss_dict["loss"]`` (or
      ``current_loss``); ``mask`` → masking; ``predictions`` + ``targets`` (per level ``[B, N_l, D]``)
      → prediction quality and hierarchy stats; ``collapse_features[l]`` (``[..., D]``, CLS removed) →
      collapse of level ``l``; ``model`` (with ``.grad``) → gradient flow; ``grad_norm_before`` (what
      ``clip_grad_norm_`` returned) → clipping (``after`` defaults to ``min(before, threshold)``);
      ``optimizer`` → learning rates; ``batch_size`` + both times (seconds) → performance;
      ``context_encoder`` + ``target_encoder`` + ``momentum`` → EMA dynamics.
    """
    out: dict[str, float] = {}
    at = global_step
    if loss_dict is not None:
        out.update(logger.log_hierarchical_losses(loss_dict, global_step=at))
        if current_loss is None:
            current_loss = loss_dict.get("loss")
    if current_loss is not None:
        out.update(logger.log_training_stability(current_loss=current_loss, global_step=at))
    if mask is not None:
        out.update(logger.log_masking_statistics(mask, num_patches=num_patches, global_step=at))
    if predictions is not None and targets is not None:
        out.update(logger.log_prediction_quality(predictions, targets, global_step=at))
        out.update(logger.log_hierarchy_feature_stats(predictions, targets, global_step=at))
    for level, features in enumerate(collapse_features or ()):
        out.update(logger.log_collapse_metrics(features, level=level, global_step=at))
    if model is not None:
        out.update(logger.log_gradient_flow(model, global_step=at))
    if grad_norm_before is not None:
        threshold = math.inf if clip_threshold is None else float(clip_threshold)
        if grad_norm_after is None:  # what clip_grad_norm_ leaves: the norm scaled down to the threshold
            grad_norm_after = torch.as_tensor(grad_norm_before).clamp(max=threshold)
        out.update(logger.log_gradient_clipping(grad_norm_before, grad_norm_after, threshold, global_step=at))
    if optimizer is not None:
        out.update(logger.log_learning_rate(optimizer, global_step=at))
    if batch_size is not None and forward_time is not None and backward_time is not None:
        out.update(
            logger.log_performance_metrics(
                batch_size, forward_time, backward_time, device=device, global_step=at
            )
        )
    if context_encoder is not None and target_encoder is not None and momentum is not None:
        out.update(
            logger.log_ema_dynamics(
                context_encoder, target_encoder, momentum, target_momentum, global_step=at
            )
        )
    return out
