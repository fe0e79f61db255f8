"""W&B (offline .wandb file read back) and MLflow (MlflowClient on sqlite) writers."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import wandb_reader

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

from writers.mlflow import MLflowWriter, sanitize_key
from writers.wandb import WandbWriter


def test_wandb_offline_rows_steps_nan_and_regressions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with WandbWriter(
        project="p", mode="offline", dir=tmp_path, name="r1", tags=["a"], config={"lr": 0.1}
    ) as w:
        w.log_scalars({"train/loss/total": 1.0, "train/x": math.nan}, 0)
        w.log_scalars({"train/loss/h0": 0.5}, 0)  # same step: merged into one row
        w.log_scalars({"train/loss/total": 0.5, "train/inf": math.inf}, 10)
        w.log_histogram("feature_distributions/level0", np.arange(100.0), 10)
        w.log_image("patches/detailed_analysis", np.zeros((4, 4, 3), dtype=np.uint8), 10)
        w.log_scalars({"train/loss/total": 0.75}, 5)  # lower than 10: kept, warned
        w.log_config({"model": {"dim": 8}})
    rows = wandb_reader.history(tmp_path)
    assert [r["global_step"] for r in rows] == [0, 10, 5]
    assert (
        rows[0]["train/loss/total"] == 1.0
        and rows[0]["train/loss/h0"] == 0.5
        and math.isnan(rows[0]["train/x"])
    )
    assert rows[1]["train/inf"] == math.inf
    # media are stored as nested keys: <tag>/_type, <tag>/values, ...
    assert rows[1]["feature_distributions/level0/_type"] == "histogram"
    assert sum(rows[1]["feature_distributions/level0/values"]) == 100
    assert (
        rows[1]["feature_distributions/level0/bins"][0] == 0
        and rows[1]["feature_distributions/level0/bins"][-1] == 99
    )
    assert rows[1]["patches/detailed_analysis/_type"] == "image-file"
    assert rows[2]["train/loss/total"] == 0.75
    assert "step 5 is lower than the previous step 10" in caplog.text
    cfg = wandb_reader.config(tmp_path)
    assert cfg["lr"] == 0.1 and cfg["model"] == {"dim": 8}
    assert wandb_reader.exit_codes(tmp_path) == [0]
    assert list(tmp_path.rglob("custom_scalars_layout.json")) == []  # only written when asked


def test_wandb_failed_block_exits_non_zero(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), WandbWriter(project="p", mode="offline", dir=tmp_path) as w:
        w.log_scalars({"a": 1.0}, 1)
        w.log_layout({"category": []})
        raise RuntimeError("training blew up")
    assert wandb_reader.exit_codes(tmp_path) == [1]
    assert len(list(tmp_path.rglob("custom_scalars_layout.json"))) == 1


def _client(tmp_path: Path):  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")


def test_mlflow_metrics_batches_keys_and_status(tmp_path: Path) -> None:
    with MLflowWriter(logdir=tmp_path, experiment_name="exp", run_name="r") as w:
        for step in range(3):
            w.log_scalars({"train/loss/total": 1.0 / (step + 1), "train/nan": math.nan}, step)
        w.log_scalars({"train/inf": math.inf, "train/grad(norm)@l2": 2.0, "train/grad[norm]@l2": 3.0}, 3)
        w.log_scalars({f"train/many/{i}": float(i) for i in range(2500)}, 4)  # > one log_batch
        w.log_config({"model": {"dim": 384}, "lr": 1e-3})
        run_id = w.run_id
    client = _client(tmp_path)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    history = client.get_metric_history(run_id, "train/loss/total")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert all(isinstance(m.step, int) for m in history)
    assert math.isnan(client.get_metric_history(run_id, "train/nan")[0].value)
    assert client.get_metric_history(run_id, "train/inf")[0].value == sys.float_info.max  # sqlite clamps inf
    # two tags sanitizing to one key both survive, under distinct keys
    assert client.get_metric_history(run_id, "train/grad_norm__l2")[0].value == 2.0
    keys = [k for k in run.data.metrics if k.startswith("train/grad_norm__l2_")]
    assert len(keys) == 1 and run.data.metrics[keys[0]] == 3.0
    assert run.data.metrics["train/many/2499"] == 2499.0
    assert run.data.params == {"model.dim": "384", "lr": "0.001"}


def test_mlflow_images_histograms_layout_artifacts(tmp_path: Path) -> None:
    image = np.full((5, 7), 0.5, dtype=np.float32)
    with MLflowWriter(logdir=tmp_path) as w:
        w.log_image("../../patches/x", image, 2)
        w.log_histogram("feature_distributions/level0", [1.0, 2.0, 2.0], 2)
        w.log_layout({"category": [{"title": "A", "closed": False, "children": ["train/a"]}]})
        run_id = w.run_id
    client = _client(tmp_path)
    files = {f.path for f in client.list_artifacts(run_id)}
    assert files == {"images", "histograms", "tensorboard_layout.json"}
    local = Path(client.download_artifacts(run_id, "images", str(tmp_path / "dl")))
    pngs = list(local.rglob("*.png"))
    assert [p.relative_to(local).as_posix() for p in pngs] == [
        f"patches_x-{hashlib.sha1(b'../../patches/x').hexdigest()[:8]}/step_0000000002.png"
    ]
    from PIL import Image

    pixels = np.asarray(Image.open(pngs[0]))
    assert pixels.shape == (5, 7, 1) or pixels.shape == (5, 7)
    assert (pixels == 128).all()


def test_mlflow_run_failed_when_process_dies_of_an_exception(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from writers.mlflow import MLflowWriter
        w = MLflowWriter(logdir={str(tmp_path)!r})
        print(w.run_id, flush=True)
        w.log_scalars({{"a": 1.0}}, 1)
        raise RuntimeError("crash in the training loop")
        """
    )
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1 and "crash in the training loop" in out.stderr
    run_id = out.stdout.split()[0]
    client = _client(tmp_path)
    assert client.get_run(run_id).info.status == "FAILED"
    assert client.get_metric_history(run_id, "a")[0].value == 1.0  # flushed at exit


@pytest.mark.parametrize(
    ("tag", "key"),
    [
        ("train/loss/total", "train/loss/total"),
        ("a//b/", "a/b"),
        ("x..y", "x_.y"),
        ("w=[1,2]", "w__1_2_"),
        ("é", "_"),
    ],
)
def test_sanitize_key(tag: str, key: str) -> None:
    assert sanitize_key(tag) == key
    assert len(sanitize_key("k" * 400)) == 250
