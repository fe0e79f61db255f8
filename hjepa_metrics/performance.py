"""Step timing and device memory: ``performance/*``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

GB = 1e9


def performance_metrics(
    batch_size: int,
    forward_time: float,
    backward_time: float,
    *,
    device: torch.device | str | int | None = None,
) -> dict[str, float]:
    """Times in ms, throughput and, on CUDA, memory in GB (10⁹ bytes) for ``device``.

    ``forward_time`` and ``backward_time`` are seconds (as ``time.time()`` differences in the
    guide). ``samples_per_second = batch_size / (forward + backward)`` and
    ``forward_backward_ratio = forward / backward`` are omitted when their denominator is 0.
    ``device=None`` reports the current CUDA device when CUDA has been initialized; a CPU device
    reports no memory tags.
    """
    return {**timing_metrics(batch_size, forward_time, backward_time), **cuda_memory_metrics(device)}


def timing_metrics(batch_size: float, forward_time: float, backward_time: float) -> dict[str, float]:
    """The timing part of :func:`performance_metrics` (seconds in, milliseconds and samples/s out)."""
    if batch_size < 0:
        raise ValueError(f"batch_size: got {batch_size}; expected a non-negative int")
    fwd, bwd = float(forward_time), float(backward_time)
    if fwd < 0 or bwd < 0:  # NaN passes: NaN in, NaN out
        raise ValueError(f"forward_time/backward_time: got {fwd}/{bwd} s; expected non-negative seconds")
    total = fwd + bwd
    out = {
        "performance/forward_time_ms": 1000.0 * fwd,
        "performance/backward_time_ms": 1000.0 * bwd,
        "performance/total_time_ms": 1000.0 * total,
    }
    if total > 0:
        out["performance/samples_per_second"] = batch_size / total
    if bwd > 0:
        out["performance/forward_backward_ratio"] = fwd / bwd
    return out


def cuda_memory_metrics(device: torch.device | str | int | None = None) -> dict[str, float]:
    """Allocated, reserved and peak allocated CUDA memory (GB) of ``device``; empty off CUDA.

    These are host-side allocator counters: reading them does not synchronize the device.
    """
    if device is None:
        # is_initialized() implies is_available() and costs 30 times less (this runs every step)
        if not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            return {}
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        if dev.type != "cuda":
            return {}
    return {
        "performance/gpu_memory_allocated_gb": torch.cuda.memory_allocated(dev) / GB,
        "performance/gpu_memory_reserved_gb": torch.cuda.memory_reserved(dev) / GB,
        "performance/peak_memory_gb": torch.cuda.max_memory_allocated(dev) / GB,
    }


@dataclass
class Timing:
    """Seconds measured by :func:`timed`; set when the ``with`` block exits."""

    seconds: float = 0.0


@contextmanager
def timed(device: torch.device | str | None = None) -> Iterator[Timing]:
    """Wall time of the block in seconds, synchronizing ``device`` (if CUDA) before and after.

    Without the synchronization a CUDA time measures kernel launches, not work.
    """
    dev = torch.device(device) if device is not None else None
    sync = dev is not None and dev.type == "cuda"
    if sync:
        torch.cuda.synchronize(dev)
    result = Timing()
    start = time.perf_counter()
    try:
        yield result
    finally:
        if sync:
            torch.cuda.synchronize(dev)
        result.seconds = time.perf_counter() - start
