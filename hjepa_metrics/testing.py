"""Test helpers, also a pytest plugin (entry point ``pytest11``): assert on what a training loop logged.

def test_training_does_not_collapse(hjepa_run):
    with HJEPAMetricsLogger(hjepa_run.writer) as logger:
        train(model, logger, steps=50)
    hjepa_run.assert_logged("train/loss/total", "train/collapse/level0_effective_rank")
    hjepa_run.assert_trend("train/loss/total", "decreasing")
    hjepa_run.assert_finite()
    assert hjepa_run.value_at("train/collapse/level0_effective_rank", 49) > 10
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from writers import JSONLWriter, read_jsonl


class LoggedRun:
    """A JSONL writer in a temporary place and queries over what it holds (read back from the file)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.writer = JSONLWriter(path)
        self.path = self.writer.path

    def records(self) -> list[dict[str, Any]]:
        """Every record so far (the writer is flushed first)."""
        if not self.writer.closed:
            self.writer.flush()
        return read_jsonl(self.path)

    def tags(self) -> set[str]:
        return {tag for r in self.records() if "metrics" in r for tag in r["metrics"]}

    def series(self, tag: str) -> list[tuple[int, float]]:
        """``[(step, value), ...]`` of ``tag`` in logging order."""
        return [(r["step"], r["metrics"][tag]) for r in self.records() if tag in r.get("metrics", {})]

    def value_at(self, tag: str, step: int) -> float:
        """The value of ``tag`` at ``step`` (the last one if it was logged twice)."""
        values = [v for s, v in self.series(tag) if s == step]
        if not values:
            steps = [s for s, _ in self.series(tag)]
            raise AssertionError(f"{tag!r} has no value at step {step}; logged at steps {steps[:20]}")
        return values[-1]

    def assert_logged(self, *tags: str) -> None:
        missing = sorted(set(tags) - self.tags())
        if missing:
            raise AssertionError(f"never logged: {missing}; logged tags include {sorted(self.tags())[:20]}")

    def assert_trend(
        self,
        tag: str,
        direction: Literal["decreasing", "increasing"] = "decreasing",
        *,
        strict: bool = False,
        tolerance: float = 0.0,
    ) -> None:
        """Each value is no more (``decreasing``) or no less (``increasing``) than the one before, up to
        ``tolerance``; ``strict`` demands a change at every step."""
        values = [v for _, v in self.series(tag)]
        if len(values) < 2:
            raise AssertionError(f"{tag!r} has {len(values)} values; a trend needs at least 2")
        sign = -1.0 if direction == "decreasing" else 1.0
        for i, (a, b) in enumerate(itertools.pairwise(values)):
            change = sign * (b - a)
            if change < -tolerance or (strict and change <= 0):
                raise AssertionError(
                    f"{tag!r} is not {direction}: {a} -> {b} at position {i + 1} of {values}"
                )

    def assert_finite(self, *tags: str) -> None:
        """No NaN or infinity in ``tags`` (default: every logged tag)."""
        wanted = set(tags) if tags else None
        bad = [
            (r["step"], tag, value)
            for r in self.records()
            for tag, value in r.get("metrics", {}).items()
            if (wanted is None or tag in wanted) and not math.isfinite(value)
        ]
        if bad:
            raise AssertionError(f"non-finite values (step, tag, value): {bad[:10]}")


@pytest.fixture
def hjepa_run(tmp_path: Path) -> Iterator[LoggedRun]:
    """A :class:`LoggedRun` in the test's temporary directory; pass ``hjepa_run.writer`` to the logger."""
    run = LoggedRun(tmp_path / "hjepa_run" / "metrics.jsonl")
    yield run
    run.writer.close()
