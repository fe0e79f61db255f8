"""Prediction quality per level: ``prediction/level{l}_*``."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ._tensor import ArrayLike, accumulate_dtype, as_features, compute_dtype, level_list, to_host

log = logging.getLogger(__name__)

EPS = 1e-8


def token_cosine(pred: torch.Tensor, targ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cosine and ``‖n̂(pred) − n̂(targ)‖²`` for ``[..., D]`` inputs (flattened to tokens)."""
    dtype = compute_dtype(pred) if pred.dtype == targ.dtype else torch.float32
    p = pred.reshape(-1, pred.shape[-1]).to(dtype)
    t = targ.reshape(-1, targ.shape[-1]).to(dtype)
    p_norm = torch.linalg.vector_norm(p, dim=-1).clamp_min(EPS)
    t_norm = torch.linalg.vector_norm(t, dim=-1).clamp_min(EPS)
    cos = ((p * t).sum(dim=-1) / (p_norm * t_norm)).clamp(-1.0, 1.0)
    # ‖a/|a| − b/|b|‖² expanded; exact also for the clamped zero vectors, without a [T, D] temporary.
    p_unit_sq = (torch.linalg.vector_norm(p, dim=-1) / p_norm) ** 2
    t_unit_sq = (torch.linalg.vector_norm(t, dim=-1) / t_norm) ** 2
    nmse = (p_unit_sq + t_unit_sq - 2.0 * cos).clamp_min(0.0)
    return cos, nmse


def prediction_quality(
    predictions: ArrayLike | Sequence[ArrayLike],
    targets: ArrayLike | Sequence[ArrayLike],
) -> dict[str, float]:
    """Cosine statistics, normalized MSE and L2 distance between predicted and target tokens per level.

    ``predictions[l]`` and ``targets[l]`` are ``[B, N_l, D]`` (any leading dims; the last is the
    feature dim). Statistics are over all tokens of a level: ``cosine_sim_{mean,std,min,max}``
    (std unbiased), ``normalized_mse`` = mean ``‖n̂(p) − n̂(t)‖²`` in [0, 4], ``l2_distance`` = mean
    ``‖p − t‖`` on raw features. Empty levels are skipped with a warning.
    """
    preds = level_list(predictions, "predictions")
    targs = level_list(targets, "targets")
    if len(preds) != len(targs):
        raise ValueError(
            f"predictions has {len(preds)} levels but targets has {len(targs)}; expected equal counts"
        )
    raw: dict[str, torch.Tensor | float] = {}
    for level, (p_in, t_in) in enumerate(zip(preds, targs, strict=True)):
        p = as_features(p_in, f"predictions[{level}]")
        t = as_features(t_in, f"targets[{level}]")
        if p.shape != t.shape:
            raise ValueError(
                f"predictions[{level}] has shape {tuple(p.shape)} but targets[{level}] has {tuple(t.shape)}; "
                "expected equal shapes"
            )
        if p.numel() == 0:
            log.warning("prediction_quality: level %d is empty (shape %s); skipped", level, tuple(p.shape))
            continue
        if t.device != p.device:
            t = t.to(p.device)
        cos, nmse = token_cosine(p, t)
        dist = torch.linalg.vector_norm(
            p.reshape(-1, p.shape[-1]).to(cos.dtype) - t.reshape(-1, t.shape[-1]).to(cos.dtype), dim=-1
        )
        acc = accumulate_dtype(cos.device)
        tag = f"prediction/level{level}_"
        raw[tag + "cosine_sim_mean"] = cos.to(acc).mean()
        raw[tag + "cosine_sim_std"] = cos.to(acc).std() if cos.numel() > 1 else float("nan")
        raw[tag + "cosine_sim_min"] = cos.min()
        raw[tag + "cosine_sim_max"] = cos.max()
        raw[tag + "normalized_mse"] = nmse.to(acc).mean()
        raw[tag + "l2_distance"] = dist.to(acc).mean()
    return to_host(raw)
