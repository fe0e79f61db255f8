"""Gradient flow (``gradient_flow/*``, ``gradients/*``) and clipping (``gradient/*``)."""

from __future__ import annotations

import math

import torch

from ._params import (
    NamedTensors,
    local_part,
    module_of,
    named_tensors,
    network_names,
    refuse_fsdp1,
    shard_norms,
)
from ._tensor import Scalar, accumulate_dtype, scalar_tensor, to_host
from .accumulator import RankLocal, RawValues, slots


class GradientFlowAccumulator:
    """Gradient statistics of a model: the global L2 norm, ``|g|`` mean and max per module (and per
    tensor with ``per_parameter``), from each rank's local gradients.

    Plain gradients (one process, or DDP, where every rank holds the same synchronized gradients)
    and DTensor gradients (FSDP2's ``fully_shard``, tensor parallelism) are both exact: a rank
    contributes the sums of its local shard, divided by how many ranks hold a copy of it (the
    mesh dims with a ``Replicate`` placement; every rank for a plain tensor), so the one summed
    all-reduce of the call gives the statistics of the full gradients, without gathering them.
    Modules are the first ``module_depth`` components of :func:`network_names` of the trainable
    parameters (wrappers and the prefix every one of them shares are dropped). FSDP1's flat
    parameters are refused with a clear error.
    """

    def __init__(self, *, per_parameter: bool = False, module_depth: int = 1) -> None:
        if module_depth < 1:
            raise ValueError(f"module_depth: got {module_depth}; expected >= 1")
        self.per_parameter = per_parameter
        self.module_depth = module_depth
        self.names: list[str] = []
        self.modules: list[str] = []
        self._module_index: list[int] = []
        self._numels: torch.Tensor | None = None  # global element counts, the same on every rank
        self._sums: torch.Tensor | None = None  # [l1 per tensor (T), l2² per tensor (T), non-finite (T)]
        self._max: torch.Tensor | None = None  # [T] max |g| of the local parts
        self._weights: torch.Tensor | None = None  # [T] share of each local part in a sum over ranks

    def update(self, model: NamedTensors) -> None:
        named = named_tensors(model, "model")
        refuse_fsdp1(model, [n for n, _ in named])
        # the network the user trains: frozen parts (an EMA target encoder beside it) do not count
        trained = [(n, p) for n, p in named if p.requires_grad or p.grad is not None]
        clean = network_names([n for n, _ in trained])
        kept = [(c, p.grad) for c, (_, p) in zip(clean, trained, strict=True) if p.grad is not None]
        kept = [(c, g) for c, g in kept if g.numel()]
        if not kept:
            return
        if self.names and [c for c, _ in kept] != self.names:
            raise ValueError("model: got other parameters with gradients than in the earlier update")
        parts = [local_part(g.detach()) for _, g in kept]
        locals_ = [p.tensor for p in parts]
        device = locals_[0].device
        acc = accumulate_dtype(device)
        l1, l2, linf = shard_norms(locals_, (1.0, 2.0, math.inf))
        sums = torch.cat([l1.to(acc), l2.to(acc).square(), (~torch.isfinite(l2)).to(acc)])
        if self._sums is None or self._max is None:
            self.names = [c for c, _ in kept]
            self.modules = list(dict.fromkeys(module_of(c, self.module_depth) for c in self.names))
            index = {m: i for i, m in enumerate(self.modules)}
            self._module_index = [index[module_of(c, self.module_depth)] for c in self.names]
            self._numels = torch.tensor([p.numel for p in parts], dtype=acc, device=device)
            self._weights = torch.tensor([p.weight for p in parts], dtype=acc, device=device)
            self._sums, self._max = sums, linf.to(acc)
        else:
            self._sums = self._sums + sums.to(self._sums.device)
            self._max = torch.maximum(self._max, linf.to(self._max))

    def sync_parts(self, rank: int, world: int, device: torch.device) -> list[torch.Tensor]:
        if self._sums is None or self._max is None or self._weights is None:
            return []
        share = torch.where(self._weights > 0, self._weights, 1.0 / world).to(device)
        sums = self._sums.to(device) * torch.cat([share, share, torch.ones_like(share)])
        return [sums, slots(self._max.to(device), rank, world)]

    def load_sync(self, parts: list[torch.Tensor]) -> None:
        if parts:
            self._sums, self._max = parts[0], parts[1].max(dim=0).values

    def compute(self) -> RawValues:
        if self._sums is None or self._max is None or self._numels is None:
            return {}
        t = len(self.names)
        l1, l2sq, bad = self._sums[:t], self._sums[t : 2 * t], self._sums[2 * t :]
        device = l1.device
        index = torch.tensor(self._module_index, device=device)
        m = len(self.modules)
        module_l1 = torch.zeros(m, dtype=l1.dtype, device=device).index_add_(0, index, l1)
        module_n = torch.zeros(m, dtype=l1.dtype, device=device).index_add_(0, index, self._numels.to(device))
        module_max = torch.zeros(m, dtype=l1.dtype, device=device).scatter_reduce_(
            0, index, self._max.to(device), reduce="amax", include_self=False
        )
        raw: RawValues = {
            "gradient_flow/global_norm": l2sq.sum().sqrt(),
            "health/gradient_nonfinite_tensors": (bad > 0).sum(),
        }
        means = module_l1 / module_n.clamp_min(1)
        for i, module in enumerate(self.modules):
            raw[f"gradient_flow/{module}_mean"] = means[i]
            raw[f"gradient_flow/{module}_max"] = module_max[i]
        if self.per_parameter:
            tensor_means = l1 / self._numels.to(device).clamp_min(1)
            for j, name in enumerate(self.names):
                raw[f"gradients/{name}_mean"] = tensor_means[j]
                raw[f"gradients/{name}_max"] = self._max[j]
        return raw


def gradient_flow(
    model: NamedTensors,
    *,
    per_parameter: bool = False,
    module_depth: int = 1,
) -> dict[str, float]:
    """Global L2 gradient norm and ``|g|`` mean/max per module (and per tensor if asked).

    ``model`` is an ``nn.Module``, ``named_parameters()`` or a mapping name → parameter; tensors
    without ``.grad`` are skipped. ``global_norm = sqrt(Σ_t ‖g_t‖²)`` is what ``clip_grad_norm_``
    returns. Modules are the first ``module_depth`` components of the trainable parameters' names
    once wrapper components (DDP's leading ``module.``, compile's ``_orig_mod.`` anywhere,
    checkpoint wrappers) and the prefix all of them share (a net held as ``self.model``) are
    dropped. DTensor gradients (FSDP2) are supported; see :class:`GradientFlowAccumulator`. One
    host transfer.
    """
    state = GradientFlowAccumulator(per_parameter=per_parameter, module_depth=module_depth)
    state.update(model)
    return to_host(state.compute())


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
