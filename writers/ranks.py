"""Which process of a distributed job this is, without importing torch: only rank 0 writes.

``torch.distributed`` is asked when the job has initialized it (the module is then already
imported); before that, the launcher's environment tells (``torchrun``, ``accelerate launch``,
Lightning and DeepSpeed set ``RANK`` and ``WORLD_SIZE`` in every process they start).
"""

from __future__ import annotations

import os
import sys


def _initialized_group() -> object | None:
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():  # type: ignore[attr-defined]
            return dist
    except Exception:  # a half-imported or stubbed torch: fall back on the environment
        return None
    return None


def process_rank() -> int:
    """This process's global rank (0 outside a distributed job)."""
    dist = _initialized_group()
    if dist is not None:
        return int(dist.get_rank())  # type: ignore[attr-defined]
    value = os.environ.get("RANK", "").strip()
    return int(value) if value.isdigit() else 0


def world_size() -> int:
    """The number of processes of the job (1 outside a distributed job)."""
    dist = _initialized_group()
    if dist is not None:
        return int(dist.get_world_size())  # type: ignore[attr-defined]
    value = os.environ.get("WORLD_SIZE", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1


def rank_suffix(all_ranks: bool) -> str:
    """``"rank3"`` for a writer that every rank of a distributed job opens (``all_ranks=True``), so
    each rank gets its own file or run; ``""`` otherwise.

    >>> rank_suffix(False)
    ''
    """
    if all_ranks and (world_size() > 1 or process_rank() > 0):
        return f"rank{process_rank()}"
    return ""
