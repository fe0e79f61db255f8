"""Shared test helpers: input conversion and oracles' view of the input."""

from __future__ import annotations

import numpy as np
import torch

INPUT_KINDS = ("float32", "float16", "bfloat16", "numpy")


def convert(x: torch.Tensor, kind: str) -> torch.Tensor | np.ndarray:
    """The same values as a float32/float16/bfloat16 tensor or a float32 numpy array."""
    if kind == "numpy":
        return x.to(torch.float32).numpy()
    return x.to(getattr(torch, kind))


def as_float64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The values a metric actually received, in float64 (the oracle's input)."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    return x.to(torch.float64).numpy()


# Metrics compute in float32 (float64 for collapse); the oracle sees the already-rounded input.
RTOL = 2e-5
