"""EMA teacher dynamics: ``ema/*``."""

from __future__ import annotations

import torch

from ._params import NamedTensors, foreach_norms, named_tensors
from ._tensor import Scalar, accumulate_dtype, scalar_tensor, to_host


def ema_dynamics(
    context_encoder: NamedTensors,
    target_encoder: NamedTensors,
    current_momentum: Scalar,
    target_momentum: Scalar,
) -> dict[str, float]:
    """Momentum values, mean parameter distance and global weight-norm ratio of target vs context.

    Encoders are modules, ``named_parameters()`` or name → tensor mappings; parameters are matched by
    name (DDP/compile prefixes stripped) and a name or shape mismatch is an error.
    ``avg_parameter_divergence`` = mean over tensors of ``‖θ_target − θ_context‖``;
    ``weight_magnitude_ratio`` = ``‖θ_target‖ / ‖θ_context‖`` (global L2 norms).
    ``health/ema_nonfinite_tensors`` counts parameter tensors whose norms are not finite (a NaN/inf
    element, or a norm that overflows the parameters' dtype).
    """
    context = dict(named_tensors(context_encoder, "context_encoder"))
    target = dict(named_tensors(target_encoder, "target_encoder"))
    if context.keys() != target.keys():
        missing = sorted(context.keys() - target.keys())
        extra = sorted(target.keys() - context.keys())
        raise ValueError(
            "context_encoder and target_encoder have different parameter names: "
            f"only in context_encoder {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"only in target_encoder {extra[:5]}{'...' if len(extra) > 5 else ''}; expected the same names"
        )
    raw: dict[str, torch.Tensor | float] = {
        "ema/momentum_current": scalar_tensor(current_momentum, "current_momentum"),
        "ema/momentum_target": scalar_tensor(target_momentum, "target_momentum"),
    }
    names = list(context)
    if names:
        ctx = [context[n].detach() for n in names]
        tgt = [target[n].detach() for n in names]
        for n, c, t in zip(names, ctx, tgt, strict=True):
            if c.shape != t.shape:
                raise ValueError(
                    f"parameter {n!r}: context_encoder shape {tuple(c.shape)} but target_encoder "
                    f"{tuple(t.shape)}; expected equal shapes"
                )
        tgt = [t.to(device=c.device, dtype=c.dtype) for c, t in zip(ctx, tgt, strict=True)]
        diff = foreach_norms(list(torch._foreach_sub(tgt, ctx)), 2.0)
        acc = accumulate_dtype(diff.device)
        ctx_norms = foreach_norms(ctx, 2.0)
        tgt_norms = foreach_norms(tgt, 2.0)
        raw["ema/avg_parameter_divergence"] = diff.to(acc).mean()
        raw["ema/weight_magnitude_ratio"] = (
            tgt_norms.to(acc).square().sum().sqrt() / ctx_norms.to(acc).square().sum().sqrt()
        )
        finite = torch.isfinite(diff) & torch.isfinite(ctx_norms) & torch.isfinite(tgt_norms)
        raw["health/ema_nonfinite_tensors"] = (~finite).sum()
    return to_host(raw)
