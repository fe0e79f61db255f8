"""BackgroundWriter: ordering, back-pressure, snapshots, flush/close semantics and error isolation."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from writers import BackgroundWriter, BaseWriter, JSONLWriter, MultiWriter, read_jsonl


class Slow(BaseWriter):
    name = "slow"

    def __init__(self, delay: float = 0.0, fail_at: int | None = None) -> None:
        super().__init__()
        self.delay = delay
        self.fail_at = fail_at
        self.steps: list[int] = []
        self.histograms: list[np.ndarray] = []
        self.flushes = 0
        self.gate = threading.Event()
        self.gate.set()

    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        self.gate.wait()
        time.sleep(self.delay)
        if step == self.fail_at:
            raise OSError("backend down")
        self.steps.append(step)

    def log_histogram(self, tag: str, values: Any, step: int) -> None:
        self.histograms.append(values)

    def flush(self) -> None:
        self.flushes += 1


def test_order_flush_and_close_wait_for_everything(tmp_path: Path) -> None:
    w = BackgroundWriter(JSONLWriter(tmp_path), max_queue=4)  # tiny queue: back-pressure, nothing lost
    for step in range(500):
        w.log_scalars({"a": float(step)}, step)
    w.flush()
    assert [r["step"] for r in read_jsonl(tmp_path)] == list(range(500))
    w.log_scalars({"a": -1.0}, 500)
    w.close()
    assert read_jsonl(tmp_path)[-1]["step"] == 500
    with pytest.raises(RuntimeError, match="write after close"):
        w.log_scalars({"a": 0.0}, 501)


def test_jsonl_scalars_are_encoded_by_the_caller_and_written_a_run_at_a_time(tmp_path: Path) -> None:
    """The caller encodes scalar lines (the values are at hand, no I/O); the worker appends each run
    of them that it finds queued with one write, in queue order with the other records."""
    inner = JSONLWriter(tmp_path)
    encoded_on: list[threading.Thread] = []
    runs: list[int] = []
    encode, write, log_config = inner.encode_scalars, inner.write_encoded, inner.log_config
    held = threading.Event()

    def spy_encode(metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> bytes:
        encoded_on.append(threading.current_thread())
        return encode(metrics, step, wall_time)

    def spy_write(data: bytes) -> None:
        runs.append(data.count(b"\n"))
        write(data)

    def held_config(config: Mapping[str, Any]) -> None:
        held.wait(10)  # the worker is busy while the caller queues
        log_config(config)

    def refused(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the worker decoded scalars itself")

    inner.encode_scalars, inner.write_encoded = spy_encode, spy_write  # type: ignore[method-assign]
    inner.log_config, inner.log_scalars = held_config, refused  # type: ignore[method-assign]
    w = BackgroundWriter(inner)
    w.log_config({"run": 1})
    for step in range(50):
        w.log_scalars({"a": float(step)}, step)
    w.log_histogram("h", np.arange(4.0), 50)
    for step in range(51, 81):
        w.log_scalars({"a": float(step)}, step)
    held.set()
    w.close()
    assert set(encoded_on) == {threading.current_thread()} and len(encoded_on) == 80
    assert runs == [50, 30]
    records = read_jsonl(tmp_path)
    kinds = [r.get("kind", "scalars") for r in records]
    assert kinds == ["config", *["scalars"] * 50, "histogram", *["scalars"] * 30]
    assert [r["metrics"]["a"] for r in records if "metrics" in r] == [float(s) for s in range(81) if s != 50]


def test_log_returns_before_a_slow_backend_is_done() -> None:
    inner = Slow()
    inner.gate.clear()  # the backend is stuck
    w = BackgroundWriter(inner, max_queue=100)
    start = time.perf_counter()
    for step in range(50):
        w.log_scalars({"a": 1.0}, step)
    assert time.perf_counter() - start < 1.0 and inner.steps == []
    inner.gate.set()
    w.flush()
    assert inner.steps == list(range(50)) and inner.flushes == 1
    w.close()


def test_drop_policy_counts_what_it_drops(caplog: pytest.LogCaptureFixture) -> None:
    inner = Slow()
    inner.gate.clear()
    w = BackgroundWriter(inner, max_queue=3, when_full="drop")
    for step in range(10):
        w.log_scalars({"a": 1.0}, step)
    inner.gate.set()
    w.close()
    # one call may already be in the worker's hands, three in the queue
    assert len(inner.steps) + w.dropped == 10 and w.dropped >= 6
    assert caplog.text.count("dropping records") == 1


def test_values_are_snapshotted_when_queued() -> None:
    inner = Slow()
    inner.gate.clear()
    w = BackgroundWriter(inner)
    t = torch.ones(4)
    metrics = {"a": 1.0}
    w.log_histogram("h", t, 0)
    w.log_scalars(metrics, 0)
    t.zero_()  # training reuses its buffers
    metrics["a"] = 2.0
    inner.gate.set()
    w.close()
    assert inner.histograms[0].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_errors_are_isolated_counted_and_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    bad = BackgroundWriter(Slow(fail_at=1))
    good = Slow()
    good.name = "good"
    multi = MultiWriter([bad, BackgroundWriter(good)])
    for step in range(4):
        multi.log_scalars({"a": 1.0}, step)
    multi.close()
    assert good.steps == [0, 1, 2, 3]
    assert bad.inner.steps == [0, 2, 3]  # type: ignore[attr-defined]
    assert multi.errors == {"slow": 1}
    assert caplog.text.count("writer 'slow' failed in log_scalars") == 1


def test_strict_background_writer_raises_on_the_next_call() -> None:
    w = BackgroundWriter(Slow(fail_at=0), strict=True)
    w.log_scalars({"a": 1.0}, 0)
    with pytest.raises(RuntimeError, match="writer 'slow' failed in the background") as info:
        w.flush()
    assert isinstance(info.value.__cause__, OSError)
    w.close()


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="when_full: got 'wait'"):
        BackgroundWriter(Slow(), when_full="wait")  # type: ignore[arg-type]


def test_a_hung_backend_cannot_stop_training(caplog: pytest.LogCaptureFixture) -> None:
    inner = Slow()
    inner.gate.clear()  # hangs forever
    w = BackgroundWriter(inner, max_queue=2, timeout=0.2)
    start = time.perf_counter()
    for step in range(20):
        w.log_scalars({"a": 1.0}, step)
    w.flush()
    w.close()
    assert time.perf_counter() - start < 5.0
    assert w.stalled and w.dropped >= 15
    assert caplog.text.count("made no progress") == 1
    inner.gate.set()  # let the abandoned worker finish
