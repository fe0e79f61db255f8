"""Threshold alerts from the registry, reported once per crossing."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import registry

log = logging.getLogger("hjepa_metrics.alerts")


@dataclass(frozen=True)
class Alert:
    """One crossing of a guide threshold: ``tag`` left its healthy range at ``step``."""

    tag: str
    step: int
    value: float
    rule: str

    def __str__(self) -> str:
        return f"{self.tag} = {self.value:.6g} at step {self.step}: {self.rule}"


class AlertMonitor:
    """Checks logged values against the registry's rules.

    A tag that crosses its threshold is reported once (a ``logging`` warning, ``on_alert`` callback,
    appended to :attr:`fired`) and again only after it has come back into range, by 5 % of the
    threshold (hysteresis), and crossed anew.
    """

    def __init__(
        self,
        *,
        num_hierarchies: int,
        on_alert: Callable[[Alert], None] | None = None,
        log_alerts: bool = True,
    ) -> None:
        self.num_hierarchies = num_hierarchies
        self.log_alerts = log_alerts
        self.on_alert = on_alert
        self.fired: list[Alert] = []
        self.active: set[str] = set()
        self._feature_dims: dict[int, int] = {}

    def set_feature_dim(self, level: int, dim: int) -> None:
        """The feature width D of ``level``, for rules that scale with it (effective rank)."""
        self._feature_dims[level] = int(dim)

    def check(self, metrics: Mapping[str, float], step: int) -> list[Alert]:
        """New alerts among ``metrics`` (full tags, prefixes allowed)."""
        new = []
        for tag, value in metrics.items():
            match = registry.lookup(tag)
            if match is None or match.spec.alert is None:
                continue
            rule = match.spec.alert
            level, n = match.level, self.num_hierarchies
            dim = self._feature_dims.get(level) if level is not None else None
            if rule.fires(value, level=level, num_hierarchies=n, dim=dim):
                if tag not in self.active:
                    self.active.add(tag)
                    new.append(Alert(tag, step, float(value), rule.describe()))
            elif tag in self.active and rule.recovered(value, level=level, num_hierarchies=n, dim=dim):
                if self.log_alerts:
                    log.info("%s back in range at step %d (%.6g)", tag, step, value)
                self.active.discard(tag)
        for alert in new:
            if self.log_alerts:
                log.warning("alert: %s", alert)
            self.fired.append(alert)
            if self.on_alert is not None:
                self.on_alert(alert)
        return new
