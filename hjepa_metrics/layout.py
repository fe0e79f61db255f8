"""Custom-scalars layouts generated from the registry.

:func:`guide_layout` is the guide's JSON format (equal to the guide's file for 3 levels).
:func:`dashboard_layout` is the same format as the logger writes it by default: the guide's charts,
without those that cannot have data on this machine, one unit per chart, validation beside training.
:func:`tensorboard_layout` is TensorBoard's own ``Layout`` proto, the only form TensorBoard reads.
"""

from __future__ import annotations

from typing import Any

from .registry import TagSpec, lookup, specs_by_category

LayoutNode = dict[str, Any]


def level_scale(level: int, num_hierarchies: int) -> str:
    """``Finest`` for level 0, ``Coarse`` for the last level, ``Medium`` between."""
    if level == 0:
        return "Finest"
    return "Coarse" if level == num_hierarchies - 1 else "Medium"


def layout_tree(num_hierarchies: int = 3) -> list[tuple[str, list[tuple[str | None, list[str]]]]]:
    """``[(category, [(chart title or None for a direct tag, [tags]), ...]), ...]`` without prefixes.

    Per-level charts (title over ``{level}``) become one chart per level. Consecutive per-level specs
    that share a chart (or sit directly under a category) expand level-major, as the guide lists them.
    """
    if num_hierarchies < 1:
        raise ValueError(f"num_hierarchies: got {num_hierarchies}; expected >= 1")
    tree = []
    for category, specs in specs_by_category().items():
        charts: dict[str | None, list[str]] = {}
        order: list[str | None] = []
        for title, run in _runs(specs):
            for chart_title, tags in _expand_run(title, run, num_hierarchies):
                if chart_title not in charts:
                    charts[chart_title] = []
                    order.append(chart_title)
                charts[chart_title].extend(tags)
        entries: list[tuple[str | None, list[str]]] = []
        for title in order:
            if title is None:
                entries.extend((None, [t]) for t in charts[title])
            else:
                entries.append((title, charts[title]))
        tree.append((category, entries))
    return tree


def _runs(specs: list[TagSpec]) -> list[tuple[str | None, list[TagSpec]]]:
    """Group consecutive specs sharing a chart title and per-level-ness."""
    runs: list[tuple[str | None, list[TagSpec]]] = []
    for spec in specs:
        if runs and runs[-1][0] == spec.chart and runs[-1][1][-1].per_level == spec.per_level:
            runs[-1][1].append(spec)
        else:
            runs.append((spec.chart, [spec]))
    return runs


def _expand_run(title: str | None, run: list[TagSpec], n: int) -> list[tuple[str | None, list[str]]]:
    if not run[0].per_level:
        return [(title, [t for spec in run for t in spec.expand(n)])]
    out: list[tuple[str | None, list[str]]] = []
    for level in range(n):
        level_tags = [spec.template.format(level=level) for spec in run if spec.in_layout(level)]
        chart = title.format(level=level, scale=level_scale(level, n)) if title else None
        out.append((chart, level_tags))
    if title is None or "{level}" not in title:
        return [(out[0][0], [t for _, tags in out for t in tags])]
    return out


def guide_layout(num_hierarchies: int = 3, prefix: str = "train/") -> dict[str, Any]:
    """The guide's ``tensorboard_layout.json`` structure for ``num_hierarchies`` levels."""
    categories = []
    for category, entries in layout_tree(num_hierarchies):
        children: list[Any] = []
        for title, tags in entries:
            if title is None:
                children.extend(prefix + t for t in tags)
            else:
                children.append({"title": title, "closed": False, "children": [prefix + t for t in tags]})
        categories.append({"title": category, "closed": False, "children": children})
    return {"category": categories}


def _spec(tag: str) -> TagSpec:
    match = lookup(tag)
    assert match is not None, tag  # the layout is generated from the registry
    return match.spec


def dashboard_tree(
    num_hierarchies: int = 3, *, cuda: bool = False
) -> list[tuple[str, list[tuple[str, list[str]]]]]:
    """:func:`layout_tree` for a dashboard: every chart titled, CUDA-only tags dropped unless ``cuda``
    (a chart left empty goes), and a chart whose tags have different units split into one chart per
    unit, titled ``<title> (<unit>)`` (an effective rank near 16 flattens cosines in [0, 1])."""
    tree = []
    for category, entries in layout_tree(num_hierarchies):
        charts: list[tuple[str, list[str]]] = []
        for title, tags in entries:
            kept = [t for t in tags if cuda or not _spec(t).cuda_only]
            by_unit: dict[str, list[str]] = {}
            for tag in kept:
                by_unit.setdefault(_spec(tag).unit, []).append(tag)
            if title is None:
                charts.extend((tag, [tag]) for tag in kept)
            elif len(by_unit) == 1:
                charts.append((title, kept))
            elif by_unit:
                charts.extend((f"{title} ({unit})", unit_tags) for unit, unit_tags in by_unit.items())
        if charts:
            tree.append((category, charts))
    return tree


def dashboard_layout(
    num_hierarchies: int = 3, prefix: str = "train/", *, cuda: bool = False, validation_prefix: str = "val/"
) -> dict[str, Any]:
    """The layout the logger writes (guide JSON shape, see :func:`dashboard_tree`): each chart of a tag
    that validation logs also draws ``validation_prefix`` + tag, so validation curves appear beside the
    training ones once validation is logged (and nothing is drawn empty before)."""
    categories = []
    for category, charts in dashboard_tree(num_hierarchies, cuda=cuda):
        children = []
        for title, tags in charts:
            shown = [prefix + t for t in tags]
            if validation_prefix and validation_prefix != prefix:
                shown += [validation_prefix + t for t in tags if _spec(t).validated]
            children.append({"title": title, "closed": False, "children": shown})
        categories.append({"title": category, "closed": False, "children": children})
    return {"category": categories}


def tensorboard_layout(num_hierarchies: int = 3, prefix: str = "train/", *, guide: bool = True) -> Any:
    """TensorBoard's ``custom_scalar.layout_pb2.Layout`` for :func:`guide_layout` (or, ``guide=False``,
    :func:`dashboard_layout` for this machine), with exact-match regexes. A tag the guide lists directly
    under a category becomes a chart of its own, titled by the tag. Needs the ``tensorboard`` extra.
    """
    from writers.tensorboard import layout_proto

    if guide:
        return layout_proto(guide_layout(num_hierarchies, prefix))
    return layout_proto(dashboard_layout(num_hierarchies, prefix, cuda=_has_cuda()))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
