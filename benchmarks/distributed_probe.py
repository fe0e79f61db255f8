"""The guide's ten calls on each rank of ``torchrun`` (gloo, one thread per rank), run by
``benchmarks/run.py``: the collectives each call makes and the step's time, ours against
:class:`guide_baseline.NaiveDistributed` (an ``all_reduce`` per scalar). Rank 0 writes the results.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        benchmarks/distributed_probe.py OUT.json REPEAT
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from guide_baseline import NaiveDistributed
from run import _guide_calls, _step_inputs

import hjepa_metrics as hm

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor")


def counting_collectives() -> Callable[[], int]:
    """Counts every ``torch.distributed`` collective this process makes from now on."""
    seen = [0]

    def counting(original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            seen[0] += 1
            return original(*args, **kwargs)

        return counted

    for name in _COLLECTIVES:
        setattr(dist, name, counting(getattr(dist, name)))
    return lambda: seen[0]


def main(out: str, repeat: int) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    s = _step_inputs()
    count = counting_collectives()
    with tempfile.TemporaryDirectory() as tmp:
        ours = hm.HJEPAMetricsLogger(config={"log_dir": f"{tmp}/ours", "backends": ["jsonl"]})
        naive = NaiveDistributed(f"{tmp}/naive{rank}.jsonl")
        per_call: dict[str, list[int]] = {}
        for (name, ours_call), (_, naive_call) in zip(
            _guide_calls(s, True), _guide_calls(s, False), strict=True
        ):
            before = count()
            ours_call(ours, 0)
            middle = count()
            naive_call(naive, 0)
            per_call[name] = [middle - before, count() - middle]
        naive.end_step(0)
        times: list[list[float]] = [[], []]
        for step in range(1, repeat + 1):
            for kept, logger, is_ours in zip(times, (ours, naive), (True, False), strict=True):
                dist.barrier()  # both ranks start the step together
                start = time.perf_counter()
                for _, call in _guide_calls(s, is_ours):
                    call(logger, step)
                if not is_ours:
                    naive.end_step(step)
                kept.append(time.perf_counter() - start)
        ours.close()
        naive.close()
    if rank == 0:
        ours_time, naive_time = (statistics.median(t) for t in times)
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"per_call": per_call, "ours": ours_time, "naive": naive_time}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
