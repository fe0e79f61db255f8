"""Hierarchical losses: ``loss/*``."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence

import torch

from ._tensor import Scalar, scalar_tensor, to_host

_LEVEL_KEY = re.compile(r"^loss_h(\d+)$")


def loss_inputs(
    loss_dict: Mapping[str, Scalar], num_hierarchies: int | None = None
) -> dict[str, torch.Tensor | float]:
    """The checked scalars of ``loss_dict`` that the loss tags are computed from: ``loss``,
    ``loss_h{i}`` for each level and ``loss_unweighted`` when present (floats or 0-d tensors)."""
    if type(loss_dict) is not dict and not isinstance(loss_dict, Mapping):  # a dict skips the ABC check
        raise TypeError(
            f"loss_dict: got {type(loss_dict).__name__}; expected a mapping of loss names to values"
        )
    if num_hierarchies is None:
        num_hierarchies = sum(1 for k in loss_dict if _LEVEL_KEY.match(str(k)))
    if num_hierarchies < 1:
        raise ValueError(f"loss_dict: found no 'loss_h{{i}}' keys (keys: {sorted(map(str, loss_dict))})")
    keys = _input_keys(num_hierarchies)
    if "loss_unweighted" in loss_dict:
        keys = (*keys, ("loss_unweighted", "loss_dict['loss_unweighted']"))
    inputs: dict[str, torch.Tensor | float] = {}
    for key, name in keys:
        try:
            value = loss_dict[key]
        except KeyError:
            raise KeyError(
                f"loss_dict: missing key {key!r} (got keys {sorted(map(str, loss_dict))})"
            ) from None
        inputs[key] = scalar_tensor(value, name)
    return inputs


@functools.cache
def _input_keys(num_hierarchies: int) -> tuple[tuple[str, str], ...]:
    """``(key, name in errors)`` of the inputs of a model of ``num_hierarchies`` levels."""
    keys = ("loss", *(f"loss_h{i}" for i in range(num_hierarchies)))
    return tuple((key, f"loss_dict[{key!r}]") for key in keys)


def hierarchical_losses(
    loss_dict: Mapping[str, Scalar],
    *,
    num_hierarchies: int | None = None,
    hierarchy_weights: Sequence[float] | None = None,
) -> dict[str, float]:
    """Total, per-level, unweighted losses and each level's share (%) of the weighted level loss.

    ``loss_dict`` holds ``"loss"`` and ``"loss_h{i}"`` (floats or 0-d tensors, any device),
    optionally ``"loss_unweighted"``. ``num_hierarchies`` defaults to the number of ``loss_h{i}``
    keys. ``loss/contribution_h{i} = 100 · w_i·loss_h{i} / Σ_j w_j·loss_h{j}`` so the shares sum
    to 100; they are omitted when that denominator is not positive.
    """
    return losses_from_inputs(to_host(loss_inputs(loss_dict, num_hierarchies)), hierarchy_weights)


def losses_from_inputs(
    inputs: Mapping[str, float], hierarchy_weights: Sequence[float] | None
) -> dict[str, float]:
    """:func:`hierarchical_losses` of inputs already checked by :func:`loss_inputs` and read to the host."""
    given = inputs.get("loss_unweighted")
    count = len(inputs) - 1 - (given is not None)
    levels = [inputs[key] for key, _ in _input_keys(count)[1:]]
    out = {"loss/total": inputs["loss"]}
    for tag, value in zip(_level_tags(count), levels):  # noqa: B905 (both of `count`)
        out[tag] = value
    if given is not None:
        out["loss/unweighted"] = given
    # a finite sum means every value is finite: count them one by one only when it is not
    total = sum(out.values())
    out["health/loss_nonfinite"] = (
        0.0 if math.isfinite(total) else float(sum(not math.isfinite(v) for v in out.values()))
    )
    if given is None:
        out["loss/unweighted"] = sum(levels) / count
    weighted = (
        levels
        if hierarchy_weights is None
        else [w * v for w, v in zip(checked_weights(hierarchy_weights, count), levels)]  # noqa: B905
    )
    denominator = sum(weighted)
    if math.isfinite(denominator) and denominator > 0:  # of an infinite total: undefined, never 0 %
        for tag, part in zip(_contribution_tags(count), weighted):  # noqa: B905
            out[tag] = 100.0 * part / denominator
    return out


@functools.cache
def _level_tags(num_hierarchies: int) -> tuple[str, ...]:
    return tuple(f"loss/h{i}" for i in range(num_hierarchies))


@functools.cache
def _contribution_tags(num_hierarchies: int) -> tuple[str, ...]:
    return tuple(f"loss/contribution_h{i}" for i in range(num_hierarchies))


def checked_weights(hierarchy_weights: Sequence[float] | None, num_hierarchies: int) -> list[float]:
    if hierarchy_weights is None:
        return [1.0] * num_hierarchies
    weights = [float(w) for w in hierarchy_weights]
    if len(weights) != num_hierarchies:
        raise ValueError(
            f"hierarchy_weights: got {len(weights)} weights {weights}; "
            f"expected {num_hierarchies} (one per level)"
        )
    return weights
