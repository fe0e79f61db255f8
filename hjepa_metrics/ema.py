"""EMA teacher dynamics: ``ema/*``."""

from __future__ import annotations

import torch

from ._params import NamedTensors, local_part, named_tensors, refuse_fsdp1, shard_norms
from ._tensor import Scalar, accumulate_dtype, scalar_tensor, to_host
from .accumulator import RawValues


class EMAAccumulator:
    """Target-vs-context parameter distances and norms, from each rank's local parameters.

    Like :class:`~hjepa_metrics.gradients.GradientFlowAccumulator`, plain parameters (one process,
    DDP) and DTensor parameters (FSDP2) give the statistics of the full parameters with the one
    summed all-reduce of the call, never a gather. Both encoders must be sharded alike.
    """

    def __init__(self) -> None:
        self._sums: torch.Tensor | None = None  # [‖Δ‖² per tensor, ‖θc‖² per tensor, ‖θt‖² per tensor]
        self._bad: torch.Tensor | None = None  # [T] non-finite indicators
        self._weights: torch.Tensor | None = None
        self._momenta: RawValues = {}

    def update(
        self,
        context_encoder: NamedTensors,
        target_encoder: NamedTensors,
        current_momentum: Scalar,
        target_momentum: Scalar,
    ) -> None:
        context = dict(named_tensors(context_encoder, "context_encoder"))
        target = dict(named_tensors(target_encoder, "target_encoder"))
        refuse_fsdp1(context_encoder, list(context))
        refuse_fsdp1(target_encoder, list(target))
        if context.keys() != target.keys():
            missing = sorted(context.keys() - target.keys())
            extra = sorted(target.keys() - context.keys())
            raise ValueError(
                "context_encoder and target_encoder have different parameter names: "
                f"only in context_encoder {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"only in target_encoder {extra[:5]}{'...' if len(extra) > 5 else ''}; "
                "expected the same names"
            )
        self._momenta = {
            "ema/momentum_current": scalar_tensor(current_momentum, "current_momentum"),
            "ema/momentum_target": scalar_tensor(target_momentum, "target_momentum"),
        }
        pairs = [(n, local_part(context[n].detach()), local_part(target[n].detach())) for n in context]
        if not pairs:
            return
        for name, c, t in pairs:
            if context[name].shape != target[name].shape:
                raise ValueError(
                    f"parameter {name!r}: context_encoder shape {tuple(context[name].shape)} but "
                    f"target_encoder {tuple(target[name].shape)}; expected equal shapes"
                )
            if c.weight != t.weight or c.tensor.shape != t.tensor.shape:
                raise ValueError(
                    f"parameter {name!r}: context_encoder and target_encoder are sharded differently "
                    f"(local shapes {tuple(c.tensor.shape)} and {tuple(t.tensor.shape)}); shard both "
                    "encoders the same way (fully_shard both) or neither"
                )
        ctx = [c.tensor for _, c, _ in pairs]
        tgt = [t.tensor.to(device=c.device, dtype=c.dtype) for c, (_, _, t) in zip(ctx, pairs, strict=True)]
        device = ctx[0].device
        acc = accumulate_dtype(device)
        (diff,) = shard_norms(list(torch._foreach_sub(tgt, ctx)), (2.0,))
        (ctx_norms,), (tgt_norms,) = shard_norms(ctx, (2.0,)), shard_norms(tgt, (2.0,))
        bad = ~(torch.isfinite(diff) & torch.isfinite(ctx_norms) & torch.isfinite(tgt_norms))
        self._sums = torch.cat([n.to(acc).square() for n in (diff, ctx_norms, tgt_norms)])
        self._bad = bad.to(acc)
        self._weights = torch.tensor([c.weight for _, c, _ in pairs], dtype=acc, device=device)

    def sync_parts(self, rank: int, world: int, device: torch.device) -> list[torch.Tensor]:
        del rank
        momenta = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=device) for v in self._momenta.values()]
        )
        if self._sums is None or self._bad is None or self._weights is None:
            return [momenta / world]
        share = torch.where(self._weights > 0, self._weights, 1.0 / world).to(device)
        return [momenta / world, self._sums.to(device) * share.repeat(3), self._bad.to(device)]

    def load_sync(self, parts: list[torch.Tensor]) -> None:
        self._momenta = dict(zip(self._momenta, parts[0], strict=True))
        if len(parts) == 3:
            self._sums, self._bad = parts[1], parts[2]

    def compute(self) -> RawValues:
        raw: RawValues = dict(self._momenta)
        if self._sums is None or self._bad is None:
            return raw
        t = self._bad.numel()
        diff_sq, ctx_sq, tgt_sq = self._sums[:t], self._sums[t : 2 * t], self._sums[2 * t :]
        raw["ema/avg_parameter_divergence"] = diff_sq.sqrt().mean()
        raw["ema/weight_magnitude_ratio"] = tgt_sq.sum().sqrt() / ctx_sq.sum().sqrt()
        raw["health/ema_nonfinite_tensors"] = (self._bad > 0).sum()
        return raw


def ema_dynamics(
    context_encoder: NamedTensors,
    target_encoder: NamedTensors,
    current_momentum: Scalar,
    target_momentum: Scalar,
) -> dict[str, float]:
    """Momentum values, mean parameter distance and global weight-norm ratio of target vs context.

    Encoders are modules, ``named_parameters()`` or name → tensor mappings; parameters are matched by
    name (wrapper components stripped) and a name or shape mismatch is an error.
    ``avg_parameter_divergence`` = mean over tensors of ``‖θ_target − θ_context‖``;
    ``weight_magnitude_ratio`` = ``‖θ_target‖ / ‖θ_context‖`` (global L2 norms).
    ``health/ema_nonfinite_tensors`` counts parameter tensors whose norms are not finite (a NaN/inf
    element, or a norm that overflows the parameters' dtype). DTensor parameters are supported (see
    :class:`EMAAccumulator`; this function sees this rank's shards, the logger reduces over ranks).
    """
    state = EMAAccumulator()
    state.update(context_encoder, target_encoder, current_momentum, target_momentum)
    return to_host(state.compute())
