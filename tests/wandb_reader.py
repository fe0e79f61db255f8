"""A reader for W&B's offline ``run-<id>.wandb`` file (wandb ships none): leveldb-log framing of
``wandb_internal_pb2.Record`` protos. Used by the tests to read back what the writer logged."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7  # ":W&B", 0xBEE1 (little endian), version 0
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    out = []
    pos = HEADER
    pending = b""
    while pos + RECORD_HEADER.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER.size:  # block trailer padding
            pos += left_in_block
            continue
        _, length, kind = RECORD_HEADER.unpack_from(data, pos)
        pos += RECORD_HEADER.size
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        else:
            break
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(pending)
        out.append(rec)
        pending = b""
    return out


def _value(text: str) -> Any:
    return json.loads(
        text, parse_constant=lambda c: {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[c]
    )


def history(run_dir: Path) -> list[dict[str, Any]]:
    """History rows of the single ``run-*.wandb`` file under ``run_dir`` (searched recursively)."""
    files = sorted(Path(run_dir).rglob("run-*.wandb"))
    assert files, f"no .wandb file under {run_dir}"
    rows = []
    for f in files:
        for rec in records(f):
            if rec.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        "/".join(item.nested_key) if item.nested_key else item.key: _value(item.value_json)
                        for item in rec.history.item
                    }
                )
    return rows


def config(run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in sorted(Path(run_dir).rglob("run-*.wandb")):
        for rec in records(f):
            kind = rec.WhichOneof("record_type")
            updates = (
                rec.config.update if kind == "config" else rec.run.config.update if kind == "run" else []
            )
            for item in updates:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                out[key] = _value(item.value_json)
    return out


def exit_codes(run_dir: Path) -> list[int]:
    return [
        rec.exit.exit_code
        for f in sorted(Path(run_dir).rglob("run-*.wandb"))
        for rec in records(f)
        if rec.WhichOneof("record_type") == "exit"
    ]


def metric_summaries(run_dir: Path) -> dict[str, set[str]]:
    """``define_metric`` summaries per metric name: ``{"train/loss/total": {"min"}, ...}``."""
    out: dict[str, set[str]] = {}
    for f in sorted(Path(run_dir).rglob("run-*.wandb")):
        for rec in records(f):
            if rec.WhichOneof("record_type") == "metric" and rec.metric.name:
                kinds = {
                    k
                    for k in ("min", "max", "mean", "last", "best", "none", "copy")
                    if getattr(rec.metric.summary, k, False)
                }
                if kinds:
                    out[rec.metric.name] = kinds
    return out
