"""The toy H-JEPA of the demo: synthetic images, I-JEPA block masking, a context encoder with an EMA
target encoder and a predictor over three levels, and a weighted hierarchical loss. Small enough to
train on a CPU in about a minute; nothing here knows about logging."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- synthetic data


def synthetic_images(count: int, size: int, seed: int) -> torch.Tensor:
    """``[count, 3, size, size]`` images in [0, 1]: a colour gradient under an oriented texture (a
    grating of random frequency and angle per image), plus bright rectangles and discs, so nearby
    patches are predictable from context, far ones are not, and no two patches look alike."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = torch.rand(count, 3, 1, 1, generator=gen)
    slope = torch.rand(count, 3, 2, generator=gen) - 0.5
    images = base + slope[..., 0, None, None] * ys + slope[..., 1, None, None] * xs
    angle = torch.rand(count, 1, 1, generator=gen) * math.pi
    freq = 2 + torch.rand(count, 1, 1, generator=gen) * 6
    phase = torch.rand(count, 1, 1, generator=gen) * 2 * math.pi
    wave = torch.sin(2 * math.pi * freq * (ys * torch.cos(angle) + xs * torch.sin(angle)) + phase)
    tint = torch.rand(count, 3, 1, 1, generator=gen) - 0.5
    images = images + 0.2 * wave.unsqueeze(1) * tint
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
        x = self.embed(self.patches((images - 0.5) / 0.25))  # centred pixels, as a ViT's normalization
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
    (level 0), their 2×2 pools (level 1) and each block's mean (level 2). ``stop_gradient=False``
    computes targets with the online encoder and its gradients instead: the classic JEPA bug that
    lets every representation collapse to one vector (the demo's collapse scenario)."""

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
        stop_gradient: bool = True,
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
        self.stop_gradient = stop_gradient

    def get_num_patches(self) -> int:
        return self.grid * self.grid

    def representations(self, context: torch.Tensor) -> list[torch.Tensor]:
        """The context encoder's patch tokens ``[B, 1 + N, D]`` (CLS first) at each level's scale: the
        tokens, their 2×2 pools and their block-size pools (``[B, N_l, D]``), whose collapse is watched."""
        b = context.shape[0]
        grid = context[:, 1:].transpose(1, 2).reshape(b, self.dim, self.grid, self.grid)
        pools = [grid, F.avg_pool2d(grid, 2), F.avg_pool2d(grid, self.block)]
        return [p.flatten(2).transpose(1, 2) for p in pools]

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
        if self.stop_gradient:
            with torch.no_grad():
                target = F.layer_norm(self.target_encoder(images)[:, 1:], (self.dim,))
        else:  # the classic bug: targets from the online encoder, with gradients: a path to collapse
            target = F.layer_norm(self.context_encoder(images)[:, 1:], (self.dim,))
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
