"""Gradient flow (``gradient_flow/*``, ``gradients/*``) and clipping (``gradient/*``)."""

from __future__ import annotations

import math

import torch

from ._params import NamedTensors, foreach_norms, named_tensors
from ._tensor import Scalar, accumulate_dtype, scalar_tensor, to_host
from .accumulator import RankLocal, RawValues


def gradient_flow(
    model: NamedTensors,
    *,
    per_parameter: bool = False,
) -> dict[str, float]:
    """Global L2 gradient norm and ``|g|`` mean/max per top-level module (and per tensor if asked).

    ``model`` is an ``nn.Module``, ``named_parameters()`` or a mapping name → parameter; tensors
    without ``.grad`` are skipped. ``global_norm = sqrt(Σ_t ‖g_t‖²)`` is what ``clip_grad_norm_``
    returns. Module names are the first component of the parameter name after DDP's ``module.`` and
    compile's ``_orig_mod.`` prefixes. Foreach kernels, one host transfer.
    """
    # empty gradients add nothing to any statistic (and have no max)
    named = [(n, p.grad) for n, p in named_tensors(model, "model") if p.grad is not None and p.grad.numel()]
    if not named:
        return {}
    grads = [g.detach() for _, g in named]
    l1 = foreach_norms(grads, 1.0)
    l2 = foreach_norms(grads, 2.0)
    linf = foreach_norms(grads, math.inf)
    device = l1.device
    acc = accumulate_dtype(device)
    numels = torch.tensor([g.numel() for g in grads], dtype=acc, device=device)

    modules: dict[str, int] = {}
    module_of = [modules.setdefault(n.split(".", 1)[0], len(modules)) for n, _ in named]
    index = torch.tensor(module_of, device=device)
    sums = torch.zeros(len(modules), dtype=acc, device=device).index_add_(0, index, l1.to(acc))
    counts = torch.zeros(len(modules), dtype=acc, device=device).index_add_(0, index, numels)
    maxes = torch.zeros(len(modules), dtype=torch.float32, device=device).scatter_reduce_(
        0, index, linf, reduce="amax", include_self=False
    )
    raw: dict[str, torch.Tensor | float] = {
        "gradient_flow/global_norm": l2.to(acc).square().sum().sqrt(),
        "health/gradient_nonfinite_tensors": (~torch.isfinite(l2)).sum(),
    }
    means = sums / counts.clamp_min(1)
    for module, i in modules.items():
        raw[f"gradient_flow/{module}_mean"] = means[i]
        raw[f"gradient_flow/{module}_max"] = maxes[i]
    if per_parameter:
        tensor_means = l1.to(acc) / numels.clamp_min(1)
        for j, (name, _) in enumerate(named):
            raw[f"gradients/{name}_mean"] = tensor_means[j]
            raw[f"gradients/{name}_max"] = linf[j]
    return to_host(raw)


class ClippingAccumulator(RankLocal):
    """Clipping around ``clip_grad_norm_``: this call's norms and flag, and the clipped share of every
    call since construction or :meth:`reset`.

    The norms ``clip_grad_norm_`` returns are already global under DDP and FSDP, so there is no
    cross-rank state to share (:meth:`sync_parts` is empty).
    """

    def __init__(self, *, calls: int = 0, clipped: int = 0) -> None:
        if calls < 0 or not 0 <= clipped <= calls:
            raise ValueError(
                f"prior_clipped/prior_calls: got {clipped}/{calls}; expected 0 <= clipped <= calls"
            )
        self.calls, self.clipped = calls, clipped
        self._last: dict[str, float] = {}

    def update(
        self, global_norm_before: Scalar, global_norm_after: Scalar, clip_threshold: float | None
    ) -> None:
        threshold = math.inf if clip_threshold is None else float(clip_threshold)
        if math.isnan(threshold) or threshold <= 0:
            raise ValueError(f"clip_threshold: got {clip_threshold}; expected a positive number, inf or None")
        norms = to_host(
            {
                "gradient/global_norm_before_clip": scalar_tensor(global_norm_before, "global_norm_before"),
                "gradient/global_norm_after_clip": scalar_tensor(global_norm_after, "global_norm_after"),
            }
        )
        before = norms["gradient/global_norm_before_clip"]
        after = norms["gradient/global_norm_after_clip"]
        clipped = 1.0 if before > threshold else 0.0
        self.calls += 1
        self.clipped += int(clipped)
        # a NaN norm must not read as "nothing was clipped"
        nan = math.isnan(before) or math.isnan(after)
        ratio = math.nan if nan else (after / before if before > 0 else 0.0)
        self._last = {
            **norms,
            "gradient/was_clipped": clipped,
            "gradient/clipping_ratio": ratio,
            "gradient/clipping_percentage": 100.0 * self.clipped / self.calls,
        }

    def reset(self) -> None:
        self.calls = self.clipped = 0

    def compute(self) -> RawValues:
        return dict(self._last)


def gradient_clipping(
    global_norm_before: Scalar,
    global_norm_after: Scalar,
    clip_threshold: float | None,
    *,
    prior_clipped: int = 0,
    prior_calls: int = 0,
) -> dict[str, float]:
    """Norms around ``clip_grad_norm_``, whether this step was clipped, and the clipped share (%).

    ``clip_threshold`` is ``max_norm`` (``None`` or ``inf``: never clipped). ``prior_clipped`` and
    ``prior_calls`` count earlier calls (the logger keeps them); ``clipping_percentage`` includes
    this call: ``100 · (prior_clipped + was_clipped) / (prior_calls + 1)``. ``clipping_ratio`` is
    ``after / before`` (0 when before is 0, NaN when a norm is NaN).
    """
    state = ClippingAccumulator(calls=prior_calls, clipped=prior_clipped)
    state.update(global_norm_before, global_norm_after, clip_threshold)
    return {k: float(v) for k, v in state.compute().items()}
