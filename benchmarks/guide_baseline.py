"""A logger written the way the guide's original H-JEPA logger works, as the benchmarks' naive baseline.

One ``.item()`` per scalar, per-parameter Python loops, a full SVD of the first 10,000 rows, a 500×500
similarity block on rows drawn from the global RNG, and one ``SummaryWriter.add_scalar`` per scalar.
It reproduces the original's costs, not its bugs' numbers: do not use it for anything else.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F


class GuideStyleLogger:
    def __init__(self, logdir: str, num_hierarchies: int = 3) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(logdir)
        self.num_hierarchies = num_hierarchies
        self.clip_count = 0
        self.calls = 0

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        self.writer.add_scalar(tag, value.item() if isinstance(value, torch.Tensor) else value, step)

    def log_hierarchical_losses(self, loss_dict: dict[str, Any], global_step: int) -> None:
        self._scalar("train/loss/total", loss_dict["loss"], global_step)
        for i in range(self.num_hierarchies):
            self._scalar(f"train/loss/h{i}", loss_dict[f"loss_h{i}"], global_step)
            contribution = 100 * loss_dict[f"loss_h{i}"].item() / loss_dict["loss"].item()
            self._scalar(f"train/loss/contribution_h{i}", contribution, global_step)

    def log_masking_statistics(self, mask: torch.Tensor, num_patches: int, global_step: int) -> None:
        masked = mask.float().sum(dim=-1).mean().item()
        self._scalar("train/masking/mask_ratio", masked / num_patches, global_step)
        self._scalar("train/masking/num_masked_patches", masked, global_step)
        self._scalar("train/masking/num_unmasked_patches", num_patches - masked, global_step)

    def log_prediction_quality(
        self, predictions: list[torch.Tensor], targets: list[torch.Tensor], global_step: int
    ) -> None:
        for level, (p, t) in enumerate(zip(predictions, targets, strict=True)):
            cos = F.cosine_similarity(p, t, dim=-1)
            self._scalar(f"train/prediction/level{level}_cosine_sim_mean", cos.mean(), global_step)
            self._scalar(f"train/prediction/level{level}_cosine_sim_std", cos.std(), global_step)
            self._scalar(f"train/prediction/level{level}_cosine_sim_min", cos.min(), global_step)
            self._scalar(f"train/prediction/level{level}_cosine_sim_max", cos.max(), global_step)
            mse = F.mse_loss(F.normalize(p, dim=-1), F.normalize(t, dim=-1))
            self._scalar(f"train/prediction/level{level}_normalized_mse", mse, global_step)

    def log_collapse_metrics(self, features: torch.Tensor, level: int, global_step: int) -> None:
        f = F.normalize(features, dim=-1)
        std = f.std(dim=0)
        self._scalar(f"train/collapse/level{level}_mean_std_per_dim", std.mean(), global_step)
        self._scalar(f"train/collapse/level{level}_min_std_per_dim", std.min(), global_step)
        _, s, _ = torch.linalg.svd(f[:10000], full_matrices=False)  # U and V computed and dropped
        p = s / s.sum()
        self._scalar(
            f"train/collapse/level{level}_effective_rank",
            torch.exp(-(p * torch.log(p + 1e-12)).sum()),
            global_step,
        )
        idx = torch.randperm(f.shape[0])[:500]  # the global RNG, as the original did
        sim = f[idx] @ f[idx].T
        off = sim[~torch.eye(len(idx), dtype=torch.bool)]
        self._scalar(f"train/collapse/level{level}_mean_similarity", off.mean(), global_step)

    def log_gradient_flow(self, model: torch.nn.Module, global_step: int) -> None:
        total = 0.0
        modules: dict[str, list[float]] = {}
        count = 0
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            total += p.grad.norm().item()
            modules.setdefault(name.split(".")[0], []).append(p.grad.abs().mean().item())
            count += 1
        self._scalar("train/gradient_flow/global_norm", total, global_step)
        for module, means in modules.items():
            self._scalar(f"train/gradient_flow/{module}_mean", sum(means) / count, global_step)

    def log_gradient_clipping(self, before: float, after: float, threshold: float, global_step: int) -> None:
        self.calls += 1
        self.clip_count += int(before > threshold)
        self._scalar("train/gradient/global_norm_before_clip", before, global_step)
        self._scalar("train/gradient/global_norm_after_clip", after, global_step)
        if self.calls % 100 == 0:
            self._scalar(
                "train/gradient/clipping_percentage", 100 * self.clip_count / self.calls, global_step
            )

    def log_learning_rate(self, optimizer: torch.optim.Optimizer, global_step: int) -> None:
        for i, group in enumerate(optimizer.param_groups):
            self._scalar(f"train/learning_rate/param_group_{i}", group["lr"], global_step)
        self._scalar("train/learning_rate/base_lr", optimizer.param_groups[0]["lr"], global_step)

    def log_hierarchy_feature_stats(
        self, predictions: list[torch.Tensor], targets: list[torch.Tensor], global_step: int
    ) -> None:
        for level, p in enumerate(predictions):
            self._scalar(f"train/hierarchy/level{level}_feat_mean", p.mean(), global_step)
            self._scalar(f"train/hierarchy/level{level}_feat_std", p.std(), global_step)
            self._scalar(f"train/hierarchy/level{level}_feat_range", p.max() - p.min(), global_step)
            self._scalar(f"train/hierarchy/level{level}_feat_norm", p.norm(dim=-1).mean(), global_step)
            self._scalar(f"train/hierarchy/level{level}_num_patches", p.shape[1], global_step)

    def log_training_stability(
        self, current_loss: float, loss_history: list[float], global_step: int
    ) -> None:
        h = torch.tensor(loss_history[-50:])
        self._scalar("train/stability/loss_smoothness", h.std(), global_step)
        recent = torch.tensor(loss_history[-20:])
        x = torch.arange(len(recent), dtype=torch.float32)
        slope = ((x - x.mean()) * (recent - recent.mean())).sum() / ((x - x.mean()) ** 2).sum()
        self._scalar("train/stability/loss_trend_slope", slope, global_step)
        self._scalar("train/stability/loss_spike_ratio", max(loss_history) / min(loss_history), global_step)

    def log_performance_metrics(
        self, batch_size: int, forward_time: float, backward_time: float, global_step: int
    ) -> None:
        self._scalar("train/performance/forward_time_ms", forward_time * 1000, global_step)
        self._scalar("train/performance/backward_time_ms", backward_time * 1000, global_step)
        self._scalar(
            "train/performance/samples_per_second", batch_size / (forward_time + backward_time), global_step
        )

    def close(self) -> None:
        self.writer.close()


class NaiveComputation(GuideStyleLogger):
    """The original logger's computation alone: its ``.item()`` per scalar, collected into one dict and
    written as one JSON line per step (no TensorBoard), the baseline for the computation's own cost."""

    def __init__(self, path: str, num_hierarchies: int = 3) -> None:
        self.num_hierarchies = num_hierarchies
        self.clip_count = 0
        self.calls = 0
        self.row: dict[str, float] = {}
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        self.row[tag] = value.item() if isinstance(value, torch.Tensor) else float(value)

    def end_step(self, step: int) -> None:
        self.file.write(json.dumps({"step": step, "metrics": self.row}) + "\n")
        self.file.flush()
        self.row = {}

    def close(self) -> None:
        self.file.close()


class NaiveDistributed(NaiveComputation):
    """:class:`NaiveComputation` under ``torch.distributed``, as hand-written DDP logging does it: each
    scalar averaged over the ranks with an ``all_reduce`` of its own before its ``.item()``."""

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        import torch.distributed as dist

        t = torch.tensor(float(value), dtype=torch.float64)
        dist.all_reduce(t)
        self.row[tag] = t.item() / dist.get_world_size()
