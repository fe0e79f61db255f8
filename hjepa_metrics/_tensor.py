"""Input conversion and the single device-to-host transfer every metric function ends with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray
Scalar = float | int | torch.Tensor | np.ndarray | np.generic


def as_tensor(x: object, name: str) -> torch.Tensor:
    """Return ``x`` as a detached tensor without copying torch inputs (numpy arrays are wrapped).

    A replicated DTensor (the norm ``clip_grad_norm_`` returns under FSDP2) is its local copy; a
    sharded one is refused, as its statistics would be those of one shard."""
    if type(x) is torch.Tensor:  # the common case, without the DTensor attribute probe
        return x.detach() if x.requires_grad else x
    if isinstance(x, torch.Tensor):
        placements = getattr(x, "placements", None)
        if placements is not None and hasattr(x, "to_local"):
            if not all(p.is_replicate() for p in placements):
                raise ValueError(
                    f"{name}: got a DTensor sharded as {tuple(placements)}; expected a plain tensor or a "
                    "replicated DTensor (pass .full_tensor() for a small tensor)"
                )
            local: torch.Tensor = x.to_local()  # type: ignore[attr-defined]
            return local.detach()
        # detach() is a dispatcher call (~5 µs): metrics take many small tensors per call
        return x.detach() if x.requires_grad else x
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name}: got a numpy array of dtype object; expected a numeric array")
        # torch refuses read-only numpy memory; a copy is cheaper than the warning dance.
        return torch.from_numpy(x if x.flags.writeable else x.copy())
    if isinstance(x, (bool, int, float, np.generic)):
        return torch.tensor(float(x), dtype=torch.float64)
    raise TypeError(f"{name}: got {type(x).__name__}; expected a torch.Tensor or numpy array")


def as_features(x: object, name: str, *, min_dims: int = 2) -> torch.Tensor:
    """A floating tensor with at least ``min_dims`` dims; integer/bool input is promoted to float32."""
    t = as_tensor(x, name)
    if t.dim() < min_dims:
        raise ValueError(f"{name}: got shape {tuple(t.shape)}; expected at least {min_dims} dims")
    if not t.is_floating_point():
        if t.is_complex():
            raise TypeError(f"{name}: got complex dtype {t.dtype}; expected a real dtype")
        t = t.to(torch.float32)
    return t


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def accumulate_dtype(device: torch.device) -> torch.dtype:
    """float64 for reductions and packing, except on devices without it (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def scalar_tensor(x: Scalar, name: str) -> torch.Tensor | float:
    """A 0-d tensor (kept on its device) or a Python float; rejects tensors with more than one element.

    A 0-d tensor that requires grad (a loss) is returned as it is: the callers only read it or pack
    it for a reduction, and a ``detach()`` per value would cost more than the read."""
    if type(x) is torch.Tensor and x.dim() == 0:
        return x
    if isinstance(x, (torch.Tensor, np.ndarray)):
        t = as_tensor(x, name)
        if t.dim() == 0:
            return t
        if t.numel() != 1:
            raise ValueError(f"{name}: got shape {tuple(t.shape)}; expected a scalar (one element)")
        return t.reshape(())
    if isinstance(x, (bool, int, float, np.generic)):
        return float(x)
    raise TypeError(f"{name}: got {type(x).__name__}; expected a float, int, or one-element tensor")


# Whether CPU tensors go through the one packed read that accelerators need (tests count the reads of
# that path on the CPU); item() per value is cheaper where no transfer is involved.
PACK_CPU_READS = False


def to_host(values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Resolve every tensor value with one device-to-host transfer; floats pass through.

    Tensors are stacked on the device of the first one (float64 where the device has it) and
    read back with a single ``tolist()``, so a call costs one synchronization, not one per tag.
    CPU tensors, which need no transfer, are read one ``item()`` each (unless :data:`PACK_CPU_READS`).
    """
    out: dict[str, float] = {}
    pending: list[str] = []
    for k, v in values.items():
        if type(v) is float:  # before isinstance(v, Tensor), which costs more for a non-tensor
            out[k] = v
        elif not isinstance(v, torch.Tensor):
            out[k] = float(v)
        elif v.is_cpu and not PACK_CPU_READS:  # reading CPU memory is no transfer: no stacking
            x = v.item()
            out[k] = x if type(x) is float else float(x)
        else:
            pending.append(k)
    if not pending:
        return out
    tensors: list[torch.Tensor] = [values[k] for k in pending]  # type: ignore[misc]
    device = tensors[0].device
    if all(t.dim() == 0 and t.device == device for t in tensors):
        # stack promotes mixed dtypes; tolist() reads any float dtype exactly: no cast needed
        packed = torch.stack(tensors)
    else:
        dtype = accumulate_dtype(device)
        packed = torch.stack([_as_scalar(t, device, dtype) for t in tensors])
    out.update(zip(pending, host_list(packed), strict=True))
    return {k: out[k] for k in values}


def _as_scalar(v: torch.Tensor | float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    assert isinstance(v, torch.Tensor)
    return v.reshape(()).to(device=device, dtype=dtype)


def host_list(t: torch.Tensor) -> list[float]:
    """The one place metric code reads device memory (tests count calls to it)."""
    return [float(v) for v in t.reshape(-1).tolist()]


def level_list(x: object, name: str) -> list[Any]:
    """Per-level inputs: a list/tuple of arrays, or one array meaning a single level."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return [x]
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return list(x)
    raise TypeError(f"{name}: got {type(x).__name__}; expected a list of per-level tensors or one tensor")
