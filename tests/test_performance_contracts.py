"""Structural performance contracts (timings live in benchmarks/): host transfers, passes, copies, lazy
imports, resume memory, writer processes."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import hjepa_metrics._tensor
import hjepa_metrics.accumulator
import hjepa_metrics.logger
from hjepa_metrics import HJEPAMetricsLogger
from writers import BaseWriter

_READERS = ("item", "tolist", "cpu", "numpy", "__float__", "__bool__", "__int__", "__index__")


@contextmanager
def count_host_reads() -> Iterator[list[str]]:
    """Counts every Tensor method that reads device memory into Python while active."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in _READERS}

    def wrap(name: str) -> Any:
        def reader(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return originals[name](self, *args, **kwargs)

        return reader

    for name in _READERS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


class Null(BaseWriter):
    name = "null"

    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        assert all(type(v) is float for v in metrics.values())


class Wide(nn.Module):
    """200 parameter tensors in 4 top-level modules."""

    def __init__(self) -> None:
        super().__init__()
        self.context_encoder = nn.ModuleList(nn.Linear(8, 8) for _ in range(50))
        self.target_encoder = nn.ModuleList(nn.Linear(8, 8) for _ in range(25))
        self.predictor = nn.ModuleList(nn.Linear(8, 8) for _ in range(20))
        self.head = nn.ModuleList(nn.Linear(8, 8) for _ in range(5))


def _inputs(levels: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    model = Wide()
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    preds = [torch.randn(2, 16 >> min(i, 3), 8, generator=gen) for i in range(levels)]
    return {
        "model": model,
        "preds": preds,
        "targs": [p + 0.1 for p in preds],
        "losses": {"loss": torch.tensor(1.0), **{f"loss_h{i}": torch.tensor(0.5) for i in range(levels)}},
    }


@pytest.mark.parametrize("levels", [1, 3, 6])
def test_one_host_transfer_per_logger_call(levels: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # CPU tensors are read one item() each (no transfer there): count the packed path accelerators take
    monkeypatch.setattr(hjepa_metrics._tensor, "PACK_CPU_READS", True)
    s = _inputs(levels)
    assert len(list(s["model"].parameters())) == 200
    logger = HJEPAMetricsLogger(Null(), num_hierarchies=levels)
    opt = torch.optim.SGD(s["model"].parameters(), lr=torch.tensor(0.1))
    val = logger.validation()
    calls = {
        "losses": lambda: logger.log_hierarchical_losses(s["losses"], global_step=1),
        "masking": lambda: logger.log_masking_statistics(torch.rand(2, 3, 16) > 0.5, global_step=1),
        "prediction": lambda: logger.log_prediction_quality(s["preds"], s["targs"], global_step=1),
        "collapse": lambda: logger.log_collapse_metrics(torch.randn(64, 8), level=0, global_step=1),
        "gradient_flow": lambda: logger.log_gradient_flow(s["model"], global_step=1),
        "clipping": lambda: logger.log_gradient_clipping(
            torch.tensor(2.0), torch.tensor(1.0), 1.0, global_step=1
        ),
        "learning_rate": lambda: logger.log_learning_rate(opt, global_step=1),
        "hierarchy": lambda: logger.log_hierarchy_feature_stats(s["preds"], s["targs"], global_step=1),
        "stability": lambda: logger.log_training_stability(torch.tensor(0.5), global_step=1),
        "stability_history": lambda: logger.log_training_stability(
            torch.tensor(0.5), [torch.tensor(float(i)) for i in range(30)], global_step=1
        ),
        "ema": lambda: logger.log_ema_dynamics(
            s["model"], s["model"], torch.tensor(0.99), 1.0, global_step=1
        ),
        "validation": lambda: (
            val.update(s["preds"], s["targs"], torch.randn(2, 5, 8)),
            val.log(global_step=1),
        ),
    }
    for name, call in calls.items():
        with count_host_reads() as reads:
            call()
        assert len(reads) <= 1, (name, reads)


def test_scalar_calls_alone_read_their_values_without_a_rank_reduction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Alone there is nothing to combine over ranks: losses, clipping, learning rate, stability and
    timing read their few values directly (the distributed tests check what two ranks combine)."""
    built: list[object] = []

    class Counted(hjepa_metrics.accumulator.RankReduce):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(hjepa_metrics.logger, "RankReduce", Counted)
    logger = HJEPAMetricsLogger(Null(), num_hierarchies=2)
    loss = torch.ones((), requires_grad=True) * 0.5  # as a training step has it
    got = {
        **logger.log_hierarchical_losses({"loss": loss, "loss_h0": loss * 0.5, "loss_h1": 0.25}, 1),
        **logger.log_gradient_clipping(torch.tensor(2.0), torch.tensor(1.0), 1.0, global_step=1),
        **logger.log_learning_rate(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 1),
        **logger.log_training_stability(loss, global_step=1),
        **logger.log_performance_metrics(8, 0.25, 0.75, global_step=1),
    }
    assert built == []
    assert got["train/loss/total"] == 0.5 and got["train/loss/contribution_h0"] == 50.0
    assert got["train/gradient/clipping_ratio"] == 0.5 and got["train/learning_rate/base_lr"] == 0.1
    assert got["train/performance/samples_per_second"] == 8.0
    logger.rank_reduction = "local"
    logger.log_hierarchical_losses({"loss": 1.0, "loss_h0": 1.0, "loss_h1": 1.0}, 2)
    assert built == []


# operations that only describe memory (no pass over the values)
_VIEWS = {"aten::slice", "aten::as_strided", "aten::detach", "detach", "aten::reshape", "aten::view"}


def _ops_on_large_inputs(call: Any, numel: int) -> Counter[str]:
    """The operations ``call`` runs on inputs of at least ``numel`` elements, counted (profiler)."""
    with torch.profiler.profile(record_shapes=True) as prof:
        call()
    found: Counter[str] = Counter()
    for event in prof.events():
        if any(shape and math.prod(shape) >= numel for shape in event.input_shapes):
            found[event.name] += 1
    return Counter({name: n for name, n in found.items() if name not in _VIEWS})


class _Reads(TorchDispatchMode):
    """Which operations read a tensor whose storage is one of ``watched`` (data pointers)."""

    def __init__(self, watched: set[int]) -> None:
        super().__init__()
        self.watched = watched
        self.reads: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inputs = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(t.untyped_storage().data_ptr() in self.watched for t in inputs):
            name = func.overloadpacket.__name__
            if name not in {"view", "_unsafe_view", "slice", "as_strided", "detach", "reshape", "alias"}:
                self.reads[name] += 1
        return func(*args, **kwargs)


def test_gradient_statistics_read_each_gradient_once_and_copy_nothing() -> None:
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])
    for p in model.parameters():
        p.grad = torch.randn(p.shape)
    logger = HJEPAMetricsLogger(Null())
    ops = _ops_on_large_inputs(lambda: logger.log_gradient_flow(model, global_step=0), 512 * 512)
    # per weight: |g| into a reused scratch buffer; its sum, max and self-dot (L1, max, L2²) read that
    # buffer from cache; no copy, no float64 conversion, no temporary of its size
    assert ops == Counter({"aten::abs": 4, "aten::sum": 4, "aten::max": 4, "aten::dot": 4})
    weights = {m.weight.grad.untyped_storage().data_ptr() for m in model}  # type: ignore[union-attr]
    with _Reads(weights) as mode:
        logger.log_gradient_flow(model, global_step=1)
    assert mode.reads == Counter({"abs": 4})  # one pass over each gradient in memory


@pytest.mark.parametrize("call", ["prediction", "hierarchy", "collapse"])
def test_feature_statistics_make_no_float64_copy_of_a_whole_tensor(call: str) -> None:
    gen = torch.Generator().manual_seed(0)
    preds = [torch.randn(48, 196, 128, generator=gen) for _ in range(2)]  # 1.2 M values: over one chunk
    targs = [p + 0.1 for p in preds]
    logger = HJEPAMetricsLogger(Null(), num_hierarchies=2)
    calls = {
        "prediction": lambda: logger.log_prediction_quality(preds, targs, global_step=0),
        "hierarchy": lambda: logger.log_hierarchy_feature_stats(preds, targs, global_step=0),
        "collapse": lambda: logger.log_collapse_metrics(preds[0], level=0, global_step=0),
    }
    ops = _ops_on_large_inputs(calls[call], preds[0].numel())
    # `aten::to` to the dtype a tensor already has returns it: only these copy
    copies = {n: k for n, k in ops.items() if n in ("aten::_to_copy", "aten::copy_", "aten::clone")}
    assert copies == {}, ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_metrics_synchronize_once_per_call() -> None:  # pragma: no cover - runs on a GPU machine
    import warnings

    s = _inputs(3)
    model = s["model"].cuda()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    preds = [p.cuda() for p in s["preds"]]
    logger = HJEPAMetricsLogger(Null())
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for call in (
            lambda: logger.log_prediction_quality(preds, preds, global_step=0),
            lambda: logger.log_collapse_metrics(torch.randn(4096, 64, device="cuda"), global_step=0),
            lambda: logger.log_gradient_flow(model, global_step=0),
        ):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                call()
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            assert len(syncs) <= 1, [str(w.message) for w in syncs]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_import_loads_no_backend() -> None:
    code = (
        "import sys, hjepa_metrics, writers\n"
        "print(','.join(m for m in ('tensorboard', 'wandb', 'mlflow', 'matplotlib', 'orjson', 'yaml') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == ""


def test_stability_reads_only_the_end_of_a_full_loss_history(monkeypatch: pytest.MonkeyPatch) -> None:
    """The logger's own history stays at its bound, and computing stability from it looks at the last 50
    losses (the smoothness window) only: its extremes are kept as losses come. A call costs the same at
    step 1,000,000 as at step 1,000."""
    logger = HJEPAMetricsLogger(config={"backends": []})
    losses = [2.0 + math.sin(step) for step in range(3000)]
    for loss in losses:
        logger.log_training_stability(current_loss=loss, global_step=len(losses))
    assert len(logger.loss_history) == 1000
    looked_at = Counter[str]()
    isfinite = math.isfinite

    def counted(value: float) -> bool:
        looked_at["losses"] += 1
        return isfinite(value)

    monkeypatch.setattr(math, "isfinite", counted)
    got = logger.losses.compute()
    monkeypatch.undo()
    assert looked_at["losses"] == 50  # the smoothness window
    assert got["stability/loss_spike_ratio"] == max(losses[-1000:]) / min(losses[-1000:])
    logger.close()


def test_resume_reads_only_the_tail_of_a_200k_step_run(tmp_path: Any) -> None:
    import json
    import tracemalloc

    from writers import JSONLWriter, TensorBoardWriter

    path = tmp_path / "metrics.jsonl"
    with open(path, "w", encoding="utf-8") as f:  # 200,000 steps of 20 scalars (~80 MB)
        metrics = {f"train/m{i}": 0.125 for i in range(20)}
        for step in range(200_000):
            f.write(json.dumps({"step": step, "wall_time": 1.0, "metrics": metrics}) + "\n")
    with TensorBoardWriter(tmp_path / "tb") as tb:
        for step in range(200_000):
            tb.log_scalars({"train/loss": 0.5}, step)
    tracemalloc.start()
    try:
        jsonl = JSONLWriter(path, resume=True)
        board = TensorBoardWriter(tmp_path / "tb", resume=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert jsonl.gate.last_step == 199_999 and board.gate.last_step == 199_999
    jsonl.close()
    board.close()
    assert peak < 4 * 2**20, f"resume held {peak / 2**20:.1f} MiB"  # the files are 80 MB and ~10 MB


def test_mlflow_runs_outside_the_training_interpreter(tmp_path: Any) -> None:
    pytest.importorskip("mlflow")
    script = (
        "import sys\n"
        "from hjepa_metrics import HJEPAMetricsLogger\n"
        f"with HJEPAMetricsLogger(config={{'backends': ['mlflow'], 'log_dir': {str(tmp_path)!r}}}) as lg:\n"
        "    for step in range(5):\n"
        "        lg.log_scalars({'loss': 1.0 / (step + 1)}, global_step=step)\n"
        "    print(type(lg.writer).__name__, 'mlflow' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # the MLflow client (and its Python work) lives in the writer process: never imported here
    assert done.stdout.split() == ["ProcessWriter", "False"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    run_id = (tmp_path / "mlflow_run_id").read_text()
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(5))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _stat(pid: int) -> tuple[int, int]:
    """``(session id, nice)`` of a process, from ``/proc/<pid>/stat``."""
    fields = _read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
    return int(fields[3]), int(fields[16])  # fields 6 and 19 of proc(5), after pid and comm


def _autogroup(pid: int | str) -> tuple[str, str]:
    """``(autogroup, nice)`` of a process. The kernel prints nothing for the root autogroup (processes
    of a session that never called ``setsid``, as under a container's init), whose nice is fixed at 0."""
    fields = _read(f"/proc/{pid}/autogroup").split()
    return (fields[0], fields[2]) if fields else ("/", "0")


def _descendants(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            for child in _read(f"/proc/{pid}/task/{task}/children").split():
                found += [int(child), *_descendants(int(child))]
    return found


@pytest.mark.skipif(not os.path.exists("/proc/self/autogroup"), reason="Linux autogroup scheduling")
def test_writer_processes_rank_below_training_in_the_scheduler(tmp_path: Any) -> None:
    """W&B's writer process and the service it starts run at the lowest priority: every thread at nice
    19 (what counts inside a CPU cgroup) and every session's autogroup at nice 19 (what Linux shares
    the CPU by first elsewhere). At close the autogroups go back to normal: training waits then."""
    pytest.importorskip("wandb")
    from writers import _priority, build_writers

    writer = build_writers(
        {"backends": ["wandb"], "log_dir": str(tmp_path), "wandb": {"mode": "offline", "project": "t"}}
    )
    try:
        writer.log_scalars({"loss": 1.0}, 0)
        writer.flush()
        child = writer._proc.pid  # type: ignore[attr-defined]
        processes = [child, *_descendants(child)]
        assert len(processes) >= 2, "W&B's service process was expected under its writer process"
        own_group, own_nice = _autogroup("self")
        assert _stat(child)[0] == child != os.getsid(0)  # a session (and process group) of its own
        for pid in processes:
            group, group_nice = _autogroup(pid)
            assert group != own_group and group_nice == "19", (pid, group, group_nice)
            for thread in os.listdir(f"/proc/{pid}/task"):
                nice = int(_read(f"/proc/{pid}/task/{thread}/stat").rsplit(")", 1)[1].split()[16])
                assert nice == 19, (pid, thread, nice)
        assert _stat(os.getpid())[1] == 0 and _autogroup("self") == (own_group, own_nice)  # training's own

        _priority.restore(child)  # what close() does first
        assert all(_autogroup(pid)[1] == "0" for pid in processes)
    finally:
        writer.close()


@contextmanager
def _busy_cores() -> Iterator[None]:
    """Two busy processes per core in the test's session (a neighbouring test, busy DataLoader workers),
    stopped by process id."""
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 1))
    ]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


@pytest.mark.skipif(not os.path.exists("/proc/self/autogroup"), reason="Linux autogroup scheduling")
@pytest.mark.parametrize("ending", ["flush", "close"])
def test_a_writer_process_finishes_a_flush_or_close_on_a_busy_machine(tmp_path: Any, ending: str) -> None:
    """With every core kept busy by other processes, ``flush()`` returns with every step in MLflow and
    ``close()`` with the run finished too: the writer process, at the lowest priority while training
    runs, gets its share back while training waits for it (from the start of a close, after
    ``BOOST_AFTER`` of a flush)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from writers import build_writers

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    writer = build_writers(
        {
            "backends": ["mlflow"],
            "log_dir": str(tmp_path),
            "mlflow": {"tracking_uri": uri, "experiment_name": "x"},
        }
    )
    steps = 300
    try:
        with _busy_cores():
            for step in range(steps):
                writer.log_scalars({f"m{i}": float(step + i) for i in range(20)}, step)
            getattr(writer, ending)()
            client = MlflowClient(tracking_uri=uri)
            run = client.search_runs([client.get_experiment_by_name("x").experiment_id])[0]
            assert [m.step for m in client.get_metric_history(run.info.run_id, "m19")] == list(range(steps))
            assert run.info.status == ("FINISHED" if ending == "close" else "RUNNING")
            assert writer.error_counts() == {}
    finally:
        writer.close()
