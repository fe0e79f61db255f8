"""Weights & Biases: one history row per step on a ``global_step`` axis, so no step is ever dropped."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._media import embedding_rows, histogram, image_hwc, is_figure
from .base import (
    Backend,
    BaseWriter,
    LayoutDict,
    Location,
    ResumeGate,
    as_list,
    check_step,
    missing_extra,
    redact,
)
from .lifecycle import lifecycle
from .ranks import rank_suffix

log = logging.getLogger("writers.wandb")

STEP_KEY = "global_step"
RUN_ID_FILE = "wandb_run_id"
LAST_STEP_FILE = "wandb_last_step"
LAYOUT_FILE = "custom_scalars_layout.json"


class WandbWriter(BaseWriter):
    """Logs to a W&B run created with ``wandb.init`` (``mode="offline"`` needs no network).

    W&B silently drops a row whose ``step`` is lower than the last one. This writer never passes
    ``step``: every metric is plotted against its own ``global_step`` key (``define_metric``), and the
    values of consecutive calls with the same step are merged into one row. A step lower than the
    previous one is kept (plotted at its step) and reported once with a warning.
    ``summaries`` maps metric names or globs to a W&B summary (``"min"``, ``"max"``, ``"mean"``,
    ``"last"``). W&B has no custom-scalars layout: it is saved as ``custom_scalars_layout.json`` in
    the run's files, and W&B groups panels by the tag's first path component by itself.
    The run id and last step are kept in ``dir``: ``resume_run=True`` continues that run
    (``wandb.init(id=..., resume="allow")``) and skips the steps it already holds.
    """

    name = "wandb"
    timed_flush = True

    def __init__(
        self,
        *,
        project: str | None = None,
        entity: str | None = None,
        name: str | None = None,
        tags: Sequence[str] | None = None,
        config: Mapping[str, Any] | None = None,
        mode: str | None = None,
        dir: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        resume: str | bool | None = None,
        summaries: Mapping[str, str] | None = None,
        resume_run: bool = False,
        all_ranks: bool = False,
        **init_kwargs: Any,
    ) -> None:
        try:
            import wandb as wandb_module
        except ImportError as exc:
            raise missing_extra("W&B", "wandb") from exc
        wandb: Any = wandb_module  # wandb's Literal-typed arguments are checked by wandb at run time
        self._wandb = wandb
        self.state_dir = Path(dir if dir is not None else ".")
        if suffix := rank_suffix(all_ranks):  # every rank writes: its own run, grouped by project
            self.state_dir = self.state_dir / suffix
            name = f"{name or project or 'run'}-{suffix}"
            init_kwargs.setdefault("group", project)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        id_file = self.state_dir / RUN_ID_FILE
        last_step: int | None = None
        if resume_run:
            if run_id is None and id_file.exists():
                run_id = id_file.read_text(encoding="utf-8").strip()
            resume = resume or "allow"
            step_file = self.state_dir / LAST_STEP_FILE
            if step_file.exists():
                last_step = int(step_file.read_text(encoding="utf-8").strip())
        self.run: Any = wandb.init(
            project=project,
            entity=entity,
            name=name,
            tags=list(tags) if tags else None,
            config=redact(dict(config)) if config else None,
            mode=mode,
            dir=None if dir is None else str(self.state_dir),
            id=run_id,
            resume=resume,
            **init_kwargs,
        )
        id_file.write_text(str(self.run.id), encoding="utf-8")  # what resume_run=True reopens
        self.gate = ResumeGate(self.name, last_step)
        self._state_written = 0.0
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)
        self.define_summaries(summaries or {})
        self._lock = threading.RLock()  # the timed flush commits the open row from its own thread
        self._row: dict[str, Any] = {}
        self._row_step: int | None = None
        self._last_step: int | None = None
        self._warned_regression = False
        super().__init__()

    def locations(self) -> list[Location]:
        run_dir = Path(self.run.dir).parent
        offline = getattr(self.run.settings, "mode", None) == "offline"
        if offline:  # LEET reads the run's files with no account and no network; sync uploads them
            return [
                Location("W&B", f"{run_dir} (offline; upload: wandb sync {run_dir})", f"wandb leet {run_dir}")
            ]
        return [Location("W&B", str(getattr(self.run, "url", None) or run_dir))]

    @property
    def run_id(self) -> str:
        return str(self.run.id)

    def _add(self, step: int, values: Mapping[str, Any]) -> None:
        step = check_step(step)
        with self._lock:
            self._add_locked(step, values)
            self._mark_dirty()

    def _add_locked(self, step: int, values: Mapping[str, Any]) -> None:
        if self._row_step is not None and step != self._row_step:
            self._commit()
        if self._last_step is not None and step < self._last_step and not self._warned_regression:
            self._warned_regression = True
            log.warning(
                "wandb: step %d is lower than the previous step %d; kept and plotted against %r "
                "(W&B's own step would have dropped it)",
                step,
                self._last_step,
                STEP_KEY,
            )
        self._row_step = step
        self._row.update(values)

    def _commit(self) -> None:
        with self._lock:
            if self._row_step is None:
                return
            self._row[STEP_KEY] = self._row_step
            self.run.log(self._row)
            last = self._last_step
            self._last_step = self._row_step if last is None else max(last, self._row_step)
            self._row = {}
            self._row_step = None
            if time.monotonic() - self._state_written > 1.0:
                self._save_last_step()

    def _save_last_step(self) -> None:
        """Persist the last step for ``resume_run`` (at most once a second, and at flush/close)."""
        if self._last_step is not None:
            tmp = self.state_dir / (LAST_STEP_FILE + ".tmp")
            tmp.write_text(str(self._last_step), encoding="utf-8")
            os.replace(tmp, self.state_dir / LAST_STEP_FILE)
            self._state_written = time.monotonic()

    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        del wall_time  # W&B stamps rows itself
        if self.gate.allows(check_step(step)):
            self._add(step, {str(k): float(v) for k, v in metrics.items()})

    def log_histogram(self, tag: str, values: Any, step: int) -> None:
        h = histogram(values, name=tag)
        if h.num == 0:
            return
        self._add(step, {tag: self._wandb.Histogram(np_histogram=(h.counts, h.edges))})

    def log_image(self, tag: str, image: Any, step: int) -> None:
        if isinstance(image, (bytes, bytearray)):  # PNG bytes, e.g. a figure rendered off-thread
            from PIL import Image

            data: Any = Image.open(io.BytesIO(bytes(image)))
        else:
            data = image if is_figure(image) else image_hwc(image, tag)
        self._add(step, {tag: self._wandb.Image(data)})

    def log_embedding(self, tag: str, values: Any, step: int, metadata: Sequence[str] | None = None) -> None:
        """A ``wandb.Table`` with a column per dimension (``d0``, ``d1``, ...) after a ``label`` column
        when there is metadata: the layout W&B's 2D Projection panel reads."""
        rows = embedding_rows(values, metadata, tag)
        columns = [f"d{i}" for i in range(rows.shape[1])]
        data = rows.tolist()
        if metadata is not None:
            columns = ["label", *columns]
            data = [[str(label), *row] for label, row in zip(metadata, data, strict=True)]
        self._add(step, {tag: self._wandb.Table(columns=columns, data=data)})

    def define_summaries(self, summaries: Mapping[str, str]) -> None:
        """``define_metric(name, summary=...)`` per tag or glob, on the ``global_step`` axis."""
        for pattern, summary in summaries.items():
            self.run.define_metric(pattern, step_metric=STEP_KEY, summary=summary)

    def log_config(self, config: Mapping[str, Any]) -> None:
        config = redact(config)  # secrets never reach a backend
        self.run.config.update(dict(config), allow_val_change=True)

    def log_layout(self, layout: LayoutDict) -> None:
        path = Path(self.run.dir) / LAYOUT_FILE
        path.write_text(json.dumps(layout, indent=2), encoding="utf-8")

    def _flush(self) -> None:
        self._commit()
        self._save_last_step()

    def _close(self, failed: bool) -> None:
        self._flush()
        # 143 = 128 + SIGTERM, the status a shell reports for a killed job
        self.run.finish(exit_code=(143 if lifecycle.killed else 1) if failed else 0)
        if self._wandb.run is None:
            # wandb-core lingers until teardown; stop it when no other run of this process needs it
            self._wandb.teardown()


def _build(section: Mapping[str, Any], common: Mapping[str, Any]) -> WandbWriter:
    writer = WandbWriter(
        project=section.get("project") or common["experiment_name"],
        entity=section.get("entity"),
        name=section.get("name"),
        tags=as_list(section.get("tags")),
        mode=section.get("mode"),
        dir=section.get("dir") or common["log_dir"],
        run_id=section.get("run_id"),
        resume=section.get("resume"),
        resume_run=common["resume"],
        all_ranks=common.get("all_ranks", False),
    )
    writer.flush_interval = common["flush_interval"]
    return writer


BACKEND = Backend(
    name="wandb",
    build=_build,
    extra="wandb",
    requires="wandb",
    options=dict.fromkeys(("project", "entity", "tags", "mode", "name", "dir", "run_id", "resume")),
    writes="one row per step against a `global_step` axis, so a lower step is kept (and warned about) "
    "instead of dropped, from a writer process of its own; run summaries from the registry (min of losses "
    "and of low-is-bad collapse tags); media as `wandb.Histogram`/`wandb.Image`; the layout as "
    "`custom_scalars_layout.json` in the run files; exit code 143 when training is killed, 1 on failure",
    writer=WandbWriter,
    process=True,
)
