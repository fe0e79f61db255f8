"""Threshold alerts from the registry: once per crossing, rate-limited per tag, bounded history."""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import registry
from .registry import AlertRule, Bounds, inside

log = logging.getLogger("hjepa_metrics.alerts")

DEFAULT_REPEAT_INTERVAL = 100
FEATURE_DIM = "collapse/level{level}_feature_dim"
DEFAULT_MAX_KEPT = 1000
CONFIG_KEY = "hjepa_metrics"
# what AlertMonitor.settings() saves into a run's config, for a report to judge it the same way
SETTINGS = ("num_hierarchies", "warmup_steps", "repeat_interval")
_UNSEEN: Any = object()
_MAX_TAGS = 1 << 16
_Rule = tuple[AlertRule, int | None] | tuple[None, int] | None


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
    reset. ``repeat_interval=0`` reports every crossing. A report goes to ``logging`` (warning; rank 0
    only under ``torch.distributed``), to ``on_alert`` and to :attr:`fired`, which keeps the last
    ``max_kept``; :attr:`crossings` counts every crossing per tag. Nothing is checked before
    ``warmup_steps`` (an untrained model predicts poorly and clips often at first); a value still out
    of range then is reported at that step.
    """

    def __init__(
        self,
        *,
        num_hierarchies: int,
        on_alert: Callable[[Alert], None] | None = None,
        log_alerts: bool = True,
        repeat_interval: int = DEFAULT_REPEAT_INTERVAL,
        max_kept: int = DEFAULT_MAX_KEPT,
        warmup_steps: int = 0,
    ) -> None:
        if repeat_interval < 0:
            raise ValueError(f"repeat_interval: got {repeat_interval}; expected steps >= 0")
        if max_kept < 1:
            raise ValueError(f"max_kept: got {max_kept}; expected >= 1")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps: got {warmup_steps}; expected steps >= 0")
        self.warmup_steps = warmup_steps
        self.num_hierarchies = num_hierarchies
        self.log_alerts = log_alerts
        self.on_alert = on_alert
        self.repeat_interval = repeat_interval
        self.fired: deque[Alert] = deque(maxlen=max_kept)
        self.crossings: Counter[str] = Counter()
        self.active: set[str] = set()
        self._feature_dims: dict[int, int] = {}
        self._rules: dict[str, _Rule] = {}
        # per tag: (low, high, bounds) in force for the current feature widths
        self._limits: dict[str, tuple[float, float, Bounds]] = {}
        self.last: dict[str, tuple[int, float]] = {}  # tag with a rule -> (step, value) last checked
        self._reported: dict[str, tuple[int, int]] = {}  # tag -> (step of its last report, interval)
        self._recovered_at: dict[str, int] = {}
        self._unreported: Counter[str] = Counter()

    def settings(self) -> dict[str, int]:
        """What decides when this monitor reports, as the logger writes it into the run's config (key
        ``hjepa_metrics.alerts``), so that ``hjepa-metrics report`` judges the run as it was judged live."""
        return {key: getattr(self, key) for key in SETTINGS}

    def set_feature_dim(self, level: int, dim: int) -> None:
        """The feature width D of ``level``, for rules that scale with it (effective rank)."""
        if self._feature_dims.get(level) != int(dim):
            self._feature_dims[level] = int(dim)
            self._limits.clear()

    def check(
        self, metrics: Mapping[str, float], step: int, *, announce: Callable[[], bool] | None = None
    ) -> list[Alert]:
        """New reports among ``metrics`` (full tags, prefixes allowed). Where ``announce()`` is false
        (asked only when there is something to log) they stay out of ``logging`` (every rank of a
        distributed run but rank 0, which prints them once), still in :attr:`fired` and passed to
        ``on_alert``."""
        ruled = []
        rules = self._rules
        for tag, value in metrics.items():
            rule = rules.get(tag, _UNSEEN)
            if rule is _UNSEEN:
                rule = self._rule(tag)
            if rule is None:
                continue
            if rule[0] is None:
                self.set_feature_dim(rule[1], int(value))  # before the rules that scale with it
            else:
                ruled.append((tag, float(value), rule))
        if step < self.warmup_steps:  # an untrained model is far from every threshold: not news
            return []
        new = []
        last, limits, active = self.last, self._limits, self.active
        for tag, value, (rule, level) in ruled:
            last[tag] = (step, value)
            low_high_bounds = limits.get(tag)
            if low_high_bounds is None:
                low_high_bounds = limits[tag] = self._limits_of(rule, level)
            low, high, bounds = low_high_bounds
            if value < low or value > high:  # registry.outside, with a missing bound as ±inf; NaN never is
                if tag not in active:
                    active.add(tag)
                    dim = self._feature_dims.get(level) if level is not None else None
                    alert = self._crossed(tag, step, value, rule.describe(level=level, dim=dim))
                    if alert is not None:
                        new.append(alert)
            elif tag in active and inside(value, bounds):
                if self.log_alerts and (announce is None or announce()):
                    log.info("%s back in range at step %d (%.6g)", tag, step, value)
                active.discard(tag)
                self._recovered_at[tag] = step
        printed = self.log_alerts and bool(new) and (announce is None or announce())
        for alert in new:
            if printed:
                log.warning("alert: %s", alert)
            self.fired.append(alert)
            if self.on_alert is not None:
                self.on_alert(alert)
        return new

    def _limits_of(self, rule: AlertRule, level: int | None) -> tuple[float, float, Bounds]:
        """``rule``'s bounds for ``level`` at the current feature widths, and the same as two floats
        (a missing bound as ±inf) for the comparison made at every check."""
        dim = self._feature_dims.get(level) if level is not None else None
        bounds = rule.bounds(level=level, num_hierarchies=self.num_hierarchies, dim=dim)
        low, high = bounds if bounds is not None else (None, None)
        return (-math.inf if low is None else low, math.inf if high is None else high, bounds)

    def _rule(self, tag: str) -> _Rule:
        """What checking ``tag`` takes, parsed once per tag: ``(rule, level)``, ``(None, level)`` for a
        feature width, or ``None`` for a tag without a rule."""
        match = registry.lookup(tag)
        rule: _Rule = None
        if match is not None and match.spec.alert is not None:
            rule = (match.spec.alert, match.level)
        elif match is not None and match.spec.template == FEATURE_DIM and match.level is not None:
            rule = (None, match.level)
        if len(self._rules) >= _MAX_TAGS:  # tags made up per step (a step number in the name)
            self._rules.clear()
        self._rules[tag] = rule
        return rule

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


def saved_settings(config: Mapping[str, object]) -> dict[str, int]:
    """The :meth:`AlertMonitor.settings` a logger wrote into a run's ``config`` (empty if none)."""
    section = config.get(CONFIG_KEY)
    saved = section.get("alerts") if isinstance(section, Mapping) else None
    if not isinstance(saved, Mapping):
        return {}
    return {
        k: v for k, v in saved.items() if k in SETTINGS and isinstance(v, int) and not isinstance(v, bool)
    }


@dataclass(frozen=True)
class HealthVerdict:
    """How a run looks by the guide's thresholds: ``status`` is ``"healthy"`` (nothing out of range at the
    end; alerts during the run, if any, all recovered), ``"warning"`` (a rule still crossed at the end) or
    ``"collapse"`` (a collapse rule still crossed at the end); ``lines`` explain it."""

    status: str
    lines: tuple[str, ...]

    def __str__(self) -> str:
        return "\n".join(self.lines)


def health_verdict(monitor: AlertMonitor) -> HealthVerdict:
    """The verdict on everything ``monitor`` has checked so far (see :class:`HealthVerdict`)."""

    def value(tag: str) -> str:
        step, v = monitor.last[tag]
        return f"{tag} = {v:.4g} at step {step}"

    still = sorted(monitor.active)
    collapsed = [t for t in still if (m := registry.lookup(t)) is not None and m.spec.group == "collapse"]
    reported = sorted({a.tag for a in monitor.fired})
    recovered = [t for t in reported if t not in monitor.active]
    if collapsed:
        status, head = (
            "collapse",
            f"Health: COLLAPSE: {len(collapsed)} collapse rule(s) still crossed at the end",
        )
    elif still:
        status, head = "warning", f"Health: WARNING: {len(still)} rule(s) still crossed at the end"
    else:
        status = "healthy"
        head = "Health: HEALTHY: no guide threshold is crossed at the end" + (
            f"; {len(recovered)} tag(s) crossed one during the run and came back"
            if recovered
            else "; no alert fired"
        )
    lines = [head]
    lines += [f"  still crossed: {value(t)}" for t in still]
    first: dict[str, int] = {}
    for alert in monitor.fired:
        first.setdefault(alert.tag, alert.step)
    lines += [f"  crossed at step {first[t]}, back in range: {value(t)}" for t in recovered]
    return HealthVerdict(status, tuple(lines))
