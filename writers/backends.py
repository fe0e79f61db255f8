"""The backends this package ships, one registration line each, and those of other packages.

A backend is a module that declares ``BACKEND = Backend(...)`` (its writer class, config keys and
defaults, extra, docs line); registering it here makes it reachable from config, ``replay --to``,
the CLI and the generated docs. Third-party packages register a :class:`~writers.base.Backend` or a
factory ``(section, common) -> Writer`` under the entry-point group ``hjepa_metrics.writers``.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from . import jsonl, mlflow, tensorboard, wandb
from .base import Backend, Writer

ENTRY_POINT_GROUP = "hjepa_metrics.writers"

BUILTIN: dict[str, Backend] = {
    b.name: b for b in (tensorboard.BACKEND, wandb.BACKEND, mlflow.BACKEND, jsonl.BACKEND)
}


def available_backends() -> dict[str, Backend]:
    """Built-in backends plus those registered under the ``hjepa_metrics.writers`` entry points."""
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, _entry_point_backend(ep))
    return found


def _entry_point_backend(ep: Any) -> Backend:
    def build(section: Any, common: Any) -> Writer:
        loaded = ep.load()
        made: Writer = (
            loaded.build(section, common) if isinstance(loaded, Backend) else loaded(section, common)
        )
        return made

    return Backend(name=ep.name, build=build)


def backends_markdown() -> str:
    """The backends table of the docs, generated from the declarations."""
    rows = ["| backend | extra | what it writes |", "|---|---|---|"]
    for b in BUILTIN.values():
        extra = f"`[{b.extra}]`" if b.extra else "none"
        rows.append(f"| `{b.name}` | {extra} | {b.writes} |")
    return "\n".join(rows) + "\n"
