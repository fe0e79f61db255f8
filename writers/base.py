"""The ``Writer`` protocol and a base class with the shared lifecycle."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import os
import re
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from .lifecycle import DEFAULT_FLUSH_INTERVAL, due, lifecycle
from .ranks import process_rank

log = logging.getLogger("writers")

# A layout in the guide's `tensorboard_layout.json` shape:
# {"category": [{"title": str, "closed": bool, "children": [tag | {"title", "closed", "children": [tag]}]}]}
LayoutDict = Mapping[str, Any]


@dataclass(frozen=True)
class Location:
    """Where a writer puts its data and the command that opens it, for "where to look" lines."""

    backend: str
    where: str
    command: str | None = None

    def __str__(self) -> str:
        return f"{self.backend + ':':<13}{self.where}" + (
            f"\n{'':<13}open: {self.command}" if self.command else ""
        )


@runtime_checkable
class Writer(Protocol):
    """Puts tagged values somewhere. Steps are ints; tags are full names (``train/loss/total``).

    The whole contract a caller may use; :class:`BaseWriter` gives a no-op default for each, so a
    backend overrides only what it supports. One method is optional (a writer without it is skipped):
    ``log_embedding(tag, values, step, metadata=None)``, rows ``[N, D]`` for the backend's embedding
    view with one ``metadata`` label per row (see :meth:`BaseWriter.log_embedding`). A writer that
    also has ``encode_scalars(metrics, step, wall_time) -> bytes`` (pure, no I/O, any thread) and
    ``write_encoded(data)`` gets its scalars from a :class:`~writers.background.BackgroundWriter`
    encoded on the caller's thread (see :meth:`~writers.jsonl.JSONLWriter.encode_scalars`).
    """

    name: str

    def log_scalars(
        self, metrics: Mapping[str, float], step: int, wall_time: float | None = None
    ) -> None: ...

    def log_histogram(self, tag: str, values: Any, step: int) -> None: ...

    def log_image(self, tag: str, image: Any, step: int) -> None: ...

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_layout(self, layout: LayoutDict) -> None: ...

    def define_summaries(self, summaries: Mapping[str, str]) -> None:
        """Which summary (``min``, ``max``, ...) a tracker keeps per tag; trackers without one ignore it."""

    def locations(self) -> list[Location]:
        """Where this writer writes (empty for a writer that writes nowhere)."""

    def error_counts(self) -> dict[str, int]:
        """Failed calls so far per backend name (empty when none failed)."""

    def flush(self) -> None: ...

    def close(self, failed: bool | None = None) -> None:
        """Flush and release; ``failed`` marks the run failed where the backend has a run status
        (``None``: failed if the process is dying of an uncaught exception)."""

    def __enter__(self) -> Writer: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


Factory = Callable[[Mapping[str, Any], Mapping[str, Any]], Writer]
# Keys every backend section accepts besides its own options.
SECTION_KEYS = frozenset({"enabled", "process"})


@dataclass(frozen=True)
class Backend:
    """Everything the project knows about one backend, declared once in the backend's module.

    ``options`` are the keys of its config section with their defaults (``None``: derived from the
    common keys ``experiment_name``, ``log_dir`` and ``resume``; an ``options`` of ``None`` accepts
    any key); ``build(section, common)`` makes the writer; ``writes`` is its line in the docs table;
    ``requires`` is the module its extra installs, without which the writer cannot work; ``process``
    says whether its writer runs in a child process by default (a Python-heavy client that would
    compete with training for the GIL, or a run that must be closed even when training is killed).
    Every section also accepts ``enabled`` and ``process`` (overriding that default).
    """

    name: str
    build: Factory
    extra: str | None = None
    requires: str | None = None
    options: Mapping[str, Any] | None = None
    writes: str = ""
    writer: type | None = None
    process: bool = False

    def check_installed(self) -> None:
        """Raise the "install the extra" error now if :attr:`requires` is missing (without importing it)."""
        if self.requires is not None and importlib.util.find_spec(self.requires) is None:
            raise missing_extra(self.name, self.extra or self.name)

    def checked_section(self, section: Any) -> Mapping[str, Any]:
        """The config section, its keys checked against :attr:`options`, declared defaults filled in."""
        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise ValueError(f"config[{self.name!r}]: got {type(section).__name__}; expected a mapping")
        if self.options is not None:
            unknown = sorted(set(section) - set(self.options) - SECTION_KEYS)
            if unknown:
                raise ValueError(
                    f"config[{self.name!r}]: unknown keys {unknown}; "
                    f"expected some of {sorted({*self.options, *SECTION_KEYS})}"
                )
            return {**{k: v for k, v in self.options.items() if v is not None}, **section}
        return section


_LOGGING_METHODS = (
    "log_scalars",
    "log_histogram",
    "log_image",
    "log_embedding",
    "log_config",
    "log_layout",
    "define_summaries",
)


# Every writer opened in this process (BaseWriter.__init__), for the fork handler below.
_opened: weakref.WeakSet[BaseWriter] = weakref.WeakSet()


def _refuse_parents_writers() -> None:
    """In a forked child (a DataLoader worker), make the logging methods of every writer the parent
    opened raise: their files and runs belong to the parent. Done once at the fork, on the instances,
    so that a call in the parent pays no check."""
    global _opened
    parents, _opened = list(_opened), weakref.WeakSet()
    for writer in parents:
        for method in _LOGGING_METHODS:
            if getattr(type(writer), method, None) is not getattr(BaseWriter, method, None):
                setattr(writer, method, functools.partial(_refused, writer, method))


def _refused(writer: BaseWriter, method: str, *args: Any, **kwargs: Any) -> None:
    del args, kwargs
    raise RuntimeError(
        f"{writer.name}: {method} in process {os.getpid()}, a fork of {writer._pid} that opened this "
        "writer (a DataLoader worker?); its files and runs belong to the parent. Log from the parent "
        "process, or open a writer in the child"
    )


os.register_at_fork(after_in_child=_refuse_parents_writers)


class BaseWriter:
    """No-op defaults (a backend overrides what it supports), context manager, ends at exit.

    ``close(failed=None)`` decides the run status from an uncaught exception or a SIGTERM in the
    process; the context manager passes ``failed=True`` when its block raised. A writer that buffers
    sets ``timed_flush = True``, calls :meth:`_mark_dirty` when it holds unwritten records and
    overrides :meth:`_flush`: records are then written at most ``flush_interval`` seconds after they
    arrive, however quiet the loop is. In a forked child, logging raises and flush/close do nothing.

    Rank 0 writes: on any other rank of a distributed job, constructing a writer gives a
    :class:`NullWriter` (no file, no run, no thread), unless it is asked for with ``all_ranks=True``
    (every writer accepts it; the built-in ones then give each rank its own file or run).
    """

    name = "writer"
    timed_flush = False

    def __new__(cls, *args: Any, all_ranks: bool = False, **kwargs: Any) -> Any:
        del args, kwargs
        if not all_ranks and cls is not NullWriter and process_rank() != 0:
            return NullWriter(cls.name)
        return super().__new__(cls)

    def __init__(self) -> None:
        self._closed = False
        self._pid = lifecycle.pid
        self.flush_interval = DEFAULT_FLUSH_INTERVAL
        self._dirty_since: float | None = None
        lifecycle.track(self, timed_flush=self.timed_flush)
        _opened.add(self)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and "all_ranks" not in inspect.signature(init).parameters:
            cls.__init__ = _accepting_all_ranks(init)  # type: ignore[method-assign]

    @property
    def closed(self) -> bool:
        return self._closed

    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        del metrics, step, wall_time

    def log_histogram(self, tag: str, values: Any, step: int) -> None:
        del tag, values, step

    def log_image(self, tag: str, image: Any, step: int) -> None:
        del tag, image, step

    def log_embedding(self, tag: str, values: Any, step: int, metadata: Sequence[str] | None = None) -> None:
        """Rows ``values`` ``[N, D]`` for the backend's embedding view, one ``metadata`` label per row."""
        del tag, values, step, metadata

    def log_config(self, config: Mapping[str, Any]) -> None:
        del config

    def log_layout(self, layout: LayoutDict) -> None:
        del layout

    def define_summaries(self, summaries: Mapping[str, str]) -> None:
        del summaries

    def locations(self) -> list[Location]:
        return []

    def error_counts(self) -> dict[str, int]:
        return {}

    @property
    def dirty(self) -> bool:
        """Whether records logged so far are not all written yet."""
        return self._dirty_since is not None

    def _mark_dirty(self) -> None:
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()

    def flush_if_due(self, now: float) -> None:
        """Flush if the oldest unwritten record is about ``flush_interval`` seconds old (the timed
        flush calls this from its own thread)."""
        if due(self._dirty_since, self.flush_interval, now) and not self._closed:
            self.flush()

    def flush(self) -> None:
        """Write everything logged so far (a no-op in a forked child: the parent owns the data)."""
        if lifecycle.is_foreign(self._pid):
            return
        self._dirty_since = None
        self._flush()

    def _flush(self) -> None:
        pass

    def close(self, failed: bool | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        lifecycle.forget(self, timed_flush=True)
        if lifecycle.is_foreign(self._pid):
            return
        self._close(lifecycle.failed or lifecycle.killed if failed is None else failed)

    def _close(self, failed: bool) -> None:
        del failed
        self.flush()

    def __enter__(self) -> BaseWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exit_failed(exc))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _accepting_all_ranks(init: Callable[..., None]) -> Callable[..., None]:
    # `all_ranks` is read by __new__; a writer whose __init__ does not name it need not know of it
    @functools.wraps(init)
    def accepting(self: BaseWriter, *args: Any, all_ranks: bool = False, **kwargs: Any) -> None:
        del all_ranks
        init(self, *args, **kwargs)

    return accepting


class NullWriter(BaseWriter):
    """Writes nothing, opens nothing: what a writer is on a rank other than 0."""

    def __init__(self, name: str = "null") -> None:
        self.name = name
        self._closed = False
        self._pid = lifecycle.pid
        self.flush_interval = DEFAULT_FLUSH_INTERVAL
        self._dirty_since = None

    def close(self, failed: bool | None = None) -> None:
        self._closed = True


class ResumeGate:
    """On resume, skips scalar records at or below the last step the previous run already wrote.

    A job restarted from a checkpoint at step S replays steps S+1.. that the killed job may have
    logged already; the first copy is kept, so steps are neither duplicated nor reordered.
    """

    def __init__(self, name: str, last_step: int | None) -> None:
        self.name = name
        self.last_step = last_step
        self.skipped = 0

    def allows(self, step: int) -> bool:
        if self.last_step is None or step > self.last_step:
            return True
        self.skipped += 1
        if self.skipped == 1:
            log.warning(
                "%s: resuming after step %d, already written by the previous run; records up to that step "
                "are skipped",
                self.name,
                self.last_step,
            )
        return False


def write_embedding(
    writer: Any, tag: str, values: Any, step: int, metadata: Sequence[str] | None = None
) -> None:
    """``writer.log_embedding(...)``, or nothing for a protocol writer without that optional method."""
    method = getattr(writer, "log_embedding", None)
    if method is not None:
        method(tag, values, step, metadata=metadata)


def check_step(step: Any) -> int:
    """An int step; floats with an integral value are accepted, anything else is an error."""
    if type(step) is int:  # every logging call checks its step: the common case first
        return step
    if isinstance(step, bool):
        raise TypeError(f"step: got bool {step}; expected an int")
    if isinstance(step, int):
        return step
    try:
        as_float = float(step)
    except (TypeError, ValueError):
        raise TypeError(f"step: got {type(step).__name__}; expected an int") from None
    if not as_float.is_integer():
        raise ValueError(f"step: got {step!r}; expected an integral value")
    return int(as_float)


def missing_extra(backend: str, extra: str) -> ImportError:
    return ImportError(
        f'the {backend} writer needs the {extra!r} extra: pip install "hjepa-metrics[{extra}]"'
    )


# A key whose last word names a secret: api_key, hf_token, db_password, aws_secret_access_key, ...
# ("num_tokens" or "tokenizer" are not secrets).
_SECRET = re.compile(
    r"(^|[_\-.])(api[_-]?key|access[_-]?key|secret([_-]?key)?|token|password|passwd|pwd|credentials?|"
    r"private[_-]?key)$",
    re.IGNORECASE,
)
REDACTED = "***REDACTED***"


def redact(config: Any) -> Any:
    """A copy of ``config`` with the values of secret-looking keys (API keys, tokens, passwords,
    credentials) replaced, at any depth, so no backend, log line or record ever holds them.

    >>> redact({"wandb": {"api_key": "abc", "project": "p"}, "db_password": "x"})
    {'wandb': {'api_key': '***REDACTED***', 'project': 'p'}, 'db_password': '***REDACTED***'}
    """
    if isinstance(config, Mapping):
        return {k: REDACTED if _SECRET.search(str(k)) else redact(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [redact(v) for v in config]
    return config


def flatten(config: Mapping[str, Any], parent: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings to dotted keys.

    >>> flatten({"model": {"dim": 384, "levels": 3}, "lr": 1e-3})
    {'model.dim': 384, 'model.levels': 3, 'lr': 0.001}
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{parent}{sep}{key}" if parent else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name, sep))
        else:
            out[name] = value
    return out


def as_list(value: Any) -> list[str] | None:
    """A list of names from a list or a comma-separated string (``None`` stays ``None``).

    >>> as_list("tensorboard, jsonl")
    ['tensorboard', 'jsonl']
    """
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def exit_failed(exc: BaseException | None) -> bool:
    """Whether leaving a ``with`` block on ``exc`` means the run failed: any exception but
    ``sys.exit(0)`` / ``sys.exit()`` (a normal exit, as the process's own exit status says).

    >>> exit_failed(SystemExit(0)), exit_failed(SystemExit(2)), exit_failed(None)
    (False, True, False)
    """
    if exc is None:
        return False
    if isinstance(exc, SystemExit):
        return exc.code not in (0, None)
    return True
