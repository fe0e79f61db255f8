"""The main job with all four backends, read back from each; and the guide's snippets run as written."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import MethodType
from typing import Any

import pytest
import torch
import wandb_reader
from hjepa_metrics.examples import train_hjepa

from hjepa_metrics import HJEPATensorBoardLogger, registry
from hjepa_metrics.layout import guide_layout
from writers import JSONLWriter, read_jsonl

pytest.importorskip("wandb")
pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

GUIDE = Path(__file__).resolve().parents[1] / ".." / "shared" / "spec" / "tensorboard-integration-guide.md"
# Memory counters exist only on CUDA; on a CPU run the library does not make them up.
CUDA_ONLY = {"train/performance/gpu_memory_allocated_gb"}


def _layout_tags() -> set[str]:
    tags = set()
    for cat in guide_layout(3)["category"]:
        for child in cat["children"]:
            tags.update([child] if isinstance(child, str) else child["children"])
    return tags


def _expected_train_tags() -> set[str]:
    tags = _layout_tags()
    return tags if torch.cuda.is_available() else tags - CUDA_ONLY


def test_example_with_all_four_backends(tmp_path: Path) -> None:
    validation = train_hjepa.main(
        [
            "--steps",
            "25",
            "--log-dir",
            str(tmp_path),
            "--backends",
            "jsonl,tensorboard,mlflow,wandb",
            "--no-progress",
            "--run-name",
            "demo",
        ]
    )
    assert validation and all(k.startswith("val/") for k in validation)
    expected = _expected_train_tags()
    val_expected = {
        t.replace("train/", "val/") for t in expected if re.match(r"train/(prediction|collapse)/", t)
    }

    # JSONL
    records = read_jsonl(tmp_path / "demo" / "metrics.jsonl")
    jsonl_tags = {t for r in records if "metrics" in r for t in r["metrics"]}
    assert expected <= jsonl_tags, sorted(expected - jsonl_tags)
    assert val_expected <= jsonl_tags, sorted(val_expected - jsonl_tags)
    kinds = {r.get("kind") for r in records}
    assert {"layout", "config", "histogram", "image"} <= kinds

    # TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard" / "demo"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tb_tags = set(acc.Tags()["scalars"])
    assert expected | val_expected <= tb_tags, sorted((expected | val_expected) - tb_tags)
    assert "patches/detailed_analysis" in acc.Tags()["images"]
    loss_steps = [e.step for e in acc.Scalars("train/loss/total")]
    assert loss_steps == [0, 5, 10, 15, 20]  # log_frequency 5; 5 points give loss_trend_slope

    # MLflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("hjepa_demo").experiment_id])[0]
    assert run.info.run_name == "demo"
    assert run.info.status == "FINISHED"
    assert expected | val_expected <= set(run.data.metrics), sorted(
        (expected | val_expected) - set(run.data.metrics)
    )
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss/total")] == loss_steps

    # W&B
    rows = wandb_reader.history(tmp_path / "demo")
    wandb_tags = {k for row in rows for k in row}
    assert expected | val_expected <= wandb_tags, sorted((expected | val_expected) - wandb_tags)
    assert [r["global_step"] for r in rows if "train/loss/total" in r] == loss_steps
    summaries = wandb_reader.metric_summaries(
        tmp_path / "demo"
    )  # define_metric from the registry's alert rules
    assert summaries["train/loss/total"] == {"min"}
    assert summaries["train/collapse/level2_effective_rank"] == {"min"}
    assert summaries["train/collapse/level0_mean_similarity"] == {"max"}

    # the same values everywhere (float32 in TensorBoard)
    jsonl_loss = [
        r["metrics"]["train/loss/total"] for r in records if "train/loss/total" in r.get("metrics", {})
    ]
    assert [e.value for e in acc.Scalars("train/loss/total")] == pytest.approx(jsonl_loss, rel=1e-6)
    assert [r["train/loss/total"] for r in rows if "train/loss/total" in r] == jsonl_loss


def _demo(tmp_path: Path, *args: str) -> str:
    """``hjepa-metrics demo`` as a user types it; its printed output."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "hjepa_metrics.cli", "demo", "--log-dir", str(tmp_path), "--no-progress"]
    done = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_each_demo_invocation_is_its_own_run_and_resume_continues_one(tmp_path: Path) -> None:
    first = _demo(tmp_path, "--steps", "10", "--run-name", "a")
    second = _demo(tmp_path, "--steps", "12")  # default name: scenario-time
    runs = sorted(p.parent.name for p in tmp_path.glob("*/metrics.jsonl"))
    assert len(runs) == 2 and runs[0] == "a" and runs[1].startswith("healthy-"), runs
    for name, want in zip(runs, ([0, 5], [0, 5, 10]), strict=True):  # each file holds one run, once
        steps = [
            r["step"]
            for r in read_jsonl(tmp_path / name / "metrics.jsonl")
            if "train/loss/total" in r.get("metrics", {})
        ]
        assert steps == want, (name, steps)
    assert sorted(p.name for p in (tmp_path / "tensorboard").iterdir()) == runs
    # the printed commands name this run and where to look
    assert f"tensorboard --logdir {tmp_path / 'tensorboard'}" in first
    assert f"hjepa-metrics report {tmp_path / 'a' / 'metrics.jsonl'}" in first
    assert f"hjepa-metrics demo --resume a --log-dir {tmp_path}" in first
    assert "Health: " in first and "Health: " in second
    # the same name again is refused; --resume continues the run where it stopped
    cmd = [sys.executable, "-m", "hjepa_metrics.cli", "demo", "--log-dir", str(tmp_path), "--run-name", "a"]
    refused = subprocess.run(
        [*cmd, "--steps", "2", "--no-progress"], capture_output=True, text=True, check=False
    )
    assert refused.returncode != 0 and "--resume a" in refused.stderr
    _demo(tmp_path, "--steps", "10", "--resume", "a")
    records = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    steps = [r["step"] for r in records if "train/loss/total" in r.get("metrics", {})]
    # step 10, the resumed run's first, is kept: the first run's validation went to its last step, 9
    assert steps == [0, 5, 10, 15]
    val = [r["step"] for r in records if "val/collapse/level0_effective_rank" in r.get("metrics", {})]
    assert val == [9, 19]
    report = subprocess.run(
        [sys.executable, "-m", "hjepa_metrics.cli", "report", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert report.returncode == 0, report.stderr
    assert "several runs" not in report.stdout


def test_the_printed_resume_command_keeps_the_runs_scenario_and_backends(tmp_path: Path) -> None:
    first = _demo(tmp_path, "--steps", "6", "--scenario", "collapse", "--backends", "jsonl", "--run-name=c")
    printed = f"hjepa-metrics demo --resume c --log-dir {tmp_path}"
    assert printed in first
    resumed = _demo(tmp_path, "--resume", "c", "--steps", "4")  # the printed command, nothing added
    assert printed in resumed
    assert "TensorBoard" not in resumed and not (tmp_path / "tensorboard").exists()  # still JSONL only
    models = [
        r["config"]["model"]
        for r in read_jsonl(tmp_path / "c" / "metrics.jsonl")
        if "model" in r.get("config", {})
    ]
    # both invocations trained the collapse model (targets from the online encoder)
    assert [m["stop_gradient"] for m in models] == [False, False]
    # what is given again wins, and is kept for the next resume
    _demo(tmp_path, "--resume", "c", "--steps", "2", "--backends", "jsonl,tensorboard")
    assert (tmp_path / "tensorboard" / "c").is_dir()
    assert json.loads((tmp_path / "c" / "demo_settings.json").read_text(encoding="utf-8")) == {
        "scenario": "collapse",
        "backends": "jsonl,tensorboard",
        "config": None,
    }


def test_collapse_scenario_is_caught_live_and_by_the_report(tmp_path: Path) -> None:
    out = _demo(
        tmp_path, "--steps", "150", "--scenario", "collapse", "--run-name", "c", "--backends", "jsonl"
    )
    assert "Health: COLLAPSE" in out, out[-3000:]
    live = re.findall(r"alert: (\S+) = ", out)
    assert any(t.startswith("train/collapse/") for t in live), live
    report = subprocess.run(
        [sys.executable, "-m", "hjepa_metrics.cli", "report", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert report.returncode == 0, report.stderr
    assert "Collapse risk: HIGH" in report.stdout
    # the report judges with the settings the run used: the same alerts as were printed live
    reported = re.findall(r"  - (\S+) = .* at step (\d+)", report.stdout)
    printed = re.findall(r"alert: (\S+) = .* at step (\d+)", out)
    assert reported == printed


def test_healthy_demo_fires_no_unexplained_alert(tmp_path: Path) -> None:
    out = _demo(tmp_path, "--steps", "300", "--run-name", "h", "--backends", "jsonl")
    assert "Health: HEALTHY" in out, out[-3000:]
    for tag in re.findall(r"alert: (\S+) = ", out):  # every alert during the run is in the verdict
        assert f"back in range: {tag} =" in out, tag


# --- the guide's snippets ------------------------------------------------------------------

# Minimal fixes, each a bug of the guide's code (documented in the README):
FIXES = [
    # `.view` on the non-contiguous `[:, 1:, :]` slice raises; `.reshape` copies when it must.
    (".view(-1, context_features.shape[-1])", ".reshape(-1, context_features.shape[-1])"),
    # the validation snippet hard-codes ViT-B's width and uses `.view` on the same slice
    ("[:, 1:, :].view(-1, 768)", "[:, 1:, :].reshape(-1, output['context_features'].shape[-1])"),
    # tensors that require grad cannot go to numpy; a 1-D similarity row cannot be imshow'n
    (
        "sim = (predictions[i] * targets[i]).sum(dim=-1)",
        "sim = (predictions[i] * targets[i]).sum(dim=-1).detach()[None]",
    ),
    ("feat_values = predictions[level].view(-1)", "feat_values = predictions[level].reshape(-1)"),
    # validation prediction quality was logged without prefix, i.e. under train/
    (
        "targets=all_targets,\n        global_step=self.global_step,\n",
        'targets=all_targets,\n        global_step=self.global_step,\n        prefix="val/",\n',
    ),
]


def _snippets() -> list[str]:
    if not GUIDE.exists():
        pytest.skip("shared/spec not beside the repo")
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)
    text = "\n".join(blocks)
    for old, _ in FIXES:
        assert old in text, f"the guide no longer contains {old!r}"
    fixed = []
    for block in blocks:
        for old, new in FIXES:
            block = block.replace(old, new)
        fixed.append(block)
    return fixed


def _method(source: str, name: str) -> Any:
    start = source.index(f"def {name}(")
    body = source[start:]
    namespace: dict[str, Any] = {"torch": torch, "time": __import__("time")}
    exec(compile(body, f"<guide:{name}>", "exec"), namespace)
    return namespace[name]


def _guide_trainer(tmp_path: Path, steps: int) -> tuple[Any, list[Any], list[Any]]:
    config = train_hjepa.default_config(steps, str(tmp_path), ["jsonl"])
    config["training"].update(log_frequency=2)
    example_logs = {"backends": ["jsonl"], "log_dir": str(tmp_path / "example"), "background": False}
    trainer: Any = train_hjepa.HJEPATrainer(config, example_logs, progress=False)
    trainer.logger.close()  # the snippets log through the guide's own logger below
    # the guide's Quick Start, step 1, verbatim (its trainer keeps metrics_logger and config)
    trainer.metrics_logger = JSONLWriter(tmp_path)
    trainer.tb_logger = HJEPATensorBoardLogger(
        metrics_logger=trainer.metrics_logger, num_hierarchies=config["model"]["num_hierarchies"]
    )
    images = trainer.train_images[: steps * trainer.batch_size]
    train_loader = list(train_hjepa.batches(images, trainer.batch_size, seed=0, shuffle=False))
    val_loader = list(train_hjepa.batches(trainer.val_images, trainer.batch_size, seed=0, shuffle=False))
    return trainer, train_loader, val_loader


class _Plain:
    """A stand-in for the guide's trainer `self`: plain attributes the snippets read and write."""


def test_guide_training_and_validation_snippets_run(tmp_path: Path) -> None:
    snippets = _snippets()
    train_src = next(s for s in snippets if "def _train_epoch" in s)
    val_src = next(s for s in snippets if "def _validate_epoch" in s)
    real, train_loader, val_loader = _guide_trainer(tmp_path, steps=10)
    me = _Plain()
    me.__dict__.update(
        model=real.model,
        masking_fn=real.masking_fn,
        loss_fn=real.loss_fn,
        optimizer=real.optimizer,
        lr_scheduler=real.lr_scheduler,
        device=real.device,
        global_step=0,
        log_frequency=2,
        clip_grad=1.0,
        tb_logger=real.tb_logger,
        loss_history=[],
        train_loader=train_loader,
        val_loader=val_loader,
        config=real.config,
    )
    MethodType(_method(train_src, "_train_epoch"), me)(0)
    MethodType(_method(val_src, "_validate_epoch"), me)(0)
    real.tb_logger.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    tags = {t for r in records if "metrics" in r for t in r["metrics"]}
    # "Collapse monitoring (for each hierarchy level)" in the guide calls level=0 only; the example
    # logs levels 1 and 2 too. Everything else of the layout comes from the snippet as written.
    expected = {t for t in _expected_train_tags() if not re.match(r"train/collapse/level[12]_", t)}
    assert expected <= tags, sorted(expected - tags)
    assert {"val/collapse/level0_effective_rank", "val/prediction/level2_cosine_sim_mean"} <= tags
    steps = sorted({r["step"] for r in records if "train/loss/total" in r.get("metrics", {})})
    assert steps == [0, 2, 4, 6, 8]
    ema_steps = [r["step"] for r in records if "train/ema/momentum_current" in r.get("metrics", {})]
    assert ema_steps == [0]
    assert me.global_step == 10


def test_guide_advanced_and_gpu_snippets_run(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    snippets = _snippets()
    vis_src = next(s for s in snippets if "def visualize_patches" in s)
    hist_src = next(s for s in snippets if "feature_distributions/level" in s)
    gpu_src = next(s for s in snippets if "peak_memory_gb" in s)
    real, train_loader, _ = _guide_trainer(tmp_path, steps=1)
    batch = train_loader[0]
    mask = real.masking_fn(len(batch["image"]))
    output = real.model(batch["image"], mask)
    logger = real.tb_logger
    namespace: dict[str, Any] = {
        "images": batch["image"],
        "predictions": output["predictions"],
        "targets": output["targets"],
        "mask": mask.any(dim=1).reshape(-1, real.model.grid, real.model.grid),
        "global_step": 1000,
        "logger": logger,
        "num_hierarchies": 3,
        "torch": torch,
        "metrics": {},
    }
    exec(compile(vis_src, "<guide:visualize>", "exec"), namespace)
    exec(compile(hist_src, "<guide:histograms>", "exec"), namespace)
    exec(compile(gpu_src.replace("# ... training step ...", "pass"), "<guide:gpu>", "exec"), namespace)
    logger.log_scalars(namespace["metrics"], global_step=1000)
    logger.close()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    images = [r for r in records if r.get("kind") == "image"]
    assert [(r["tag"], r["step"]) for r in images] == [("patches/detailed_analysis", 1000)]
    hists = sorted(r["tag"] for r in records if r.get("kind") == "histogram")
    assert hists == [f"feature_distributions/level{i}" for i in range(3)]
    if torch.cuda.is_available():
        assert any("train/performance/peak_memory_gb" in r.get("metrics", {}) for r in records)
    assert all(
        math.isfinite(v) for r in records for v in r.get("metrics", {}).values() if isinstance(v, float)
    )
    assert registry.canonical("performance/peak_memory_gb") == "performance/peak_memory_gb"
