"""Learning rates: ``learning_rate/*``."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._tensor import scalar_tensor, to_host


def learning_rate(optimizer: Any) -> dict[str, float]:
    """``base_lr`` (param group 0) and ``param_group_{i}`` for every group.

    ``optimizer`` is anything with ``param_groups`` (a torch optimizer, a wrapped one) or the
    list of param-group dicts itself. Tensor learning rates are read with one host transfer.
    """
    return with_base_lr(to_host(group_learning_rates(optimizer)))


def with_base_lr(rates: Mapping[str, float]) -> dict[str, float]:
    """The group rates with ``learning_rate/base_lr`` (group 0's) first."""
    return {"learning_rate/base_lr": rates["learning_rate/param_group_0"], **rates}


def group_learning_rates(optimizer: Any) -> dict[str, torch.Tensor | float]:
    """``learning_rate/param_group_{i}`` → the group's rate (a float or a 0-d tensor), checked."""
    groups = getattr(optimizer, "param_groups", optimizer)
    if type(groups) is list and groups:  # a torch optimizer's float rates, read without the checks' cost
        fast: dict[str, torch.Tensor | float] = {}
        for tag, group in zip(_group_tags(len(groups)), groups):  # noqa: B905 (same length)
            lr = group.get("lr") if type(group) is dict else None
            if type(lr) is not float:
                break
            fast[tag] = lr
        else:
            return fast
    if not isinstance(groups, Sequence) or not groups or not all(isinstance(g, Mapping) for g in groups):
        raise TypeError(
            f"optimizer: got {type(optimizer).__name__}; expected an optimizer with param_groups "
            "or a non-empty list of param-group dicts"
        )
    raw: dict[str, torch.Tensor | float] = {}
    for (i, group), tag in zip(enumerate(groups), _group_tags(len(groups)), strict=True):
        if "lr" not in group:
            raise KeyError(f"optimizer.param_groups[{i}]: no 'lr' key (keys: {sorted(group)})")
        raw[tag] = scalar_tensor(group["lr"], f"optimizer.param_groups[{i}]['lr']")
    return raw


@functools.cache
def _group_tags(count: int) -> tuple[str, ...]:
    return tuple(f"learning_rate/param_group_{i}" for i in range(count))
