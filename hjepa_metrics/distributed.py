"""``torch.distributed`` support: who writes, and one packed all-reduce for whole-batch statistics."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .accumulator import Accumulator


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, read when asked (never at import)."""
    dist = _dist()
    if dist is not None and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@functools.cache
def _dist() -> Any:
    """``torch.distributed`` where this build of torch has it, else ``None`` (asked once: every
    logging call reads the world, and an import statement costs as much as the rest)."""
    import torch.distributed as dist

    return dist if dist.is_available() else None


def collective_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device for NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


log = logging.getLogger("hjepa_metrics.distributed")

# How long a rank may wait in a logging collective before it says why it might be stuck.
COLLECTIVE_WARNING_SECONDS = 60.0


class _Watchdog:
    """One thread per process that warns when a logging collective waits too long: the usual cause
    is a logging call made on some ranks only (under ``if rank == 0:``), which would hang silently."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: tuple[float, float, str] | None = None  # (since, warn after, what)
        self._thread: threading.Thread | None = None

    @contextmanager
    def waiting(self, what: str, warn_after: float) -> Iterator[None]:
        with self._lock:
            self._waiting = (time.monotonic(), warn_after, what)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._watch, name="hjepa-collective-watch", daemon=True
                )
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._waiting = None

    def _watch(self) -> None:
        warned: tuple[float, float, str] | None = None
        while True:
            time.sleep(0.5)
            with self._lock:
                current = self._waiting
            if current is None or current is warned:
                continue
            since, warn_after, what = current
            if time.monotonic() - since >= warn_after:
                warned = current
                rank, world = rank_and_world()
                log.warning(
                    "rank %d has waited %.0f s for the other %d rank(s) in a logging call (%s): every "
                    "rank must make the same logging calls in the same order (only rank 0 writes); a "
                    "call made on some ranks only, such as under `if rank == 0:`, waits here forever",
                    rank,
                    warn_after,
                    world - 1,
                    what,
                )


watchdog = _Watchdog()


def all_reduce_sum(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum every tensor of ``parts`` over all ranks with ONE ``all_reduce`` of their float64 concatenation.

    Values that need a min or max are sent in per-rank slots (zeros elsewhere), so one SUM serves all.
    Returns new tensors with the original shapes, dtypes and devices.
    """
    import torch.distributed as dist

    device = collective_device()
    # detached: no autograd graph is built for a loss passed as it is (requiring grad)
    flat = torch.cat([p.detach().reshape(-1).to(device=device, dtype=torch.float64) for p in parts])
    dist.all_reduce(flat)
    if flat.is_cuda:
        # NCCL only enqueues: wait here (the caller's host read would wait for the same work), so a
        # collective that never completes is seen by the watchdog
        torch.cuda.current_stream(flat.device).synchronize()
    out = []
    offset = 0
    for p in parts:
        n = p.numel()
        out.append(flat[offset : offset + n].view(p.shape).to(device=p.device, dtype=p.dtype))
        offset += n
    return out


def reduce_accumulators(
    accumulators: Sequence[Accumulator],
    world: tuple[int, int] | None = None,
    *,
    warn_after: float = COLLECTIVE_WARNING_SECONDS,
) -> None:
    """Make every accumulator hold the state of all ranks, with ONE packed all-reduce in total.

    ``world`` is ``(rank, world_size)`` (default: the process group's). A no-op alone, or when no
    accumulator has state to share. Every rank must call it with the same kinds of accumulators; a
    rank that waits ``warn_after`` seconds for the others says so (a call made on rank 0 only).
    """
    rank, size = rank_and_world() if world is None else world
    if size == 1:
        return
    device = collective_device()
    groups = [acc.sync_parts(rank, size, device) for acc in accumulators]
    flat = [part for group in groups for part in group]
    if not flat:
        return
    what = ", ".join(dict.fromkeys(type(acc).__name__ for acc in accumulators))
    with watchdog.waiting(what, warn_after):
        summed = iter(all_reduce_sum(flat))
    for acc, group in zip(accumulators, groups, strict=True):
        acc.load_sync([next(summed) for _ in group])
