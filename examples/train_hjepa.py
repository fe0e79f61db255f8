"""A small but real hierarchical JEPA trained on synthetic images on the CPU, logged with hjepa-metrics.

The trainer follows the guide's integration (its `_train_epoch` and `_validate_epoch` snippets) call for
call, with the guide's bugs fixed: `.view` on a non-contiguous slice becomes `.reshape`, the hard-coded
768 becomes the model's width, and validation accumulates every batch per level instead of flattening
levels and using only the last batch's features.

    python examples/train_hjepa.py                       # JSONL + TensorBoard under runs/hjepa_demo
    python examples/train_hjepa.py --backends jsonl,mlflow,wandb --steps 200
    python examples/train_hjepa.py --config logging.yaml  # the guide's `logging:` section
    hjepa-metrics demo                                    # the same, from the installed package
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hjepa_metrics import HJEPATensorBoardLogger
from writers import MultiWriter, Writer, build_writers

# --------------------------------------------------------------------------- synthetic data


def synthetic_images(count: int, size: int, seed: int) -> torch.Tensor:
    """``[count, 3, size, size]`` images in [0, 1]: a smooth colour gradient plus a few bright
    rectangles and discs, so nearby patches are predictable from context and far ones are not."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.rand(count, 3, 1, 1, generator=gen)
    slope = torch.rand(count, 3, 2, generator=gen) - 0.5
    images = base + slope[..., 0, None, None] * ys + slope[..., 1, None, None] * xs
    for _ in range(3):
        color = torch.rand(count, 3, 1, 1, generator=gen)
        cy, cx = torch.rand(2, count, 1, 1, generator=gen) * size
        radius = 2 + torch.rand(count, 1, 1, generator=gen) * size / 4
        disc = ((ys * size - cy) ** 2 + (xs * size - cx) ** 2 < radius**2).unsqueeze(1)
        images = torch.where(disc, color, images)
        y0, x0 = (torch.rand(2, count, generator=gen) * size * 0.75).long()
        h, w = (2 + torch.rand(2, count, generator=gen) * size / 3).long()
        rows = torch.arange(size)
        box = ((rows[None] >= y0[:, None]) & (rows[None] < (y0 + h)[:, None]))[:, :, None] & (
            (rows[None] >= x0[:, None]) & (rows[None] < (x0 + w)[:, None])
        )[:, None, :]
        images = torch.where(box.unsqueeze(1), 1 - color, images)
    return images.clamp(0, 1)


def batches(
    images: torch.Tensor, batch_size: int, seed: int, shuffle: bool
) -> Iterator[dict[str, torch.Tensor]]:
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)) if shuffle else None
    for start in range(0, len(images) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
        yield {"image": images[idx]}


# --------------------------------------------------------------------------- model


class BlockMasking:
    """I-JEPA-style block masking on a ``grid × grid`` patch grid: ``num_blocks`` target blocks of
    ``block × block`` patches per sample. Returns ``[B, K, N]`` bool (True = masked, to predict)
    and the block corners. Its own generator: masking never touches the global RNG."""

    def __init__(self, grid: int, block: int, num_blocks: int, seed: int) -> None:
        self.grid, self.block, self.num_blocks = grid, block, num_blocks
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch_size: int) -> torch.Tensor:
        g, b, k = self.grid, self.block, self.num_blocks
        corners = torch.randint(0, g - b + 1, (batch_size, k, 2), generator=self.generator)
        rows = torch.arange(g)
        in_y = (rows >= corners[..., :1]) & (rows < corners[..., :1] + b)  # [B, K, g]
        in_x = (rows >= corners[..., 1:]) & (rows < corners[..., 1:] + b)
        return (in_y[..., :, None] & in_x[..., None, :]).reshape(batch_size, k, g * g)


class Encoder(nn.Module):
    def __init__(self, patch: int, dim: int, depth: int, heads: int, num_patches: int) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = images.shape
        p = self.patch
        x = images.unfold(2, p, p).unfold(3, p, p)  # [B, C, gh, gw, p, p]
        return x.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * p * p)

    def forward(self, images: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, 1 + N, D]`` (CLS first); ``hidden`` ``[B, N]`` marks patches the encoder may not see."""
        x = self.embed(self.patches(images))
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        pad = None
        if hidden is not None:
            pad = torch.cat([torch.zeros_like(hidden[:, :1]), hidden], dim=1)
        out: torch.Tensor = self.norm(self.blocks(x, src_key_padding_mask=pad))
        return out


class Predictor(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, num_patches: int) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, num_patches, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, dim)

    def forward(self, context: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Context tokens ``[B, N, D]`` with hidden positions replaced by mask tokens → ``[B, N, D]``."""
        x = torch.where(hidden[..., None], self.mask_token.expand_as(context), context) + self.pos
        out: torch.Tensor = self.head(self.blocks(x))
        return out


class HJEPA(nn.Module):
    """Context encoder, EMA target encoder and predictor over three levels: the masked patches
    (level 0), their 2×2 pools (level 1) and each block's mean (level 2)."""

    def __init__(
        self,
        image: int = 32,
        patch: int = 4,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        block: int = 4,
        momentum: tuple[float, float] = (0.996, 1.0),
        total_steps: int = 300,
    ) -> None:
        super().__init__()
        self.grid = image // patch
        self.block = block
        self.dim = dim
        n = self.grid * self.grid
        self.context_encoder = Encoder(patch, dim, depth, heads, n)
        self.target_encoder = copy.deepcopy(self.context_encoder)
        self.target_encoder.requires_grad_(False)
        self.predictor = Predictor(dim, depth, heads, n)
        self.momentum = momentum
        self.total_steps = total_steps

    def get_num_patches(self) -> int:
        return self.grid * self.grid

    def _levels(self, tokens: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Tokens of the masked blocks per level: ``[B, K·b², D]``, ``[B, K·(b/2)², D]``, ``[B, K, D]``."""
        b, k, _ = mask.shape
        side = self.block
        idx = mask.reshape(b * k, -1).nonzero()[:, 1].reshape(b, k, side * side)  # row-major inside a block
        picked = torch.gather(
            tokens[:, None].expand(-1, k, -1, -1), 2, idx[..., None].expand(-1, -1, -1, self.dim)
        )
        grid = picked.reshape(b * k, side, side, self.dim).permute(0, 3, 1, 2)  # [B·K, D, b, b]
        level0 = picked.reshape(b, k * side * side, self.dim)
        level1 = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2).reshape(b, -1, self.dim)
        level2 = grid.mean(dim=(2, 3)).reshape(b, k, self.dim)
        return [level0, level1, level2]

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor, return_all_levels: bool = True
    ) -> dict[str, Any]:
        hidden = mask.any(dim=1)  # [B, N]: every target block is hidden from the context encoder
        context = self.context_encoder(images, hidden)
        with torch.no_grad():
            target = F.layer_norm(self.target_encoder(images)[:, 1:], (self.dim,))
        predicted = self.predictor(context[:, 1:], hidden)
        predictions = self._levels(predicted, mask)
        targets = self._levels(target, mask)
        if not return_all_levels:
            predictions, targets = predictions[:1], targets[:1]
        return {"predictions": predictions, "targets": targets, "context_features": context}

    @torch.no_grad()
    def update_target_encoder(self, step: int) -> float:
        start, end = self.momentum
        m = end - (end - start) * (math.cos(math.pi * min(step, self.total_steps) / self.total_steps) + 1) / 2
        for t, c in zip(self.target_encoder.parameters(), self.context_encoder.parameters(), strict=True):
            t.mul_(m).add_(c.detach(), alpha=1 - m)
        return m


class HierarchicalLoss:
    """Smooth-L1 per level between predictions and (layer-normed) targets; weighted sum."""

    def __init__(self, weights: Sequence[float]) -> None:
        self.weights = list(weights)

    def __call__(
        self, predictions: list[torch.Tensor], targets: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        levels = [F.smooth_l1_loss(p, t) for p, t in zip(predictions, targets, strict=True)]
        out = {f"loss_h{i}": loss for i, loss in enumerate(levels)}
        out["loss"] = sum((w * loss for w, loss in zip(self.weights, levels, strict=True)), torch.zeros(()))
        out["loss_unweighted"] = torch.stack(levels).mean()
        return out


# --------------------------------------------------------------------------- the guide's trainer


class HJEPATrainer:
    def __init__(self, config: dict[str, Any], metrics_logger: Writer, progress: bool = True) -> None:
        self.config = config
        train = config["training"]
        torch.manual_seed(train["seed"])
        self.device = torch.device("cpu")
        self.model = HJEPA(total_steps=train["steps"], **config["model"]["architecture"])
        self.masking_fn = BlockMasking(self.model.grid, self.model.block, num_blocks=2, seed=train["seed"])
        self.loss_fn = HierarchicalLoss(config["loss"]["hierarchy_weights"])
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=train["lr"], weight_decay=0.05)
        warmup = max(1, train["steps"] // 10)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: (
                min(1.0, (s + 1) / warmup)
                * 0.5
                * (1 + math.cos(math.pi * min(s, train["steps"]) / train["steps"]))
            ),
        )
        self.clip_grad = train["clip_grad"]
        self.log_frequency = train["log_frequency"]
        images = synthetic_images(train["train_images"] + train["val_images"], 32, seed=train["seed"])
        self.train_images, self.val_images = images[: train["train_images"]], images[train["train_images"] :]
        self.batch_size = train["batch_size"]
        self.global_step = 0
        self.progress = progress
        self.metrics_logger = metrics_logger

        # Initialize enhanced TensorBoard logger (the guide's Quick Start, step 1)
        self.tb_logger = HJEPATensorBoardLogger(
            metrics_logger=self.metrics_logger,
            num_hierarchies=config["model"]["num_hierarchies"],
            hierarchy_weights=config["loss"]["hierarchy_weights"],
        )
        self.tb_logger.log_config(config)

        # For tracking loss history
        self.loss_history: list[float] = []

    @property
    def train_loader(self) -> Iterator[dict[str, torch.Tensor]]:
        return batches(self.train_images, self.batch_size, seed=self.global_step, shuffle=True)

    @property
    def val_loader(self) -> Iterator[dict[str, torch.Tensor]]:
        return batches(self.val_images, self.batch_size, seed=0, shuffle=False)

    def _train_epoch(self, epoch: int, bar: Any) -> None:
        self.model.train()
        for batch in self.train_loader:
            if self.global_step >= self.config["training"]["steps"]:
                return
            images = batch["image"].to(self.device)

            # Generate masks
            mask = self.masking_fn(images.shape[0])

            # Record timing
            forward_start = time.time()

            # Forward pass
            output = self.model(images, mask, return_all_levels=True)

            forward_time = time.time() - forward_start

            # Compute loss
            loss_dict = self.loss_fn(output["predictions"], output["targets"])
            loss = loss_dict["loss"]

            backward_start = time.time()

            # Backward pass
            self.optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]

            backward_time = time.time() - backward_start

            # Gradient clipping
            global_norm_before = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), max_norm=self.clip_grad or float("inf")
            )

            # Log enhanced metrics every log_frequency steps
            if self.global_step % self.log_frequency == 0:
                # 1. Hierarchical losses
                self.tb_logger.log_hierarchical_losses(loss_dict, global_step=self.global_step)

                # 2. Masking statistics
                self.tb_logger.log_masking_statistics(
                    mask=mask, num_patches=self.model.get_num_patches(), global_step=self.global_step
                )

                # 3. Prediction quality
                self.tb_logger.log_prediction_quality(
                    predictions=output["predictions"], targets=output["targets"], global_step=self.global_step
                )

                # 4. Collapse monitoring (for each hierarchy level)
                context_features = output["context_features"][:, 1:, :]  # Exclude CLS
                self.tb_logger.log_collapse_metrics(
                    # fixed: .view on this non-contiguous slice raises; reshape does not
                    features=context_features.reshape(-1, context_features.shape[-1]),
                    level=0,
                    global_step=self.global_step,
                    prefix="train/",
                )
                for level in (1, 2):  # the coarser levels' predicted features
                    self.tb_logger.log_collapse_metrics(
                        features=output["predictions"][level], level=level, global_step=self.global_step
                    )

                # 5. Gradient flow
                self.tb_logger.log_gradient_flow(self.model, global_step=self.global_step)

                # 6. Gradient clipping
                self.tb_logger.log_gradient_clipping(
                    global_norm_before=global_norm_before.item(),
                    global_norm_after=torch.nn.utils.clip_grad_norm_(
                        self.model.parameters(), max_norm=float("inf")
                    ).item(),
                    clip_threshold=self.clip_grad or float("inf"),
                    global_step=self.global_step,
                )

                # 7. Learning rate
                self.tb_logger.log_learning_rate(self.optimizer, global_step=self.global_step)

                # 8. Hierarchy feature stats
                self.tb_logger.log_hierarchy_feature_stats(
                    output["predictions"], output["targets"], global_step=self.global_step
                )

                # 9. Training stability
                self.loss_history.append(loss.item())
                self.tb_logger.log_training_stability(
                    current_loss=loss.item(),
                    loss_history=self.loss_history[-100:],  # Last 100 steps
                    global_step=self.global_step,
                )

                # 10. Performance metrics
                self.tb_logger.log_performance_metrics(
                    batch_size=images.shape[0],
                    forward_time=forward_time,
                    backward_time=backward_time,
                    global_step=self.global_step,
                )

            # Optimizer step
            self.optimizer.step()
            self.lr_scheduler.step()

            # Update EMA target encoder
            current_momentum = self.model.update_target_encoder(self.global_step)

            # Log EMA dynamics every 500 steps in the guide; every ema_log_frequency steps here
            if self.global_step % self.config["training"]["ema_log_frequency"] == 0:
                self.tb_logger.log_ema_dynamics(
                    context_encoder=self.model.context_encoder,
                    target_encoder=self.model.target_encoder,
                    current_momentum=current_momentum,
                    target_momentum=self.config["model"]["ema"]["momentum_end"],
                    global_step=self.global_step,
                )

            # The guide's advanced section: feature histograms and a patch visualization
            if self.global_step % self.config["training"]["media_log_frequency"] == 0:
                for level in range(self.config["model"]["num_hierarchies"]):
                    self.tb_logger.log_histogram(
                        f"feature_distributions/level{level}",
                        output["predictions"][level].detach().reshape(-1),
                        self.global_step,
                    )
                fig = visualize_patches(images, output, mask, self.model.grid)
                if fig is not None:
                    self.tb_logger.log_image("patches/detailed_analysis", fig, self.global_step)

            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch)
                bar.update(1)
            self.global_step += 1

    def _validate_epoch(self, epoch: int) -> dict[str, float]:
        self.model.eval()
        # fixed: accumulate every batch per level (the guide flattened levels into one list and
        # computed collapse metrics from the last batch only)
        val = self.tb_logger.validation(prefix="val/")
        with torch.no_grad():
            for batch in self.val_loader:
                images = batch["image"].to(self.device)
                mask = self.masking_fn(images.shape[0])
                output = self.model(images, mask, return_all_levels=True)
                val.update(
                    predictions=output["predictions"],
                    targets=output["targets"],
                    features=[output["context_features"][:, 1:, :], *output["predictions"][1:]],
                )
        return val.log(global_step=self.global_step)

    def train(self) -> dict[str, float]:
        steps = self.config["training"]["steps"]
        bar = None
        redirect: Any = contextlib.nullcontext()
        if self.progress:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            bar = tqdm(total=steps, desc="H-JEPA", unit="step")
            redirect = logging_redirect_tqdm()  # alerts print above the bar, not through it
        validation: dict[str, float] = {}
        epoch = 0
        with redirect:
            try:
                while self.global_step < steps:
                    self._train_epoch(epoch, bar)
                    if epoch % self.config["training"]["val_every_epochs"] == 0 or self.global_step >= steps:
                        validation = self._validate_epoch(epoch)
                    epoch += 1
            finally:
                if bar is not None:
                    bar.close()
        return validation


def visualize_patches(images: torch.Tensor, output: dict[str, Any], mask: torch.Tensor, grid: int) -> Any:
    """The guide's custom visualization: image, per-patch prediction similarity and mask, 3 samples."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    predictions, targets = output["predictions"][0].detach(), output["targets"][0].detach()
    sim = F.cosine_similarity(predictions, targets, dim=-1)  # [B, K·b²]
    fig, axes = plt.subplots(3, 3, figsize=(6, 6))
    hidden = mask.any(dim=1)
    for i in range(3):
        heat = torch.full((grid * grid,), float("nan"))
        heat[hidden[i].nonzero()[:, 0]] = sim[i, : int(hidden[i].sum())]
        axes[i, 0].imshow(images[i].permute(1, 2, 0).cpu().numpy())
        axes[i, 1].imshow(heat.reshape(grid, grid).numpy(), cmap="RdYlGn", vmin=-1, vmax=1)
        axes[i, 2].imshow(hidden[i].reshape(grid, grid).float().numpy(), cmap="gray")
        for ax in axes[i]:
            ax.set_axis_off()
    axes[0, 0].set_title("image")
    axes[0, 1].set_title("pred. cosine")
    axes[0, 2].set_title("mask")
    return fig


def where_to_look(writer: Writer) -> list[str]:
    """One line per backend: where its data is and the command that opens it."""
    lines = []
    for outer in writer.writers if isinstance(writer, MultiWriter) else [writer]:
        w = getattr(outer, "inner", outer)  # the backend behind its BackgroundWriter
        if w.name == "jsonl":
            lines.append(f"JSONL:       {Path(getattr(w, 'path', '')).resolve()}  (writers.read_jsonl)")
        elif w.name == "tensorboard":
            lines.append(
                f"TensorBoard: tensorboard --logdir {getattr(w, 'logdir', '')}  (Custom Scalars tab)"
            )
        elif w.name == "mlflow":
            lines.append(f"MLflow:      mlflow ui --backend-store-uri {getattr(w, 'tracking_uri', '')}")
        elif w.name == "wandb":
            run = getattr(w, "run", None)
            lines.append(f"W&B:         wandb sync {Path(run.dir).parent if run else ''}")
        else:
            lines.append(f"{w.name}")
    return lines


def default_config(steps: int, log_dir: str, backends: Sequence[str]) -> dict[str, Any]:
    return {
        "model": {
            "num_hierarchies": 3,
            "architecture": {"image": 32, "patch": 4, "dim": 64, "depth": 2, "heads": 4, "block": 4},
            "ema": {"momentum_start": 0.996, "momentum_end": 1.0},
        },
        "loss": {"hierarchy_weights": [1.0, 0.5, 0.25]},
        "training": {
            "steps": steps,
            "batch_size": 32,
            "lr": 1e-3,
            "clip_grad": 1.0,
            "seed": 0,
            "log_frequency": 5,
            "ema_log_frequency": 25,
            "media_log_frequency": 100,
            "val_every_epochs": 2,
            "train_images": 1024,
            "val_images": 128,
        },
        "logging": {"experiment_name": "hjepa_demo", "log_dir": log_dir, "backends": list(backends)},
    }


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=800, help="training steps (default 800: about a minute)")
    parser.add_argument("--log-dir", default="runs/hjepa_demo")
    parser.add_argument(
        "--backends",
        default="jsonl,tensorboard",
        help="comma-separated: jsonl, tensorboard, wandb, mlflow (default jsonl,tensorboard)",
    )
    parser.add_argument(
        "--config", help="a YAML/JSON file with the guide's logging: section (overrides --backends)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    config = default_config(args.steps, args.log_dir, backends)
    logging_config: Any = args.config or config["logging"]
    if "wandb" in backends and not args.config:
        logging_config = {**config["logging"], "wandb": {"mode": "offline", "project": "hjepa_demo"}}
    writer = build_writers(logging_config)
    trainer = HJEPATrainer(config, writer, progress=not args.no_progress)
    with trainer.tb_logger:
        validation = trainer.train()
    print("\nlogs:")
    for line in where_to_look(writer):
        print("  " + line)
    if trainer.tb_logger.alerts:
        print(f"alerts: {len(trainer.tb_logger.alerts)} (first: {trainer.tb_logger.alerts[0]})")
    return validation


if __name__ == "__main__":
    main()
