"""A small but real hierarchical JEPA trained on synthetic images on the CPU, logged with hjepa-metrics.

The model and data are in ``toy_hjepa.py``; this file is the training loop, a model of how to use the
library: one ``HJEPAMetricsLogger(config=...)``, ``timed()`` for forward and backward, one
``log_training_step`` call per logged step, and a validation pass accumulated over every batch.

    python examples/train_hjepa.py                       # JSONL + TensorBoard under runs/hjepa_demo
    python examples/train_hjepa.py --backends jsonl,mlflow,wandb --steps 200
    python examples/train_hjepa.py --config logging.yaml  # the guide's `logging:` section
    hjepa-metrics demo                                    # the same, from the installed package
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hjepa_metrics import HJEPAMetricsLogger, log_training_step, timed
from hjepa_metrics.alerts import AlertMonitor, health_verdict

if __package__:  # installed as hjepa_metrics.examples, or imported from the repo
    from .toy_hjepa import HJEPA, BlockMasking, HierarchicalLoss, batches, synthetic_images, visualize_patches
else:  # run as a script: python examples/train_hjepa.py
    from toy_hjepa import (  # type: ignore[no-redef,import-not-found]
        HJEPA,
        BlockMasking,
        HierarchicalLoss,
        batches,
        synthetic_images,
        visualize_patches,
    )

__all__ = ["HJEPATrainer", "batches", "default_config", "main"]

CHECKPOINT = "checkpoint.pt"


class HJEPATrainer:
    """The guide's trainer: every ``log_frequency`` steps the guide's ten calls, EMA dynamics every
    ``ema_log_frequency`` steps, histograms and the patch figure every ``media_log_frequency``."""

    def __init__(self, config: dict[str, Any], logging_config: Any = None, progress: bool = True) -> None:
        self.config = config
        train = config["training"]
        torch.manual_seed(train["seed"])
        self.device = torch.device("cpu")
        ema = config["model"]["ema"]
        self.model = HJEPA(
            total_steps=train["steps"],
            momentum=(ema["momentum_start"], ema["momentum_end"]),
            stop_gradient=config["model"].get("stop_gradient", True),
            **config["model"]["architecture"],
        )
        self.masking_fn = BlockMasking(self.model.grid, self.model.block, num_blocks=2, seed=train["seed"])
        self.loss_fn = HierarchicalLoss(config["loss"]["hierarchy_weights"])
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=train["lr"], weight_decay=0.05)
        warmup, steps = max(1, train["steps"] // 10), train["steps"]
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(  # counts this run's steps from 0
            self.optimizer,
            lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
        )
        images = synthetic_images(train["train_images"] + train["val_images"], 32, seed=train["seed"])
        self.train_images, self.val_images = images[: train["train_images"]], images[train["train_images"] :]
        self.batch_size = train["batch_size"]
        self.global_step = 0
        self.progress = progress
        levels = config["model"]["num_hierarchies"]
        self.logger = HJEPAMetricsLogger(
            config=logging_config if logging_config is not None else config["logging"],
            num_hierarchies=levels,
            hierarchy_weights=config["loss"]["hierarchy_weights"],
            # an untrained model predicts poorly and clips often: alerts start after the warm-up
            alerts=AlertMonitor(num_hierarchies=levels, warmup_steps=train["alert_warmup_steps"]),
        )
        self.logger.log_config(config)

    @property
    def train_loader(self) -> Iterator[dict[str, torch.Tensor]]:
        return batches(self.train_images, self.batch_size, seed=self.global_step, shuffle=True)

    @property
    def val_loader(self) -> Iterator[dict[str, torch.Tensor]]:
        return batches(self.val_images, self.batch_size, seed=0, shuffle=False)

    def _every(self, key: str) -> bool:
        return self.global_step % int(self.config["training"][key]) == 0

    def _train_step(self, images: torch.Tensor) -> float:
        mask = self.masking_fn(images.shape[0])  # [B, K, N], True = a target patch
        with timed(self.device) as forward:
            output = self.model(images, mask, return_all_levels=True)
            loss_dict = self.loss_fn(output["predictions"], output["targets"])
        self.optimizer.zero_grad()
        with timed(self.device) as backward:
            loss_dict["loss"].backward()  # type: ignore[no-untyped-call]
        clip = self.config["training"]["clip_grad"] or math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=clip)
        if self._every("log_frequency"):
            log_training_step(
                self.logger,
                global_step=self.global_step,
                loss_dict=loss_dict,
                mask=mask,
                num_patches=self.model.get_num_patches(),
                predictions=output["predictions"],
                targets=output["targets"],
                # the context encoder's patch tokens (CLS dropped), and their pools at each coarser level
                collapse_features=self.model.representations(output["context_features"]),
                model=self.model,
                grad_norm_before=norm,
                clip_threshold=clip,
                optimizer=self.optimizer,
                batch_size=images.shape[0],
                forward_time=forward.seconds,
                backward_time=backward.seconds,
            )
        self.optimizer.step()
        self.lr_scheduler.step()
        momentum = self.model.update_target_encoder(self.global_step)
        if self._every("ema_log_frequency"):
            log_training_step(
                self.logger,
                global_step=self.global_step,
                context_encoder=self.model.context_encoder,
                target_encoder=self.model.target_encoder,
                momentum=momentum,
                target_momentum=self.config["model"]["ema"]["momentum_end"],
            )
        if self._every("media_log_frequency"):  # the guide's advanced section
            for level, pred in enumerate(output["predictions"]):
                self.logger.log_histogram(
                    f"feature_distributions/level{level}", pred.detach(), self.global_step
                )
            fig = visualize_patches(images, output, mask, self.model.grid)
            if fig is not None:
                self.logger.log_image("patches/detailed_analysis", fig, self.global_step)
        return float(loss_dict["loss"].detach())

    def validate(self) -> dict[str, float]:
        """Prediction and collapse statistics over every validation batch, per level, logged once."""
        self.model.eval()
        val = self.logger.validation(prefix="val/")
        levels: list[list[torch.Tensor]] = [[] for _ in range(self.logger.num_hierarchies)]
        with torch.no_grad():
            for batch in self.val_loader:
                mask = self.masking_fn(batch["image"].shape[0])
                output = self.model(batch["image"], mask, return_all_levels=True)
                features = self.model.representations(output["context_features"])
                val.update(predictions=output["predictions"], targets=output["targets"], features=features)
                for kept, level_features in zip(levels, features, strict=True):
                    kept.append(level_features)
        self.model.train()
        # at the last trained step, whose weights it evaluates: at global_step (the step about to be
        # trained) a resumed run's first training record would share the step the file ends with, and
        # a resume skips what is at or below that
        step = max(self.global_step - 1, 0)
        values = val.log(global_step=step)
        for level, kept in enumerate(levels):  # a projector sample and its PCA, labelled by image
            tokens = torch.cat(kept)  # [images, patches, D]
            image = torch.arange(tokens.shape[0])[:, None].expand(tokens.shape[:2])
            self.logger.log_embedding(tokens, level, step, "val/", metadata=image, max_rows=500)
        return values

    def save(self, path: Path) -> None:
        """Model, optimizer, schedule and step, for ``--resume``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "global_step": self.global_step,
        }
        torch.save(state, path)

    def load(self, path: Path) -> None:
        """Continue from a :meth:`save`: the learning rate starts a new warm-up and cosine cycle over
        the steps to come, and the EMA momentum schedule stretches to their end."""
        state = torch.load(path, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step = int(state["global_step"])
        self.model.total_steps = self.global_step + self.config["training"]["steps"]

    def train(self) -> dict[str, float]:
        """``training.steps`` more steps from :attr:`global_step`; returns the last validation values."""
        train = self.config["training"]
        end = self.global_step + train["steps"]
        bar: Any = None
        redirect: Any = contextlib.nullcontext()
        if self.progress:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            bar = tqdm(total=train["steps"], desc="H-JEPA", unit="step")
            redirect = logging_redirect_tqdm()  # alerts print above the bar, not through it
        validation: dict[str, float] = {}
        epoch = 0
        with redirect:
            self.model.train()
            while self.global_step < end:
                for batch in self.train_loader:
                    if self.global_step >= end:
                        break
                    loss = self._train_step(batch["image"].to(self.device))
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch)
                        bar.update(1)
                    self.global_step += 1
                if epoch % train["val_every_epochs"] == 0 or self.global_step >= end:
                    validation = self.validate()
                epoch += 1
        if bar is not None:
            bar.close()
        return validation


SCENARIOS = {
    "healthy": "a toy H-JEPA that trains well: no guide threshold crossed once it has warmed up",
    "collapse": "the same model with the classic bug (targets from the online encoder, with gradients): "
    "its representations collapse within ~100 steps and the alerts and the report catch it",
}


def default_config(
    steps: int,
    log_dir: str,
    backends: Sequence[str],
    scenario: str = "healthy",
    run_name: str = "run",
    resume: bool = False,
) -> dict[str, Any]:
    """The demo's configuration. Runs live in ``log_dir/<run_name>`` (JSONL, W&B files, checkpoint);
    TensorBoard runs side by side in ``log_dir/tensorboard/<run_name>`` and MLflow runs in one store,
    ``log_dir/mlflow.db``, so every demo run can be compared with the others."""
    parent = Path(log_dir)
    run_dir = parent / run_name
    return {
        "model": {
            "num_hierarchies": 3,
            "architecture": {"image": 32, "patch": 4, "dim": 64, "depth": 2, "heads": 4, "block": 4},
            "ema": {"momentum_start": 0.996, "momentum_end": 1.0},
            "stop_gradient": scenario != "collapse",
        },
        "loss": {"hierarchy_weights": [1.0, 0.8, 0.5]},
        "training": {
            "steps": steps,
            "batch_size": 32,
            "lr": 2e-3,
            "clip_grad": 1.0,
            "seed": 0,
            "log_frequency": 5,
            "ema_log_frequency": 25,
            "media_log_frequency": 100,
            "val_every_epochs": 2,
            "alert_warmup_steps": max(25, steps // 4),
            "train_images": 1024,
            "val_images": 128,
        },
        "logging": {
            "experiment_name": "hjepa_demo",
            "log_dir": str(run_dir),
            "backends": list(backends),
            "resume": resume,
            "tensorboard": {"log_dir": str(parent / "tensorboard" / run_name)},
            "mlflow": {"tracking_uri": f"sqlite:///{parent.resolve() / 'mlflow.db'}", "run_name": run_name},
            "wandb": {"mode": "offline", "project": "hjepa_demo", "name": run_name},
        },
    }


# What a run is made with; --resume keeps them unless they are given again (a resumed collapse run
# that silently trained the healthy model, or dropped its MLflow run, would not be the same run).
SETTINGS = "demo_settings.json"
DEFAULTS = {"scenario": "healthy", "backends": "jsonl,tensorboard", "config": None}


def _settle(args: argparse.Namespace, run_dir: Path, resume: bool) -> None:
    """Fill the options not given: a resumed run's own (from its settings file), else the defaults;
    then record them in the run's directory for the next ``--resume``."""
    stored: dict[str, Any] = {}
    if resume and (run_dir / SETTINGS).exists():
        stored = json.loads((run_dir / SETTINGS).read_text(encoding="utf-8"))
    for name, default in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, stored.get(name, default))
    if args.config is not None:
        args.config = str(Path(args.config).resolve())  # found again from another directory
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = {name: getattr(args, name) for name in DEFAULTS}
    (run_dir / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _run_name(log_dir: Path, args: argparse.Namespace) -> str:
    """A new run's name (``<scenario>-<time>``), or the one ``--resume`` continues (default: the latest)."""
    if args.resume is None:
        scenario = args.scenario or DEFAULTS["scenario"]
        name = args.run_name or f"{scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (log_dir / name).exists():
            raise SystemExit(
                f"{log_dir / name} exists: pass --resume {name} to continue it, or another --run-name"
            )
        return name
    if args.resume:
        if not (log_dir / args.resume / CHECKPOINT).exists():
            raise SystemExit(f"{log_dir / args.resume}: no demo run to resume there (no {CHECKPOINT})")
        return str(args.resume)
    runs = sorted((p for p in log_dir.glob(f"*/{CHECKPOINT}")), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(f"{log_dir}: no demo run to resume")
    return runs[-1].parent.name


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600: about a minute)")
    parser.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        help="; ".join(f"{k}: {v}" for k, v in SCENARIOS.items())
        + " (default healthy; a resumed run keeps its own)",
    )
    parser.add_argument("--log-dir", default="runs/hjepa_demo", help="where every demo run goes")
    parser.add_argument("--run-name", help="this run's directory under --log-dir (default: scenario-time)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        help="continue a run (its name, default the latest) for --steps more steps, in the same runs, "
        "with its scenario, backends and config unless given again",
    )
    parser.add_argument(
        "--backends",
        help="comma-separated: jsonl, tensorboard, wandb, mlflow (default jsonl,tensorboard)",
    )
    parser.add_argument(
        "--config", help="a YAML/JSON file with the guide's logging: section (overrides --backends)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    log_dir = Path(args.log_dir)
    resume = args.resume is not None
    run_name = _run_name(log_dir, args)
    _settle(args, log_dir / run_name, resume)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    config = default_config(args.steps, str(log_dir), backends, args.scenario, run_name, resume)
    logging_config: Mapping[str, Any] | str = args.config or config["logging"]
    checkpoint = log_dir / run_name / CHECKPOINT
    trainer = HJEPATrainer(config, logging_config, progress=not args.no_progress)
    if resume:
        trainer.load(checkpoint)
    with trainer.logger:
        validation = trainer.train()
        trainer.save(checkpoint)
    print()
    print(health_verdict(trainer.logger.monitor) if trainer.logger.monitor else "alerts were off")
    print(f"\nrun {run_name!r} in {log_dir / run_name}; look at it with:")
    for where in trainer.logger.writer.locations():
        print(f"  {where}")
    print(f"\ncontinue it: hjepa-metrics demo --resume {run_name} --log-dir {log_dir}")
    return validation


if __name__ == "__main__":
    main()
