"""The router under the logger: owns the step and prefix, reduces accumulators, emits to one writer.

Like Composer's logger router: the step is decided here, once, before the values fan out to the
writers, and alerts see exactly what was written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import torch

from writers import Writer
from writers.base import exit_failed

from ._tensor import ArrayLike, to_host
from .accumulator import Accumulator
from .alerts import Alert, AlertMonitor
from .distributed import COLLECTIVE_WARNING_SECONDS, rank_and_world, reduce_accumulators

_R = TypeVar("_R", bound="MetricRouter")


class MetricRouter:
    """Writes tagged values under a prefix at the current step, through one writer.

    Only rank 0's writers open anything: on other ranks writers are :class:`writers.base.NullWriter` objects
    (unless built with ``all_ranks``). ``distributed=False`` makes no collective call. A rank
    that waits ``collective_warning`` seconds (60) for the others in a logging call says why it may
    be stuck.
    """

    def __init__(
        self,
        make_writer: Callable[[], Writer],
        *,
        prefix: str = "train/",
        monitor: AlertMonitor | None = None,
        distributed: bool = True,
    ) -> None:
        self.distributed = distributed
        # on other ranks every writer (and build_writers) is a NullWriter unless asked for `all_ranks`
        self.writer: Writer = make_writer()
        self.prefix = prefix
        self.monitor = monitor
        self.step = 0
        self.collective_warning = COLLECTIVE_WARNING_SECONDS

    @property
    def alerts(self) -> list[Alert]:
        """Every alert fired so far (empty when alerts are off)."""
        return list(self.monitor.fired) if self.monitor else []

    @property
    def rank(self) -> int:
        return self.world[0]

    def _on_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def world(self) -> tuple[int, int]:
        """``(rank, world_size)``, read when asked; ``(0, 1)`` with ``distributed=False``."""
        return rank_and_world() if self.distributed else (0, 1)

    def _at(self, global_step: int | None) -> int:
        if global_step is not None:
            self.step = int(global_step)
        return self.step

    def emit(
        self, values: Mapping[str, float], global_step: int | None = None, prefix: str | None = None
    ) -> dict[str, float]:
        """Write host ``values`` (tags without prefix) under ``prefix``; returns them prefixed."""
        step = self._at(global_step)
        p = self.prefix if prefix is None else prefix
        full = {p + tag: value for tag, value in values.items()}
        if full:
            self.writer.log_scalars(full, step)
            if self.monitor is not None:
                self.monitor.check(full, step, announce=self._on_rank_zero)
        return full

    def log_accumulated(
        self,
        accumulators: Sequence[Accumulator],
        global_step: int | None = None,
        prefix: str | None = None,
        then: Callable[[dict[str, float]], Mapping[str, float]] | None = None,
    ) -> dict[str, float]:
        """Reduce the accumulators over ranks (one all-reduce), compute them (one host transfer),
        pass the values through ``then`` (for groups computed from reduced inputs), write them."""
        reduce_accumulators(accumulators, self.world, warn_after=self.collective_warning)
        raw: dict[str, torch.Tensor | float] = {}
        for acc in accumulators:
            raw.update(acc.compute())
        values = to_host(raw)
        return self.emit(then(values) if then is not None else values, global_step, prefix)

    def log_scalars(
        self, metrics: Mapping[str, float], global_step: int | None = None, prefix: str | None = None
    ) -> dict[str, float]:
        """Any other scalars, under ``prefix`` like the rest."""
        return self.emit({k: float(v) for k, v in metrics.items()}, global_step, prefix)

    def log_histogram(self, tag: str, values: ArrayLike, global_step: int | None = None) -> None:
        """A histogram of ``values`` (any shape; non-finite values are dropped) under ``tag`` as given."""
        self.writer.log_histogram(tag, values, self._at(global_step))

    def log_image(self, tag: str, image: Any, global_step: int | None = None) -> None:
        """A matplotlib Figure, or an HW/CHW/HWC array or tensor (floats in [0, 1]), under ``tag``."""
        self.writer.log_image(tag, image, self._at(global_step))

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Run configuration / hyper-parameters."""
        self.writer.log_config(config)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, failed: bool | None = None) -> None:
        """Close every backend; ``failed`` sets the run status (default: from an uncaught exception)."""
        self.writer.close(failed=failed)

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exit_failed(exc))
