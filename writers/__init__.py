"""Generic metric writers: TensorBoard, Weights & Biases, MLflow, JSON Lines, and fan-out.

Nothing here knows about H-JEPA: a writer takes ``{tag: float}`` and an int step. Backend packages
are imported only when a writer for them is built.
"""

from __future__ import annotations

from .adapters import MetricsLoggerWriter, writer_from
from .backends import available_backends
from .background import BackgroundWriter
from .base import Backend, BaseWriter, Location, Writer
from .config import build_writers, load_config
from .jsonl import JSONLWriter
from .mlflow import MLflowWriter
from .multi import MultiWriter
from .records import RecordError, iter_jsonl, read_jsonl
from .tensorboard import TensorBoardWriter
from .wandb import WandbWriter

__all__ = [
    "Backend",
    "BackgroundWriter",
    "BaseWriter",
    "JSONLWriter",
    "Location",
    "MLflowWriter",
    "MetricsLoggerWriter",
    "MultiWriter",
    "RecordError",
    "TensorBoardWriter",
    "WandbWriter",
    "Writer",
    "available_backends",
    "build_writers",
    "iter_jsonl",
    "load_config",
    "read_jsonl",
    "writer_from",
]
