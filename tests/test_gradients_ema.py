"""Gradient flow and EMA dynamics against hand-set gradients, clip_grad_norm_ and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hjepa_metrics import ema_dynamics, gradient_flow

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TinyJEPA(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.context_encoder = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).to(dtype)
        self.predictor = nn.Linear(4, 4).to(dtype)
        self.cls_token = nn.Parameter(torch.zeros(4, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ones_gradients_give_sqrt_numel(dtype: torch.dtype) -> None:
    model = TinyJEPA(dtype)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    numel = sum(p.numel() for p in model.parameters())
    got = gradient_flow(model)
    assert got["gradient_flow/global_norm"] == pytest.approx(math.sqrt(numel), rel=1e-6)
    for module in ("context_encoder", "predictor", "cls_token"):
        assert got[f"gradient_flow/{module}_mean"] == 1.0
        assert got[f"gradient_flow/{module}_max"] == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_clip_grad_norm_and_numpy(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = TinyJEPA(dtype)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 3
    got = gradient_flow(model.named_parameters(), per_parameter=True)
    grads = {n: p.grad.double().numpy() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    total = math.sqrt(sum((g**2).sum() for g in grads.values()))
    assert got["gradient_flow/global_norm"] == pytest.approx(total, rel=1e-5)
    ref = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
    assert got["gradient_flow/global_norm"] == pytest.approx(float(ref), rel=1e-3)
    enc = np.concatenate([np.abs(g).ravel() for n, g in grads.items() if n.startswith("context_encoder.")])
    assert got["gradient_flow/context_encoder_mean"] == pytest.approx(enc.mean(), rel=1e-5)
    assert got["gradient_flow/context_encoder_max"] == pytest.approx(enc.max(), rel=1e-6)
    w = grads["predictor.weight"]
    assert got["gradients/predictor.weight_mean"] == pytest.approx(np.abs(w).mean(), rel=1e-5)
    assert got["gradients/predictor.weight_max"] == pytest.approx(np.abs(w).max(), rel=1e-6)


def test_fp16_gradient_norm_does_not_overflow() -> None:
    p = nn.Parameter(torch.zeros(10_000, dtype=torch.float16))
    p.grad = torch.full_like(p, 1000.0)  # norm 1e5 > fp16 max
    got = gradient_flow({"w": p})
    assert got["gradient_flow/global_norm"] == pytest.approx(1e5, rel=1e-5)  # float32 reduction


def test_wrapper_prefixes_stripped_and_missing_grads_skipped() -> None:
    model = TinyJEPA()
    for p in model.predictor.parameters():
        p.grad = torch.full_like(p, 2.0)
    named = [(f"module._orig_mod.{n}", p) for n, p in model.named_parameters()]
    got = gradient_flow(named)
    assert got["gradient_flow/predictor_mean"] == 2.0
    assert not any("context_encoder" in k for k in got)
    assert gradient_flow(TinyJEPA()) == {}


def test_mixed_dtypes_in_one_model() -> None:
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    a.grad = torch.full((3,), 2.0)
    b.grad = torch.full((4,), -1.0, dtype=torch.bfloat16)
    got = gradient_flow({"enc.a": a, "pred.b": b})
    assert got["gradient_flow/global_norm"] == pytest.approx(math.sqrt(12 + 4))
    assert got["gradient_flow/pred_max"] == 1.0


def test_gradient_flow_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="model"):
        gradient_flow(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_encoders_divergence_zero_ratio_one(dtype: torch.dtype) -> None:
    model = TinyJEPA(dtype)
    got = ema_dynamics(model, model, current_momentum=torch.tensor(0.996), target_momentum=1.0)
    assert got["ema/avg_parameter_divergence"] == 0.0
    assert got["ema/weight_magnitude_ratio"] == pytest.approx(1.0, rel=1e-6)
    assert got["ema/momentum_current"] == pytest.approx(0.996)
    assert got["ema/momentum_target"] == 1.0


def test_ema_against_numpy() -> None:
    torch.manual_seed(1)
    ctx, tgt = TinyJEPA(), TinyJEPA()
    c = {n: p.detach().double().numpy() for n, p in ctx.named_parameters()}
    t = {n: p.detach().double().numpy() for n, p in tgt.named_parameters()}
    got = ema_dynamics(ctx, tgt.named_parameters(), 0.99, 1.0)
    div = np.mean([np.linalg.norm(t[n] - c[n]) for n in c])
    ratio = math.sqrt(sum((v**2).sum() for v in t.values())) / math.sqrt(
        sum((v**2).sum() for v in c.values())
    )
    assert got["ema/avg_parameter_divergence"] == pytest.approx(div, rel=1e-6)
    assert got["ema/weight_magnitude_ratio"] == pytest.approx(ratio, rel=1e-6)


def test_ema_name_and_shape_mismatch_are_errors() -> None:
    ctx = TinyJEPA()
    with pytest.raises(ValueError, match=r"only in context_encoder \['predictor.bias'"):
        ema_dynamics(ctx, {n: p for n, p in ctx.named_parameters() if n != "predictor.bias"}, 0.9, 1.0)
    bad = dict(ctx.named_parameters())
    bad["predictor.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"parameter 'predictor\.bias'"):
        ema_dynamics(ctx, bad, 0.9, 1.0)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.context_encoder = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.predictor = nn.Linear(4, 2)


def _with_grads(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    return module


def _modules(flow: dict[str, float]) -> set[str]:
    return {
        t.removeprefix("gradient_flow/").rsplit("_", 1)[0]
        for t in flow
        if t.startswith("gradient_flow/") and t != "gradient_flow/global_norm"
    }


def test_module_names_are_the_nets_parts_whatever_wraps_it() -> None:
    net = _with_grads(_Net())
    bare = gradient_flow(net)
    assert _modules(bare) == {"context_encoder", "predictor"}

    class Holder(nn.Module):  # a LightningModule holding the net as self.model, beside a frozen teacher
        def __init__(self) -> None:
            super().__init__()
            self.model = net
            self.target_encoder = nn.Linear(4, 4).requires_grad_(False)

    compiled = torch.compile(net)  # `_orig_mod.` at the start; in the middle once held by another module
    holder = Holder()
    holder.model = compiled  # type: ignore[assignment]
    for wrapped in (Holder(), compiled, holder, {f"module.{n}": p for n, p in Holder().named_parameters()}):
        assert gradient_flow(wrapped) == bare, type(wrapped).__name__
    deeper = gradient_flow(net, module_depth=2)
    assert _modules(deeper) == {"context_encoder.0", "context_encoder.1", "predictor"}  # a leaf module stays
    assert deeper["gradient_flow/context_encoder.0_mean"] == 1.0


def test_fsdp1_flat_parameters_are_refused_with_what_to_use() -> None:
    flat = {"_fsdp_wrapped_module._flat_param": nn.Parameter(torch.ones(10))}
    flat["_fsdp_wrapped_module._flat_param"].grad = torch.ones(10)
    with pytest.raises(TypeError, match=r"FSDP1 .* FSDP2 \(torch.distributed.fsdp.fully_shard\)"):
        gradient_flow(flat)
    with pytest.raises(TypeError, match="FSDP1"):
        ema_dynamics(flat, flat, 0.99, 1.0)
