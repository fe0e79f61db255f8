"""Image and histogram tags that sanitise alike never overwrite each other's files (JSONL and MLflow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from writers import JSONLWriter, read_jsonl

TAGS = ["attn/map", "attn_map", "注意", "注意力"]


def _images() -> list[np.ndarray]:
    return [np.full((4, 4, 3), 40 * (i + 1), dtype=np.uint8) for i in range(len(TAGS))]


def test_jsonl_media_files_are_distinct(tmp_path: Path) -> None:
    with JSONLWriter(tmp_path) as w:
        for tag, image in zip(TAGS, _images(), strict=True):
            w.log_image(tag, image, 1)
    records = [r for r in read_jsonl(tmp_path) if r.get("kind") == "image"]
    paths = [r["path"] for r in records]
    assert [r["tag"] for r in records] == TAGS
    assert len(set(paths)) == len(TAGS)
    assert len({(tmp_path / p).read_bytes() for p in paths}) == len(TAGS)  # none overwritten


def test_mlflow_media_artifacts_are_distinct(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from writers import MLflowWriter

    with MLflowWriter(logdir=tmp_path) as w:
        for tag, image in zip(TAGS, _images(), strict=True):
            w.log_image(tag, image, 1)
        run_id, client = w.run_id, w.client
    folders = [a.path for a in client.list_artifacts(run_id, "images")]
    assert len(folders) == len(TAGS)
    assert "images/attn_map" in folders  # a tag that needed no change keeps its name
