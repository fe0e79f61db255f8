"""Generic metric writers: TensorBoard, Weights & Biases, MLflow, JSON Lines, and fan-out.

Nothing here knows about H-JEPA: a writer takes ``{tag: float}`` and an int step. Backend packages
are imported only when a writer for them is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .background import BackgroundWriter
from .base import BaseWriter, Writer
from .config import build_writers, load_config
from .jsonl import JSONLWriter, read_jsonl
from .multi import MultiWriter

if TYPE_CHECKING:
    from .mlflow import MLflowWriter
    from .tensorboard import TensorBoardWriter
    from .wandb import WandbWriter

_LAZY = {"TensorBoardWriter": "tensorboard", "WandbWriter": "wandb", "MLflowWriter": "mlflow"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'writers' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)


__all__ = [
    "BackgroundWriter",
    "BaseWriter",
    "JSONLWriter",
    "MLflowWriter",
    "MultiWriter",
    "TensorBoardWriter",
    "WandbWriter",
    "Writer",
    "build_writers",
    "load_config",
    "read_jsonl",
]
