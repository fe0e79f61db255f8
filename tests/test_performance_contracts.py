"""Structural performance contracts (timings live in benchmarks/): host transfers, foreach, lazy imports."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

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
def test_one_host_transfer_per_logger_call(levels: int) -> None:
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


def test_gradient_flow_uses_foreach_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _inputs(1)
    calls: list[int] = []
    original = torch._foreach_norm

    def counting(tensors: list[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        calls.append(len(tensors))
        return original(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    logger = HJEPAMetricsLogger(Null())
    logger.log_gradient_flow(s["model"], global_step=0)
    assert calls == [200, 200, 200]  # L1, L2 and max norms, each one kernel over all 200 tensors


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
