"""Writers from configuration: a dict, a YAML/JSON file, or ``HJEPA_METRICS_*`` environment variables.

The shape mirrors the guide's ``logging:`` section::

    logging:
      experiment_name: hjepa_vit_s
      log_dir: runs/hjepa_vit_s
      backends: [tensorboard, jsonl]          # or set `enabled: true` per section
      tensorboard: {enabled: true}
      wandb: {enabled: false, project: hjepa, entity: my-team, tags: [vit-s], mode: offline}
      mlflow: {enabled: false, tracking_uri: http://mlflow:5000, run_name: first}
      jsonl: {enabled: true, path: runs/hjepa_vit_s/metrics.jsonl}

The backends and their section keys are declared once, in their modules (see :mod:`writers.backends`);
third-party ones register under the entry-point group ``hjepa_metrics.writers``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .backends import available_backends
from .background import BackgroundWriter
from .base import NullWriter, Writer, as_list, missing_extra
from .lifecycle import DEFAULT_FLUSH_INTERVAL, DEFAULT_TIMEOUT
from .multi import MultiWriter
from .process import ProcessWriter
from .ranks import process_rank

log = logging.getLogger("writers.config")

ENV_PREFIX = "HJEPA_METRICS_"
DEFAULT_BACKENDS = ("tensorboard", "jsonl")

TOP_KEYS = frozenset(
    {
        "experiment_name",
        "log_dir",
        "backends",
        "strict",
        "background",
        "max_queue",
        "when_full",
        "resume",
        "flush_interval",
        "timeout",
        "all_ranks",
    }
)


def load_config(source: Mapping[str, Any] | str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The ``logging`` mapping from a dict, a ``.yaml``/``.yml``/``.json`` file, or the environment."""
    if source is None:
        return config_from_env(os.environ)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:
                raise missing_extra("YAML config", "yaml") from exc
            data = yaml.safe_load(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"config: got file {str(path)!r}; expected a .yaml, .yml or .json file")
        if not isinstance(data, Mapping):
            raise ValueError(f"config: {path} holds {type(data).__name__}; expected a mapping")
        source = data
    if not isinstance(source, Mapping):
        raise TypeError(
            f"config: got {type(source).__name__}; expected a dict, a file path or None (environment)"
        )
    inner = source.get("logging", source)
    if not isinstance(inner, Mapping):
        raise ValueError(f"config['logging']: got {type(inner).__name__}; expected a mapping")
    return dict(inner)


def config_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """``HJEPA_METRICS_BACKENDS=tensorboard,jsonl``, ``HJEPA_METRICS_LOG_DIR=...``,
    ``HJEPA_METRICS_WANDB_PROJECT=...``, ``HJEPA_METRICS_CONFIG=path.yaml`` (a file, then overrides)."""
    found = {k[len(ENV_PREFIX) :].lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    config: dict[str, Any] = {}
    if "config" in found:
        config = load_config(found.pop("config"))
    sections = sorted(available_backends(), key=len, reverse=True)
    for key, value in found.items():
        if key in TOP_KEYS:
            config[key] = as_list(value) if key == "backends" else value
            continue
        section = next((s for s in sections if key.startswith(s + "_")), None)
        if section is None:
            valid = sorted(f"{ENV_PREFIX}{k.upper()}" for k in TOP_KEYS | {"config"})
            raise ValueError(
                f"environment: unknown variable {ENV_PREFIX}{key.upper()}; expected one of {valid} "
                f"or {ENV_PREFIX}<BACKEND>_<KEY> with BACKEND in {sorted(s.upper() for s in sections)}"
            )
        config.setdefault(section, {})[key[len(section) + 1 :]] = value
    return config


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def selected_backends(config: Mapping[str, Any]) -> list[str]:
    """Backends named in ``backends``, else those whose section says ``enabled``, else the defaults."""
    known = available_backends()
    unknown_keys = sorted(set(config) - TOP_KEYS - set(known))
    if unknown_keys:
        raise ValueError(
            f"config: unknown keys {unknown_keys}; "
            f"expected {sorted(TOP_KEYS)} or a backend section {sorted(known)}"
        )
    if config.get("backends") is not None:
        names = as_list(config["backends"]) or []
    else:
        names = [n for n in known if isinstance(config.get(n), Mapping) and _truthy(config[n].get("enabled"))]
        if not names and not any(n in config for n in known):
            names = list(DEFAULT_BACKENDS)
    bad = sorted(set(names) - set(known))
    if bad:
        raise ValueError(f"config: unknown backends {bad}; expected some of {sorted(known)}")
    return list(dict.fromkeys(names))


def _picklable(make: Callable[[], Writer], name: str) -> bool:
    try:
        pickle.dumps(make)
    except Exception as exc:  # a factory defined in a closure: it runs in this process instead
        log.info(
            "writer %r runs in this process: its factory cannot be sent to a writer process (%s)", name, exc
        )
        return False
    return True


def _seconds(cfg: Mapping[str, Any], key: str, default: float) -> float:
    value = cfg.get(key, default)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(f"config[{key!r}]: got {value!r}; expected seconds > 0")
    return seconds


def build_writers(
    config: Mapping[str, Any] | str | os.PathLike[str] | None = None, *, strict: bool | None = None
) -> Writer:
    """One writer, or a :class:`MultiWriter` over several, from a config dict, file or the environment.

    With no config and no ``HJEPA_METRICS_*`` variables: TensorBoard and JSONL under ``runs/hjepa``.
    MLflow and W&B run in a writer process of their own (:class:`ProcessWriter`; ``process: false`` in
    their section keeps them in this process); the others are built and run on a background thread
    each (:class:`BackgroundWriter`) unless ``background: false``; ``max_queue`` and ``when_full``
    (``block`` or ``drop``) set its queue.
    ``flush_interval`` (s, default 5) bounds how old an unwritten record gets, so a killed job loses at
    most that much; ``timeout`` (s, default 10) bounds how long a slow, hung or unreachable backend may
    hold up construction, a call, ``flush()`` or ``close()`` (a backend still starting after it goes
    on starting in the background; its records are queued meanwhile).
    In a distributed job only rank 0 opens anything (other ranks get a :class:`NullWriter`, after the
    config is checked); ``all_ranks: true`` makes every rank write, each to its own file or run.
    """
    cfg = load_config(config)
    names = selected_backends(cfg)
    if not names:
        log.warning("config: every backend is disabled; nothing will be written")
    experiment = str(cfg.get("experiment_name") or "hjepa")
    timeout = _seconds(cfg, "timeout", DEFAULT_TIMEOUT)
    all_ranks = _truthy(cfg.get("all_ranks", False))
    common = {
        "experiment_name": experiment,
        "log_dir": str(cfg.get("log_dir") or Path("runs") / experiment),
        "resume": _truthy(cfg.get("resume", False)),
        "flush_interval": _seconds(cfg, "flush_interval", DEFAULT_FLUSH_INTERVAL),
        "timeout": timeout,
        "all_ranks": all_ranks,
    }
    known = available_backends()
    strict_mode = _truthy(cfg.get("strict", False)) if strict is None else strict
    background = _truthy(cfg.get("background", True))
    max_queue = int(cfg.get("max_queue", 10_000))
    when_full = cfg.get("when_full", "block")
    sections = {name: known[name].checked_section(cfg.get(name)) for name in names}
    if process_rank() != 0 and not all_ranks:
        return NullWriter("multi")  # the config is checked on every rank; only rank 0 opens anything
    writers: list[Writer] = []
    failed: list[str] = []
    try:
        for name in names:
            backend, section = known[name], sections[name]
            backend.check_installed()  # a missing extra is the user's to fix, now, not later
            make: Callable[[], Writer] = functools.partial(backend.build, section, common)
            try:
                if _truthy(section.get("process", backend.process)) and _picklable(make, name):
                    # its own process: calls never block, and it starts in the background already
                    writers.append(
                        ProcessWriter(
                            make, name=name, timeout=timeout, strict=strict_mode, all_ranks=all_ranks
                        )
                    )
                elif background:
                    # built on its own thread: a server that is slow to answer delays training by at
                    # most `timeout`, then the writer goes on starting in the background
                    writers.append(
                        BackgroundWriter(
                            make,
                            name=name,
                            max_queue=max_queue,
                            when_full=when_full,
                            strict=strict_mode,
                            timeout=timeout,
                            all_ranks=all_ranks,
                        )
                    )
                else:
                    writers.append(make())
            except (ImportError, ValueError, TypeError):
                raise  # a missing extra or a bad option: the user must fix the config
            except Exception as exc:
                if strict_mode:
                    raise
                # a backend that cannot start (server down, service crash) must not stop training
                failed.append(name)
                log.warning(
                    "writer %r failed to start (%s: %s); training goes on with %s",
                    name,
                    type(exc).__name__,
                    exc,
                    [w.name for w in writers] or "no writer",
                    exc_info=exc,
                )
    except BaseException:
        for made in writers:
            made.close()
        raise
    if len(writers) == 1 and not strict_mode and not failed:
        return writers[0]
    multi = MultiWriter(writers, strict=strict_mode, all_ranks=all_ranks)
    multi.failed_to_start.extend(failed)
    return multi
