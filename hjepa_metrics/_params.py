"""Named parameters from a module, a ``named_parameters()`` iterable or a mapping."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

NamedTensors = nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]

# DDP wraps the model as `module.`, torch.compile as `_orig_mod.`; users think in the inner names.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrappers(name: str) -> str:
    """``module._orig_mod.encoder.w`` → ``encoder.w``."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return name


def named_tensors(source: NamedTensors, name: str) -> list[tuple[str, torch.Tensor]]:
    """``(unwrapped name, tensor)`` pairs, in the source's order."""
    if isinstance(source, nn.Module):
        items: Iterable[tuple[str, torch.Tensor]] = source.named_parameters()
    elif isinstance(source, Mapping):
        items = source.items()
    elif isinstance(source, Iterable):
        items = source
    else:
        raise TypeError(
            f"{name}: got {type(source).__name__}; expected an nn.Module, a mapping of names to tensors "
            "or an iterable of (name, tensor) pairs such as named_parameters()"
        )
    out = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"{name}: got an item {type(item).__name__}; expected (name, tensor) pairs")
        out.append((strip_wrappers(str(item[0])), item[1]))
    return out


def foreach_norms(tensors: list[torch.Tensor], ord: float) -> torch.Tensor:
    """``[T]`` float32 vector of per-tensor norms with one foreach kernel per (device, dtype) group.

    The result lives on the device of the first tensor.
    """
    if not tensors:
        return torch.zeros(0)
    device = tensors[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    if len(groups) == 1:
        return _group_norms(tensors, ord, device)
    out = torch.empty(len(tensors), dtype=torch.float32, device=device)
    for idx in groups.values():
        out[torch.tensor(idx, device=device)] = _group_norms([tensors[i] for i in idx], ord, device)
    return out


def _group_norms(members: list[torch.Tensor], ord: float, device: torch.device) -> torch.Tensor:
    if members[0].dtype in (torch.float16, torch.bfloat16):
        # half-precision norms overflow (fp16 at 65504): reduce in float32
        members = [m.float() for m in members]
    return torch.stack(torch._foreach_norm(members, ord)).to(device=device, dtype=torch.float32)
