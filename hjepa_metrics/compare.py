"""Several runs side by side: overlaid dashboard charts and a table of each tag's last, min and max."""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from writers import iter_jsonl
from writers.records import DEFAULT_FILENAME, one_run, run_file

from . import registry
from .layout import dashboard_tree
from .replay import levels_in
from .report import label_panel, panel_grid, save_grid, series_by_tag, slug
from .report_html import png_data_uri

# A difference counts when it exceeds this many times the larger run's step-to-step noise.
NOISE_FACTOR = 3.0

Series = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class Comparison:
    """What :func:`compare_runs` found and wrote."""

    names: list[str]
    rows: list[tuple[str, list[tuple[float, float, float] | None], bool]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    page: Path | None = None

    def text(self) -> str:
        """The table: per tag, each run's ``last (min..max)``; ``*`` where the runs differ by more than
        their noise."""
        header = ["tag", *self.names, "differs"]
        body = [
            [
                tag,
                *(_cell(s) for s in stats),
                "*" if differs else "",
            ]
            for tag, stats, differs in self.rows
        ]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body]
        ]
        marked = sum(d for _, _, d in self.rows)
        return "\n".join(
            [
                *lines,
                "",
                f"{marked} of {len(self.rows)} tags differ by more than {NOISE_FACTOR:g}x their noise",
            ]
        )


def _cell(stats: tuple[float, float, float] | None) -> str:
    """One run's ``last (min..max)`` of a tag, ``-`` where it did not log it."""
    return f"{stats[0]:.4g} ({stats[1]:.4g}..{stats[2]:.4g})" if stats else "-"


def run_name(path: str | os.PathLike[str]) -> str:
    p = run_file(path)
    return p.parent.resolve().name if p.name == DEFAULT_FILENAME else p.stem


def step_noise(values: np.ndarray) -> float:
    """The step-to-step noise of a series: the spread of consecutive differences, / √2 (0 with < 3 points)."""
    finite = values[np.isfinite(values)]
    if finite.size < 3:
        return 0.0
    return float(np.std(np.diff(finite), ddof=1) / math.sqrt(2))


def _stats(series: Series, tag: str) -> tuple[float, float, float] | None:
    if tag not in series:
        return None
    finite = series[tag][1][np.isfinite(series[tag][1])]
    if not finite.size:
        return None
    return float(finite[-1]), float(finite.min()), float(finite.max())


def differs(runs: list[Series], tag: str) -> bool:
    """Whether the runs' last values of ``tag`` differ by more than :data:`NOISE_FACTOR` times the larger
    step-to-step noise of the runs (any difference, for noiseless series)."""
    lasts, noise = [], 0.0
    for series in runs:
        stats = _stats(series, tag)
        if stats is None:
            return False
        lasts.append(stats[0])
        noise = max(noise, step_noise(series[tag][1]))
    return max(lasts) - min(lasts) > NOISE_FACTOR * noise


def compare_runs(paths: list[str | os.PathLike[str]], out_dir: str | os.PathLike[str]) -> Comparison:
    """Overlay the runs per dashboard category (``NN_<category>.png``), tabulate every scalar tag they
    log, and write ``compare.html`` (self-contained) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")

    if len(paths) < 2:
        raise ValueError(f"runs: got {len(paths)}; expected at least two to compare")
    runs = [series_by_tag(list(one_run(p, iter_jsonl(p)))) for p in paths]
    names = [run_name(p) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{i + 1}:{n}" for i, n in enumerate(names)]
    result = Comparison(names)
    tags = sorted(set().union(*runs))
    result.rows = [(tag, [_stats(s, tag) for s in runs], differs(runs, tag)) for tag in tags]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = max(levels_in(s) for s in runs)
    marked = {tag for tag, _, d in result.rows if d}
    for index, (category, charts) in enumerate(dashboard_tree(n, cuda=registry.any_cuda_only(tags)), 1):
        panels = [
            tag for _, chart_tags in charts for tag in chart_tags if any(f"train/{tag}" in s for s in runs)
        ]
        if not panels:
            continue
        fig, axes = panel_grid(len(panels))
        for ax, tag in zip(axes, panels, strict=False):
            for name, series in zip(names, runs, strict=True):
                if f"train/{tag}" in series:
                    steps, values = series[f"train/{tag}"]
                    ax.plot(steps, values, label=name)
            label_panel(ax, tag + (" *" if f"train/{tag}" in marked else ""), tag)
            ax.legend(fontsize=6)
        title = f"{category} (* differs beyond noise)"
        result.figures.append(
            save_grid(fig, axes, len(panels), title, out / f"{index:02d}_{slug(category)}.png")
        )
    result.page = out / "compare.html"
    result.page.write_text(_page(result), encoding="utf-8")
    return result


def _page(result: Comparison) -> str:
    e = html.escape
    head = "".join(f"<th>{e(n)}</th>" for n in result.names)
    rows = "".join(
        f"<tr{' class=d' if d else ''}><td>{e(tag)}</td>"
        + "".join(f"<td>{_cell(s)}</td>" for s in stats)
        + f"<td>{'*' if d else ''}</td></tr>"
        for tag, stats, d in result.rows
    )
    images = "".join(
        f'<figure><img alt="{e(p.stem)}" src="{png_data_uri(p)}"></figure>' for p in result.figures
    )
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>Run comparison</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px}"
        "table{border-collapse:collapse;font-size:.8em}td,th{border:1px solid #ddd;padding:.2em .4em}"
        ".d{background:#fef7e0}img{max-width:100%}"
        f"</style></head><body><h1>Run comparison</h1><p>{e(', '.join(result.names))}</p>{images}"
        f"<h2>Tags (last, min..max; * differs by more than {NOISE_FACTOR:g}x the step-to-step noise)</h2>"
        f"<table><tr><th>tag</th>{head}<th>differs</th></tr>{rows}</table></body></html>"
    )
