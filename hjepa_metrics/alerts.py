"""Threshold alerts from the registry: once per crossing, rate-limited per tag, bounded history."""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import registry

log = logging.getLogger("hjepa_metrics.alerts")

DEFAULT_REPEAT_INTERVAL = 100
DEFAULT_MAX_KEPT = 1000


@dataclass(frozen=True)
class Alert:
    """One reported crossing of a guide threshold: ``tag`` left its healthy range at ``step``.

    ``repeats`` counts the crossings of the same tag since its previous report that were not
    reported on their own (the per-tag rate limit)."""

    tag: str
    step: int
    value: float
    rule: str
    repeats: int = 0

    def __str__(self) -> str:
        again = f" (crossed {self.repeats} more time(s) since the last report)" if self.repeats else ""
        return f"{self.tag} = {self.value:.6g} at step {self.step}: {self.rule}{again}"


class AlertMonitor:
    """Checks logged values against the registry's rules.

    A tag that crosses its threshold fires once and re-arms only after it has come back into range by
    5 % of the threshold (hysteresis). Rate limit per tag: a crossing that comes back within the tag's
    interval of its last report, after less than ``repeat_interval`` steps back in range, is counted
    but not reported, and each report of such an oscillating tag doubles its interval (a value
    oscillating around a threshold for a million steps gives about 14 reports, not thousands). A tag
    that stayed in range for ``repeat_interval`` steps is a new event: reported at once, interval
    reset. ``repeat_interval=0`` reports every crossing. A report goes to ``logging`` (warning), to
    ``on_alert`` and to :attr:`fired`, which keeps the last ``max_kept``; :attr:`crossings` counts
    every crossing per tag.
    """

    def __init__(
        self,
        *,
        num_hierarchies: int,
        on_alert: Callable[[Alert], None] | None = None,
        log_alerts: bool = True,
        repeat_interval: int = DEFAULT_REPEAT_INTERVAL,
        max_kept: int = DEFAULT_MAX_KEPT,
    ) -> None:
        if repeat_interval < 0:
            raise ValueError(f"repeat_interval: got {repeat_interval}; expected steps >= 0")
        if max_kept < 1:
            raise ValueError(f"max_kept: got {max_kept}; expected >= 1")
        self.num_hierarchies = num_hierarchies
        self.log_alerts = log_alerts
        self.on_alert = on_alert
        self.repeat_interval = repeat_interval
        self.fired: deque[Alert] = deque(maxlen=max_kept)
        self.crossings: Counter[str] = Counter()
        self.active: set[str] = set()
        self._feature_dims: dict[int, int] = {}
        self._reported: dict[str, tuple[int, int]] = {}  # tag -> (step of its last report, interval)
        self._recovered_at: dict[str, int] = {}
        self._unreported: Counter[str] = Counter()

    def set_feature_dim(self, level: int, dim: int) -> None:
        """The feature width D of ``level``, for rules that scale with it (effective rank)."""
        self._feature_dims[level] = int(dim)

    def check(self, metrics: Mapping[str, float], step: int) -> list[Alert]:
        """New reports among ``metrics`` (full tags, prefixes allowed)."""
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
                    alert = self._crossed(tag, step, float(value), rule.describe(level=level, dim=dim))
                    if alert is not None:
                        new.append(alert)
            elif tag in self.active and rule.recovered(value, level=level, num_hierarchies=n, dim=dim):
                if self.log_alerts:
                    log.info("%s back in range at step %d (%.6g)", tag, step, value)
                self.active.discard(tag)
                self._recovered_at[tag] = step
        for alert in new:
            if self.log_alerts:
                log.warning("alert: %s", alert)
            self.fired.append(alert)
            if self.on_alert is not None:
                self.on_alert(alert)
        return new

    def _crossed(self, tag: str, step: int, value: float, rule: str) -> Alert | None:
        """The report for a new crossing, or ``None`` while the tag's rate limit holds it back."""
        self.crossings[tag] += 1
        base = self.repeat_interval
        last = self._reported.get(tag)
        quiet = step - self._recovered_at.get(tag, step)
        if last is None or quiet >= base or step < last[0]:  # first, a new event, or a new run
            self._reported[tag] = (step, base)
        else:
            reported_at, interval = last
            if step < reported_at + interval:
                self._unreported[tag] += 1
                return None
            self._reported[tag] = (step, min(2 * interval, 1 << 40))
        return Alert(tag, step, value, rule, self._unreported.pop(tag, 0))
