"""Shared test helpers: input conversion and oracles' view of the input, ports and started processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_group(proc: subprocess.Popen[bytes], grace: float = 20) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it forked: SIGTERM to its
    group, then SIGKILL if it is still there after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def tensorboard_server(logdir: Path) -> Iterator[Callable[[str], bytes]]:
    """A real ``tensorboard --logdir logdir`` on a free local port, stopped (by process group) on exit.
    Yields ``get(path) -> bytes`` for its HTTP API, retried while the server starts (up to 90 s)."""
    port = free_port()
    exe = Path(sys.executable).with_name("tensorboard")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tensorboard.main"]
    proc = subprocess.Popen(
        [*cmd, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90

    def get(path: str) -> bytes:
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "tensorboard exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
                    data: Any = resp.read()
                    return bytes(data)
            except OSError:  # refused while it starts; a plugin may answer an error until it has read
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    try:
        yield get
    finally:
        stop_group(proc, grace=15)
