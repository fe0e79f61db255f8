"""The training-health report as one self-contained HTML page (figures inlined: no network to view it)."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from writers.base import flatten

from .alerts import Alert, HealthVerdict

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
.verdict{padding:.8em 1em;border-radius:6px;white-space:pre-wrap;font-family:monospace}
.healthy{background:#e6f4ea}.warning{background:#fef7e0}.collapse{background:#fce8e6}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:left}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:.8em;color:#555}
"""

# Marks the page once every image has decoded, so a browser test can tell a broken image from a slow one.
_CHECK = """
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = loaded + "/" + images.length;
});
"""


def png_data_uri(path: Path) -> str:
    """A PNG file as a ``data:`` URI, so a page shows it with nothing to fetch."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def html_page(
    *,
    run: str,
    verdict: HealthVerdict,
    summary: Sequence[str],
    alerts: Sequence[Alert],
    figures: Sequence[Path],
    config: Mapping[str, Any],
) -> str:
    """The page: verdict, summary, alerts table, every figure (PNG inlined as base64) and the config."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{a.step}</td><td>{e(a.tag)}</td><td>{a.value:.6g}</td><td>{e(a.rule)}</td></tr>"
        for a in alerts
    )
    alerts_html = (
        f"<table><tr><th>step</th><th>tag</th><th>value</th><th>rule</th></tr>{rows}</table>"
        if alerts
        else "<p>No alert fired.</p>"
    )
    images = "".join(
        f'<figure><img alt="{e(p.stem)}" src="{png_data_uri(p)}">'
        f"<figcaption>{e(p.stem)}</figcaption></figure>"
        for p in figures
    )
    flat = flatten(config)
    config_rows = "".join(
        f"<tr><td>{e(str(k))}</td><td>{e(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>"
        for k, v in flat.items()
    )
    config_html = f"<table>{config_rows}</table>" if flat else "<p>No config was logged.</p>"
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>Training-health report: {e(run)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>Training-health report</h1><p>Run: <code>{e(run)}</code></p>"
        f'<div class="verdict {e(verdict.status)}">{e(str(verdict))}</div>'
        f"<h2>Summary</h2><ul>{''.join(f'<li>{e(line)}</li>' for line in summary)}</ul>"
        f"<h2>Alerts ({len(alerts)})</h2>{alerts_html}"
        f"<h2>Dashboard</h2>{images}"
        f"<h2>Config</h2>{config_html}"
        f"<script>{_CHECK}</script></body></html>"
    )
