"""``torch.distributed`` support: who writes, and one packed all-reduce for whole-batch statistics."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .accumulator import Accumulator


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, read when asked (never at import)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device for NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum every tensor of ``parts`` over all ranks with ONE ``all_reduce`` of their float64 concatenation.

    Values that need a min or max are sent in per-rank slots (zeros elsewhere), so one SUM serves all.
    Returns new tensors with the original shapes, dtypes and devices.
    """
    import torch.distributed as dist

    device = collective_device()
    flat = torch.cat([p.reshape(-1).to(device=device, dtype=torch.float64) for p in parts])
    dist.all_reduce(flat)
    out = []
    offset = 0
    for p in parts:
        n = p.numel()
        out.append(flat[offset : offset + n].view(p.shape).to(device=p.device, dtype=p.dtype))
        offset += n
    return out


def slots(value: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """``[world, *value.shape]`` zeros with ``value`` in row ``rank``."""
    out = torch.zeros((world, *value.shape), dtype=value.dtype, device=value.device)
    out[rank] = value
    return out


def reduce_accumulators(accumulators: Sequence[Accumulator], world: tuple[int, int] | None = None) -> None:
    """Make every accumulator hold the state of all ranks, with ONE packed all-reduce in total.

    ``world`` is ``(rank, world_size)`` (default: the process group's). A no-op alone, or when no
    accumulator has state to share. Every rank must call it with the same kinds of accumulators.
    """
    rank, size = rank_and_world() if world is None else world
    if size == 1:
        return
    device = collective_device()
    groups = [acc.sync_parts(rank, size, device) for acc in accumulators]
    flat = [part for group in groups for part in group]
    if not flat:
        return
    summed = iter(all_reduce_sum(flat))
    for acc, group in zip(accumulators, groups, strict=True):
        acc.load_sync([next(summed) for _ in group])
