"""A training-health report from a JSONL run: one PNG per dashboard category, the alerts, a summary."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from writers import RecordError, iter_jsonl
from writers.records import one_run, run_file

from . import registry
from .alerts import DEFAULT_REPEAT_INTERVAL, FEATURE_DIM, Alert, AlertMonitor, health_verdict, saved_settings
from .layout import dashboard_tree
from .replay import inside_run, levels_in


@dataclass
class Report:
    """What :func:`build_report` wrote: the figures, the alerts in order, and the summary lines."""

    out_dir: Path
    figures: list[Path] = field(default_factory=list)
    page: Path | None = None
    alerts: list[Alert] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = ["Training-health report", "", *self.summary, ""]
        lines.append(f"Alerts ({len(self.alerts)}):" if self.alerts else "Alerts: none")
        lines += [f"  - {a}" for a in self.alerts]
        lines += ["", f"Figures in {self.out_dir}:", *(f"  - {p.name}" for p in self.figures)]
        if self.page is not None:
            lines += ["", f"HTML report (self-contained): {self.page}"]
        return "\n".join(lines)


def series_by_tag(records: list[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    raw: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for tag, value in r.get("metrics", {}).items():
            raw.setdefault(tag, []).append((r["step"], float(value)))
    return {t: (np.array([s for s, _ in v]), np.array([x for _, x in v])) for t, v in raw.items()}


def _last(series: dict[str, tuple[np.ndarray, np.ndarray]], tag: str) -> float | None:
    if tag not in series:
        return None
    finite = series[tag][1][np.isfinite(series[tag][1])]
    return float(finite[-1]) if finite.size else None


def _fires_at_end(series: dict[str, tuple[np.ndarray, np.ndarray]], tag: str, n: int) -> str | None:
    """The rule's text when the last finite value of ``tag`` is outside the registry's range."""
    match = registry.lookup(tag)
    value = _last(series, tag)
    if match is None or match.spec.alert is None or value is None:
        return None
    level, rule = match.level, match.spec.alert
    prefix = tag[: len(tag) - len(registry.strip_prefix(tag))]
    dim = _last(series, prefix + FEATURE_DIM.format(level=level)) if level is not None else None
    width = int(dim) if dim is not None else None
    if rule.fires(value, level=level, num_hierarchies=n, dim=width):
        return f"{tag} = {value:.3g} ({rule.describe(level=level, dim=width)})"
    return None


def summarize(
    series: dict[str, tuple[np.ndarray, np.ndarray]],
    num_hierarchies: int,
    alerts: list[Alert],
    crossings: int | None = None,
) -> list[str]:
    """Loss trend, collapse risk and clipping share in a few sentences, judged by the registry's rules.

    ``crossings`` is the number of threshold crossings, rate-limited ones included (default: one per
    alert)."""
    lines = []
    loss = series.get("train/" + registry.TOTAL_LOSS)
    if loss is not None and np.isfinite(loss[1]).sum() >= 2:
        steps, values = loss[0][np.isfinite(loss[1])], loss[1][np.isfinite(loss[1])]
        tail = max(2, len(values) // 5)
        slope = float(np.polyfit(steps[-tail:], values[-tail:], 1)[0]) if np.ptp(steps[-tail:]) > 0 else 0.0
        change = (values[-1] - values[0]) / abs(values[0]) if values[0] else math.nan
        trend = "still decreasing" if slope < 0 else "flat or rising"
        lines.append(
            f"Loss: {values[0]:.4g} -> {values[-1]:.4g} ({100 * change:+.1f}%) "
            f"over steps {steps[0]}-{steps[-1]}; "
            f"{trend} at the end (slope {slope:.3g} per step over the last {tail} points)."
        )
    collapse_tags = sorted(
        t for t in series if (m := registry.lookup(t)) is not None and m.spec.group == "collapse"
    )
    if collapse_tags:
        now = [f for t in collapse_tags if (f := _fires_at_end(series, t, num_hierarchies))]
        during = {a.tag for a in alerts if a.tag in collapse_tags}
        if now:
            lines.append(f"Collapse risk: HIGH ({'; '.join(now)}).")
        elif during:
            lines.append(
                f"Collapse risk: MODERATE (alerts during the run on {', '.join(sorted(during))}; "
                "back in range at the end)."
            )
        else:
            lines.append("Collapse risk: LOW (no collapse alert fired).")
    clip_tag = "train/" + registry.CLIPPING_SHARE
    clip, clip_match = _last(series, clip_tag), registry.lookup(clip_tag)
    if clip is not None and clip_match is not None:
        fired = _fires_at_end(series, clip_tag, num_hierarchies)
        verdict = f"{clip_match.spec.alert.message}?" if fired and clip_match.spec.alert else "no alert"
        lines.append(
            f"Gradient clipping: {clip:.1f}% of logged steps ({verdict}; healthy: {clip_match.spec.healthy})."
        )
    held_back = crossings is not None and crossings != len(alerts)
    lines.append(f"Alerts fired: {len(alerts)}" + (f" ({crossings} crossings)." if held_back else "."))
    return lines


SPECTRUM = "collapse/level{level}_spectrum"


def _last_records(records: list[dict[str, Any]], kind: str, template: str) -> dict[str, dict[str, Any]]:
    """The last record of ``kind`` per tag whose registry template is ``template`` (any prefix)."""
    last: dict[str, dict[str, Any]] = {}
    for r in records:
        match = registry.lookup(r["tag"]) if r.get("kind") == kind else None
        if match is not None and match.spec.template == template:
            last[r["tag"]] = r
    return last


def _spectrum_figure(records: list[dict[str, Any]], target: Path) -> Path | None:
    """A log-log chart of each level's last logged eigenspectrum (``λ_i/λ₁`` against ``i``), rebuilt from
    its histogram (bucket resolution), or ``None`` when no spectrum was logged."""
    import matplotlib.pyplot as plt

    last = _last_records(records, "histogram", SPECTRUM)
    if not last:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for tag, r in sorted(last.items()):
        edges, counts = np.asarray(r["edges"]), np.asarray(r["counts"])
        order = np.argsort(edges[1:])[::-1]  # the largest eigenvalues first: rank 1 is λ₁
        ranks = np.cumsum(counts[order])
        keep = counts[order] > 0
        ax.step(ranks[keep], 10.0 ** edges[1:][order][keep], where="pre", label=f"{tag} (step {r['step']})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rank i")
    ax.set_ylabel("λ_i / λ₁")
    ax.set_title("Eigenspectrum of the features (the effective rank's eigenvalues)", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(target, dpi=80)
    plt.close(fig)
    return target


PCA = "collapse/level{level}_pca"


def _pca_figure(records: list[dict[str, Any]], run_dir: Path, target: Path) -> Path | None:
    """Each level's last PCA scatter (``log_embedding``) side by side, or ``None`` when none was logged."""
    import matplotlib.pyplot as plt

    last = _last_records(records, "image", PCA)
    if not last:
        return None
    fig, axes = plt.subplots(1, len(last), figsize=(4 * len(last), 4.3), squeeze=False)
    for ax, (tag, r) in zip(axes.flat, sorted(last.items()), strict=True):
        ax.imshow(plt.imread(inside_run(run_dir.resolve(), r["path"])))
        ax.set_title(f"{tag}, step {r['step']}\nsample on the 2 principal axes (colour: label)", fontsize=8)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(target, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return target


def panel_grid(count: int) -> tuple[Any, list[Any]]:
    """A figure with ``count`` panels, at most 4 per row, and its axes in reading order."""
    import matplotlib.pyplot as plt

    cols = min(4, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    return fig, list(axes.flat)


def label_panel(ax: Any, title: str, tag: str) -> None:
    """Title, the step axis and the tag's unit from the registry."""
    match = registry.lookup(tag)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("step", fontsize=7)
    ax.set_ylabel(match.spec.unit if match is not None else "", fontsize=7)
    ax.tick_params(labelsize=7)


def save_grid(fig: Any, axes: list[Any], used: int, title: str, target: Path) -> Path:
    """Hide the panels past ``used``, title the figure and write it to ``target``."""
    import matplotlib.pyplot as plt

    for ax in axes[used:]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(target, dpi=80)
    plt.close(fig)
    return target


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def build_report(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    num_hierarchies: int | None = None,
    run: int | None = None,
    html: bool = False,
) -> Report:
    """Write ``NN_<category>.png`` per guide dashboard category and ``report.md`` into ``out_dir``.

    Alerts are checked as the logger checked them live, with the settings it saved in the run's config
    (warm-up, rate limit, levels). A file holding several training runs (steps restarting) is refused
    unless ``run`` picks one (from 1)."""
    import matplotlib

    matplotlib.use("Agg")

    records = list(one_run(path, iter_jsonl(path), run))
    series = series_by_tag(records)
    if not series:
        raise RecordError(f"{run_file(path)}: no scalar records; nothing to report")
    config: dict[str, Any] = {}
    for r in records:
        if r.get("kind") == "config":
            config.update(r["config"])
    settings = {"num_hierarchies": levels_in(series), **saved_settings(config)}
    if num_hierarchies:
        settings["num_hierarchies"] = num_hierarchies
    n = settings["num_hierarchies"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out)
    monitor = AlertMonitor(
        num_hierarchies=n,
        log_alerts=False,
        warmup_steps=settings.get("warmup_steps", 0),
        repeat_interval=settings.get("repeat_interval", DEFAULT_REPEAT_INTERVAL),
    )
    for r in records:
        if "metrics" in r:
            monitor.check(r["metrics"], r["step"])
    report.alerts = list(monitor.fired)
    for index, (category, charts) in enumerate(dashboard_tree(n, cuda=registry.any_cuda_only(series)), 1):
        # one panel per tag (train solid, val dashed): the guide's charts mix scales (rank next to std)
        panels = [(title, tag) for title, tags in charts for tag in tags]
        fig, axes = panel_grid(len(panels))
        for ax, (title, tag) in zip(axes, panels, strict=False):
            drawn = False
            for prefix, style in (("train/", "-"), ("val/", "--")):
                if prefix + tag in series:
                    steps, values = series[prefix + tag]
                    ax.plot(
                        steps, values, style, marker="." if len(steps) < 30 else None, label=prefix.strip("/")
                    )
                    drawn = True
            for alert in report.alerts:
                if alert.tag in (f"train/{tag}", f"val/{tag}"):
                    ax.axvline(alert.step, color="red", alpha=0.25, linewidth=1)
            name = tag.split("/", 1)[-1]
            label_panel(ax, name if title == tag else f"{title}: {name}", tag)
            if drawn:
                ax.legend(fontsize=6)
            else:
                ax.text(
                    0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray"
                )
        title = f"{category} (red: alert)" if report.alerts else category
        report.figures.append(
            save_grid(fig, axes, len(panels), title, out / f"{index:02d}_{slug(category)}.png")
        )

    spectrum = _spectrum_figure(records, out / f"{len(report.figures) + 1:02d}_eigenspectrum.png")
    if spectrum is not None:
        report.figures.append(spectrum)
    pca = _pca_figure(
        records, run_file(path).parent, out / f"{len(report.figures) + 1:02d}_embeddings_pca.png"
    )
    if pca is not None:
        report.figures.append(pca)
    report.summary = summarize(series, n, report.alerts, sum(monitor.crossings.values()))
    md = ["# Training-health report", "", f"Run: `{path}`", "", *(f"- {line}" for line in report.summary), ""]
    md += ["## Alerts", ""] + (
        [f"- step {a.step}: `{a.tag}` = {a.value:.6g} ({a.rule})" for a in report.alerts] or ["None."]
    )
    md += ["", "## Dashboard", ""] + [f"![{p.stem}]({p.name})" for p in report.figures]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    if html:
        from .report_html import html_page

        report.page = out / "report.html"
        page = html_page(
            run=str(path),
            verdict=health_verdict(monitor),
            summary=report.summary,
            alerts=report.alerts,
            figures=report.figures,
            config=config,
        )
        report.page.write_text(page, encoding="utf-8")
    return report
