"""The README reads in order and every code block in it runs: its Python blocks with the demo's toy
H-JEPA standing in for the user's model and data, printed sample output compared with the real output,
its YAML config accepted by the logger, and the commands it gives to open the run."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hjepa_metrics.examples.toy_hjepa import HJEPA, BlockMasking, HierarchicalLoss, batches, synthetic_images

from writers import read_jsonl

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def _stand_ins() -> dict[str, Any]:
    """What the README leaves to the user: model, data, masking, loss and optimizer."""
    torch.manual_seed(0)
    model = HJEPA(total_steps=12)
    images = synthetic_images(12 * 16 + 32, 32, seed=0)
    return {
        "model": model,
        "loader": list(batches(images[: 12 * 16], 16, seed=0, shuffle=True)),
        "val_loader": list(batches(images[12 * 16 :], 16, seed=0, shuffle=False)),
        "masking_fn": BlockMasking(model.grid, model.block, num_blocks=2, seed=0),
        "loss_fn": HierarchicalLoss([1.0, 0.8, 0.5]),
        "optimizer": torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3),
    }


def test_readme_python_blocks_run_in_order_and_print_what_they_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = _blocks("python")
    assert len(blocks) >= 2
    namespace = _stand_ins()
    for number, block in enumerate(blocks, start=1):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"<README python block {number}>", "exec"), namespace)
        said = [
            line.removeprefix("# prints: ") for line in block.splitlines() if line.startswith("# prints: ")
        ]
        assert out.getvalue().splitlines() == said, f"block {number} printed {out.getvalue()!r}"
    # what the quick start wrote: the training steps and the validation values, in one closed run
    records = read_jsonl(tmp_path / "runs" / "exp1")
    steps = sorted({r["step"] for r in records if "train/loss/total" in r.get("metrics", {})})
    assert steps == [0, 5, 10]
    contributions = [r["metrics"] for r in records if "train/loss/contribution_h0" in r.get("metrics", {})]
    assert sum(contributions[-1][f"train/loss/contribution_h{i}"] for i in range(3)) == pytest.approx(100)
    assert any("val/prediction/level0_cosine_sim_mean" in r.get("metrics", {}) for r in records)
    # the commands the README gives to open it
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    runs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "runs" / "exp1" / "tensorboard")).Runs()
    assert list(runs) == ["hjepa"]
    text = README.read_text(encoding="utf-8")
    assert "tensorboard --logdir runs/exp1/tensorboard" in text and "hjepa-metrics report runs/exp1" in text
    report = subprocess.run(
        [sys.executable, "-m", "hjepa_metrics.cli", "report", "runs/exp1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert report.returncode == 0 and "Training-health report" in report.stdout, report.stderr


def test_readme_yaml_config_is_accepted_by_the_logger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from hjepa_metrics import HJEPAMetricsLogger

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    (config,) = _blocks("yaml")
    (tmp_path / "logging.yaml").write_text(config, encoding="utf-8")
    with HJEPAMetricsLogger(config="logging.yaml") as logger:
        logger.log_scalars({"loss": 1.0}, global_step=0)
        names = sorted(w.name for w in logger.writer.writers)
    assert names == ["jsonl", "mlflow", "tensorboard", "wandb"]
    assert read_jsonl(tmp_path / "runs" / "hjepa_vit_s")[-1]["metrics"] == {"train/loss": 1.0}
