"""``log_embedding``: the sample and its PCA against a float64 numpy oracle, and every backend read back
(TensorBoard's projector plugin on a live server, the W&B table, MLflow artifacts, JSONL, replay, report)."""

from __future__ import annotations

import json
import math
import os
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port, tensorboard_server

import hjepa_metrics as hm
from hjepa_metrics.collapse import CollapseAccumulator
from hjepa_metrics.replay import replay
from hjepa_metrics.report import build_report
from writers import JSONLWriter, TensorBoardWriter, read_jsonl

TAG = "train/collapse/level1_embedding"


def _features(rows: int = 600, dim: int = 12, seed: int = 0) -> torch.Tensor:
    """Rows with a few dominant directions, so the principal axes are well separated."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([6.0, 3.0] + [0.5] * (dim - 2))
    return torch.randn(rows, dim, generator=gen) * scale + 0.3


def _pca_oracle(all_rows: np.ndarray, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of ``sample`` on the top-2 principal axes of all rows' unit vectors, and the share
    of the variance on each: numpy float64, signs fixed as the library fixes them."""
    u = all_rows / np.maximum(np.linalg.norm(all_rows, axis=1, keepdims=True), 1e-8)
    mean = u.mean(axis=0)
    cov = (u - mean).T @ (u - mean) / (len(u) - 1)
    values, vectors = np.linalg.eigh(cov)
    axes = vectors[:, ::-1][:, :2].copy()
    for k in range(2):
        if axes[np.argmax(np.abs(axes[:, k])), k] < 0:
            axes[:, k] *= -1
    s = sample / np.maximum(np.linalg.norm(sample, axis=1, keepdims=True), 1e-8)
    return (s - mean) @ axes, values[::-1][:2] / np.trace(cov)


def test_sample_labels_follow_their_rows_and_pca_matches_numpy(tmp_path: Path) -> None:
    x = _features().reshape(6, 100, 12)  # [B, N, D]: rows are flattened
    index = torch.arange(600).reshape(6, 100)
    with hm.HJEPAMetricsLogger(JSONLWriter(tmp_path / "m.jsonl")) as logger:
        p = logger.log_embedding(x, level=1, global_step=3, metadata=index, max_rows=200)
    flat = x.reshape(-1, 12).double().numpy()
    assert p.rows.shape == (200, 12) and p.labels is not None and len(set(p.labels)) == 200
    rows = [int(label) for label in p.labels]
    np.testing.assert_array_equal(p.rows.numpy(), flat[rows].astype(np.float32))  # each label is its row
    coords, shares = _pca_oracle(flat, flat[rows])
    np.testing.assert_allclose(p.coords.numpy(), coords, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(p.explained, shares, rtol=1e-9)
    # the sampler is max_similarity's: the same rows however the batches are split
    acc = CollapseAccumulator(level=1, max_similarity_rows=200, seed=0)
    for part in x.reshape(-1, 12).split(77):
        acc.update(part)
    np.testing.assert_array_equal(acc.sample[0].numpy(), p.rows.numpy())


def test_string_labels_and_all_rows_when_there_are_few(tmp_path: Path) -> None:
    x = _features(rows=40, dim=5)
    names = [f"class {i % 3}" for i in range(40)]
    with hm.HJEPAMetricsLogger(JSONLWriter(tmp_path / "m.jsonl")) as logger:
        p = logger.log_embedding(x, level=0, global_step=1, metadata=names)
    assert p.labels == names  # fewer rows than max_rows: every row, in order
    np.testing.assert_array_equal(p.rows.numpy(), x.numpy())


def test_rows_with_nan_are_left_out_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    x = _features(rows=60, dim=6)
    x[[3, 17], 2] = math.nan
    x[40, 0] = math.inf
    with hm.HJEPAMetricsLogger(JSONLWriter(tmp_path / "m.jsonl")) as logger:
        p = logger.log_embedding(x, level=2, global_step=1, metadata=torch.arange(60))
        assert p is not None and "3 of 60 rows hold NaN/inf values" in caplog.text
        kept = [i for i in range(60) if i not in (3, 17, 40)]
        assert p.labels == [str(i) for i in kept]
        coords, _ = _pca_oracle(x[kept].double().numpy(), x[kept].double().numpy())
        np.testing.assert_allclose(p.coords.numpy(), coords, rtol=1e-9, atol=1e-12)
        caplog.clear()
        assert logger.log_embedding(torch.full((5, 6), math.nan), level=2, global_step=2) is None
        assert "no finite row of level 2" in caplog.text
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl") if r.get("kind") == "embedding"] == [1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_rows": 1}, "max_rows: got 1; expected at least 2"),
        ({"metadata": ["a"] * 7}, "labels: got 7 values; expected one per feature row (40)"),
    ],
)
def test_bad_input_is_named(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    pattern = message.replace("(", r"\(").replace(")", r"\)")
    with (
        hm.HJEPAMetricsLogger(JSONLWriter(tmp_path / "m.jsonl")) as logger,
        pytest.raises(ValueError, match=pattern),
    ):
        logger.log_embedding(_features(rows=40, dim=5), **kwargs)  # type: ignore[arg-type]


def test_projector_files_are_served_by_a_live_tensorboard(tmp_path: Path) -> None:
    x = _features()
    labels = [f"img{i}\twith a tab" for i in range(600)]
    writer = TensorBoardWriter(tmp_path / "run")
    assert "Projector" not in str(writer.locations()[0])
    with hm.HJEPAMetricsLogger(writer) as logger:
        first = logger.log_embedding(x, level=1, global_step=10, metadata=labels, max_rows=64)
        second = logger.log_embedding(x * 2, level=1, global_step=20, max_rows=64)
    assert first is not None and second is not None
    assert "embeddings: Projector tab" in str(writer.locations()[0])  # the run's "where to look" line
    with tensorboard_server(tmp_path) as get:
        deadline = time.monotonic() + 60
        while not (runs := json.loads(get("/data/plugin/projector/runs"))) and time.monotonic() < deadline:
            time.sleep(0.5)  # the run is listed once the server has read its event file
        assert runs == ["run"]
        config = json.loads(get("/data/plugin/projector/info?run=run"))
        names = [e["tensorName"] for e in config["embeddings"]]
        assert names == [f"{TAG}:10", f"{TAG}:20"]
        assert config["embeddings"][0]["tensorShape"] == [64, 12]
        for name, p in ((f"{TAG}:10", first), (f"{TAG}:20", second)):
            query = urllib.parse.urlencode({"run": "run", "name": name})
            served = np.frombuffer(get(f"/data/plugin/projector/tensor?{query}"), dtype=np.float32)
            np.testing.assert_array_equal(served.reshape(64, 12), p.rows.numpy())
        query = urllib.parse.urlencode({"run": "run", "name": f"{TAG}:10"})
        metadata = get(f"/data/plugin/projector/metadata?{query}").decode().splitlines()
        assert metadata == [label.replace("\t", " ") for label in first.labels or []]
    # the PCA scatter is an image summary beside it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("train/collapse/level1_pca")] == [10, 20]


def test_wandb_table_and_mlflow_artifacts_read_back(tmp_path: Path) -> None:
    import wandb_reader
    from mlflow.tracking import MlflowClient

    config = {
        "log_dir": str(tmp_path),
        "backends": ["jsonl", "mlflow", "wandb"],
        "wandb": {"mode": "offline", "project": "p"},
    }
    x = _features(rows=90, dim=6)
    with hm.HJEPAMetricsLogger(config=config) as logger:
        p = logger.log_embedding(x, level=1, global_step=7, metadata=[f"c{i % 4}" for i in range(90)])
    labels = p.labels or []

    rows = [r for r in wandb_reader.history(tmp_path) if f"{TAG}/_type" in r]
    assert [(r["global_step"], r[f"{TAG}/_type"]) for r in rows] == [(7, "table-file")]
    table_file = next(tmp_path.rglob(f"files/{rows[0][f'{TAG}/path']}"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["label", *(f"d{i}" for i in range(6))]
    assert [r[0] for r in table["data"]] == labels
    np.testing.assert_allclose(np.array([r[1:] for r in table["data"]]), p.rows.numpy(), rtol=1e-6)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    local = Path(client.download_artifacts(run_id, "embeddings", str(tmp_path / "dl")))
    (folder,) = {f.parent for f in local.rglob("tensors.tsv")}
    assert folder.name == "step_0000000007"
    np.testing.assert_allclose(np.loadtxt(folder / "tensors.tsv", delimiter="\t"), p.rows.numpy(), rtol=1e-6)
    assert (folder / "metadata.tsv").read_text().splitlines() == labels
    images = Path(client.download_artifacts(run_id, "images", str(tmp_path / "img")))
    assert [f.name for f in images.rglob("*.png")] == ["step_0000000007.png"]


def test_jsonl_replay_report_and_html_page(tmp_path: Path) -> None:
    x = _features()
    with hm.HJEPAMetricsLogger(JSONLWriter(tmp_path / "run" / "metrics.jsonl")) as logger:
        logger.log_collapse_metrics(x, level=1, global_step=5)
        p = logger.log_embedding(x, level=1, global_step=5, metadata=list(range(600)), max_rows=50)
    (record,) = [r for r in read_jsonl(tmp_path / "run") if r.get("kind") == "embedding"]
    assert (record["tag"], record["step"], record["rows"], record["dim"]) == (TAG, 5, 50, 12)

    with TensorBoardWriter(tmp_path / "replayed") as writer:
        counts = replay(tmp_path / "run", writer)
    assert counts["embedding"] == 1 and counts["image"] == 1
    (tsv,) = (tmp_path / "replayed" / "projector").rglob("tensors.tsv")
    np.testing.assert_allclose(np.loadtxt(tsv, delimiter="\t"), p.rows.numpy(), rtol=1e-6)
    assert (tsv.parent / "metadata.tsv").read_text().splitlines() == p.labels

    report = build_report(tmp_path / "run", tmp_path / "report", html=True)
    assert [f.name for f in report.figures][-1].endswith("_embeddings_pca.png")
    assert report.page is not None
    page = report.page.read_text()
    assert "embeddings_pca" in page and page.count("data:image/png;base64,") == len(report.figures)


def _ranks(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x = _features(rows=300, seed=rank)
        ids = torch.arange(300) + 1000 * rank  # a label that says which rank's row it is
        with hm.HJEPAMetricsLogger(config={"log_dir": f"{out}/rank{rank}", "backends": ["jsonl"]}) as logger:
            p = logger.log_embedding(x, level=1, global_step=1, metadata=ids, max_rows=100)
            torch.save({"rows": p.rows, "labels": p.labels, "coords": p.coords}, f"{out}/rank{rank}.pt")
            with pytest.raises(ValueError, match="strings cannot be gathered"):
                logger.log_embedding(x, level=1, metadata=["a"] * 300)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_ranks_merge_their_samples_with_labels_and_one_gram(tmp_path: Path) -> None:
    mp.spawn(_ranks, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert got[0]["labels"] == got[1]["labels"]  # every rank returns the same merged sample
    data = [_features(rows=300, seed=r).double().numpy() for r in range(2)]
    labels = [int(label) for label in got[0]["labels"]]
    assert {label // 1000 for label in labels} == {0, 1}  # rows of both ranks
    want_rows = np.stack([data[label // 1000][label % 1000] for label in labels])
    np.testing.assert_array_equal(got[0]["rows"].numpy(), want_rows.astype(np.float32))
    coords, _ = _pca_oracle(np.concatenate(data), want_rows)  # axes from the Gram of both ranks' rows
    np.testing.assert_allclose(got[0]["coords"].numpy(), coords, rtol=1e-9, atol=1e-12)
    assert not os.path.exists(tmp_path / "rank1")  # only rank 0 writes
    assert [r["rows"] for r in read_jsonl(tmp_path / "rank0") if r.get("kind") == "embedding"] == [100]
