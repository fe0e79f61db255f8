"""Two gloo processes with FSDP2 and DDP: every logged value equals the single-process computation on the
concatenated data, with one collective per call; a call made on rank 0 only is reported, not silent."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import free_port
from torch import nn

import hjepa_metrics as hm
from writers import read_jsonl

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")


class Net(nn.Module):
    """A toy H-JEPA: a context encoder and a predictor (the target encoder is an EMA copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.context_encoder = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16))
        self.predictor = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.context_encoder(x))


def _models() -> tuple[Net, nn.Module]:
    torch.manual_seed(0)
    model = Net()
    target = copy.deepcopy(model.context_encoder)
    with torch.no_grad():
        for i, p in enumerate(target.parameters()):
            p.mul_(0.9 + 0.01 * i).add_(0.001 * i)
    return model, target


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(4, 8, generator=gen), torch.randn(4, 3, generator=gen)


def _init(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)


def _fsdp_worker(rank: int, port: int, log_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    _init(rank, port)
    try:
        model, target = _models()
        for module in (model.context_encoder[0], model.context_encoder[2], model.predictor, model):
            fully_shard(module)
        for module in (target[0], target[2], target):
            fully_shard(module)
        x, y = _batch(rank)
        F.mse_loss(model(x), y).backward()
        replicated = _replicated_parameter()
        calls = _count_collectives()
        logger = hm.HJEPAMetricsLogger(
            config={"log_dir": log_dir, "backends": ["jsonl"]},
            num_hierarchies=1,
            per_parameter_gradients=True,
        )
        logger.log_gradient_flow({**dict(model.named_parameters()), "scale.w": replicated}, global_step=1)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)  # a DTensor norm
        assert type(norm).__name__ == "DTensor"
        logger.log_gradient_clipping(norm, norm.clamp(max=0.05), clip_threshold=0.05, global_step=1)
        logger.log_ema_dynamics(model.context_encoder, target, 0.99, 1.0, global_step=1)
        assert calls() == 3  # one all-reduce per call, never a gather of the parameters
        logger.close()
    finally:
        dist.destroy_process_group()


def _replicated_parameter() -> nn.Parameter:
    """A parameter held whole by every rank as a ``Replicate`` DTensor (tensor-parallel style)."""
    values, grad = torch.arange(3.0), torch.tensor([2.0, -4.0, 0.5])
    if not dist.is_initialized():
        param = nn.Parameter(values)
        param.grad = grad
        return param
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    param = nn.Parameter(distribute_tensor(values, mesh, [Replicate()]))
    param.grad = distribute_tensor(grad, mesh, [Replicate()])
    return param


def _count_collectives() -> Any:
    """Counts every torch.distributed collective this process makes from now on."""
    seen = {"n": 0}
    names = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor")
    for name in names:
        original = getattr(dist, name)

        def counted(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            seen["n"] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    return lambda: seen["n"]


def _logged(log_dir: Path, step: int = 1) -> dict[str, float]:
    return {
        k: v for r in read_jsonl(log_dir) if r.get("step") == step for k, v in r.get("metrics", {}).items()
    }


def test_fsdp2_statistics_equal_the_unsharded_model(tmp_path: Path) -> None:
    mp.spawn(_fsdp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    logged = _logged(tmp_path)
    assert not list(tmp_path.glob("*rank1*"))

    model, target = _models()  # the same model, unsharded, on the concatenated batch
    xs, ys = zip(*(_batch(r) for r in range(WORLD)), strict=True)
    F.mse_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
    want = hm.gradient_flow(
        {**dict(model.named_parameters()), "scale.w": _replicated_parameter()}, per_parameter=True
    )
    assert "gradients/scale.w_mean" in want  # a Replicate DTensor counted once, not once per rank
    want.pop("gradient_flow/global_norm")  # with the extra parameter; the clip norm is checked below
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05))
    want.update(hm.gradient_clipping(norm, min(norm, 0.05), 0.05))
    want.update(hm.ema_dynamics(model.context_encoder, target, 0.99, 1.0))
    assert {"context_encoder", "predictor"} == {
        t.split("/")[1].rsplit("_", 1)[0] for t in want if "flow/c" in t or "flow/p" in t
    }
    for tag, value in want.items():
        assert logged["train/" + tag] == pytest.approx(value, rel=1e-5, abs=1e-7), tag
    extra = float(torch.tensor([2.0, -4.0, 0.5]).square().sum())
    assert logged["train/gradient_flow/global_norm"] == pytest.approx((norm**2 + extra) ** 0.5, rel=1e-6)


def _ddp_worker(rank: int, port: int, log_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    _init(rank, port)
    try:
        model, target = _models()
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        logger = hm.HJEPAMetricsLogger(config={"log_dir": log_dir, "backends": ["jsonl"]}, num_hierarchies=2)
        x, y = _batch(rank)
        loss = F.mse_loss(ddp(x), y)
        loss.backward()
        calls = _count_collectives()
        losses = _losses(rank)
        for value in losses["loss"]:  # the last call's values are read back: over all three
            logger.log_training_stability(current_loss=torch.tensor(value), global_step=1)
        # as a training step has them: tensors that require grad
        weight = torch.ones((), requires_grad=True)
        logger.log_hierarchical_losses({k: weight * v[-1] for k, v in losses.items()}, global_step=1)
        logger.log_learning_rate(optimizer, global_step=1)
        logger.log_gradient_flow(ddp, global_step=1)
        logger.log_ema_dynamics(ddp.module.context_encoder, target, 0.99, 1.0, global_step=1)
        logger.log_performance_metrics(4 + 2 * rank, 0.1 + 0.2 * rank, 0.05, global_step=1)
        logger.log_hierarchy_feature_stats(_levels(rank), global_step=1)
        assert calls() == len(losses["loss"]) + 6
        logger.close()
    finally:
        dist.destroy_process_group()


def _losses(rank: int) -> dict[str, list[float]]:
    return {
        "loss": [1.0 + rank, 0.8 + rank, 0.7 + 2 * rank],
        "loss_h0": [0.6, 0.5, 0.4 + rank],
        "loss_h1": [0.4, 0.3, 0.3 - 0.1 * rank],
    }


def _levels(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7 + rank)
    return [torch.randn(3 + rank, n, 5, generator=gen) * (1 + rank) + rank for n in (6, 2)]


def test_ddp_values_describe_the_global_batch(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    logged = _logged(tmp_path)

    per_rank = [_losses(r) for r in range(WORLD)]
    mean = {k: [sum(p[k][i] for p in per_rank) / WORLD for i in range(3)] for k in per_rank[0]}
    want = hm.hierarchical_losses({k: v[-1] for k, v in mean.items()})
    want.update(hm.training_stability(mean["loss"]))
    model, target = _models()
    xs, ys = zip(*(_batch(r) for r in range(WORLD)), strict=True)
    F.mse_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
    want.update(hm.gradient_flow(model))
    want.update(hm.ema_dynamics(model.context_encoder, target, 0.99, 1.0))
    want.update(hm.learning_rate(torch.optim.SGD(model.parameters(), lr=0.1)))
    want.update(hm.performance_metrics(4 + 6, (0.1 + 0.3) / 2, 0.05))  # batches summed, times averaged
    levels = [torch.cat([_levels(r)[i] for r in range(WORLD)]) for i in range(2)]
    want.update(hm.hierarchy_feature_stats(levels))
    for tag, value in want.items():
        assert logged["train/" + tag] == pytest.approx(value, rel=1e-6, abs=1e-9), tag
    assert not (tmp_path / "metrics.rank1.jsonl").exists()


def _lonely_worker(rank: int, port: int, log_dir: str) -> None:
    import time

    _init(rank, port)
    handler = logging.FileHandler(Path(log_dir) / f"log{rank}.txt")
    logging.getLogger("hjepa_metrics").addHandler(handler)
    try:
        logger = hm.HJEPAMetricsLogger(config={"log_dir": log_dir, "backends": ["jsonl"]}, num_hierarchies=1)
        logger.collective_warning = 1.0
        if rank == 1:
            time.sleep(4.0)  # rank 0 logs alone meanwhile: the mistake, caught in the act
        logger.log_hierarchical_losses({"loss": 1.0, "loss_h0": 1.0}, global_step=1)
        logger.close()
    finally:
        handler.close()
        dist.destroy_process_group()


def test_a_call_on_rank_0_only_is_reported_not_silent(tmp_path: Path) -> None:
    mp.spawn(_lonely_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    said = (tmp_path / "log0.txt").read_text()
    assert "rank 0 has waited 1 s for the other 1 rank(s) in a logging call (RankReduce)" in said
    assert "under `if rank == 0:`" in said


def _validation_worker(rank: int, port: int, log_dir: str) -> None:
    from torch.utils.data import DataLoader, DistributedSampler

    _init(rank, port)
    try:
        data = _validation_data()
        sampler = DistributedSampler(range(len(data)), shuffle=False)  # pads rank 1 with a copy
        loader = DataLoader(list(range(len(data))), batch_size=2, sampler=sampler)
        valid = hm.sampler_valid_mask(sampler)
        logger = hm.HJEPAMetricsLogger(config={"log_dir": log_dir, "backends": ["jsonl"]}, num_hierarchies=1)
        val = logger.validation()
        for i, index in enumerate(loader):
            batch = data[index]
            val.update([batch], [batch.flip(-1)], features=batch, valid=valid[2 * i : 2 * i + len(index)])
        val.log(global_step=3)
        logger.close()
    finally:
        dist.destroy_process_group()


def _validation_data() -> torch.Tensor:
    return torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(5))


def test_validation_leaves_out_the_samplers_padding(tmp_path: Path) -> None:
    mp.spawn(_validation_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    logged = _logged(tmp_path, step=3)
    data = _validation_data()  # 5 samples on 2 ranks: 3 + 2, plus one padding copy
    want = {**hm.prediction_quality([data], [data.flip(-1)]), **hm.collapse_metrics(data)}
    for tag, value in want.items():
        if not tag.endswith("max_similarity"):
            assert logged["val/" + tag] == pytest.approx(value, rel=1e-9, abs=1e-12), tag
