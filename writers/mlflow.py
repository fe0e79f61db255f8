"""MLflow through an explicit ``MlflowClient``: batched metrics, sanitized keys, run status on exit."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from ._files import Outage
from ._media import embedding_files, histogram, image_png, tag_step_path
from ._mlflow_store import sql_store_metrics
from .base import (
    Backend,
    BaseWriter,
    LayoutDict,
    Location,
    ResumeGate,
    as_list,
    check_step,
    flatten,
    missing_extra,
    redact,
)
from .lifecycle import DEFAULT_TIMEOUT, lifecycle
from .ranks import rank_suffix

log = logging.getLogger("writers.mlflow")

RUN_ID_FILE = "mlflow_run_id"
LAST_STEP_TAG = "hjepa_metrics.last_step"
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
# Metrics kept while the server is down (about 100 MB at worst); older ones are dropped and counted.
MAX_PENDING_METRICS = 1_000_000
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE = 6000
_INVALID = re.compile(r"[^A-Za-z0-9_\-. :/]")


def sanitize_key(tag: str) -> str:
    """A key MLflow accepts: letters, digits, ``_ - . space : /``; no ``//``, ``..``, edge ``/``; ≤ 250.

    >>> sanitize_key("train/grad(norm)@L2//x/")
    'train/grad_norm__L2/x'
    """
    key = _INVALID.sub("_", tag)
    key = re.sub(r"/{2,}", "/", key).strip("/")
    while ".." in key:
        key = key.replace("..", "_.")
    if len(key) > MAX_KEY_LENGTH:
        key = key[: MAX_KEY_LENGTH - 9] + "_" + _digest(tag)
    return key or "_"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


class KeyMapper:
    """Deterministic tag → key with collision detection: a second tag mapping to a taken key gets a
    hash suffix (and one warning), so it never overwrites or rejects another series."""

    def __init__(self) -> None:
        self._by_tag: dict[str, str] = {}
        self._owner: dict[str, str] = {}

    def __call__(self, tag: str) -> str:
        key = self._by_tag.get(tag)
        if key is not None:
            return key
        key = sanitize_key(tag)
        owner = self._owner.get(key)
        if owner is not None and owner != tag:
            disambiguated = sanitize_key(key[: MAX_KEY_LENGTH - 9] + "_" + _digest(tag))
            log.warning(
                "mlflow: tags %r and %r both sanitize to %r; logging %r as %r",
                owner,
                tag,
                key,
                tag,
                disambiguated,
            )
            key = disambiguated
        self._owner.setdefault(key, tag)
        self._by_tag[tag] = key
        return key


class MLflowWriter(BaseWriter):
    """Logs to an MLflow run. Store: ``tracking_uri``, else ``MLFLOW_TRACKING_URI`` as MLflow itself
    reads it, else ``sqlite:///<logdir>/mlflow.db``; any tracking URI works (a server included), and a
    new experiment in a sqlite store keeps its artifacts in ``mlartifacts`` beside the database.

    Metrics are buffered and sent in batches (≤ 1000: ``log_batch``'s limit; straight into the tables
    of a sqlite store, see :mod:`writers._mlflow_store`) when the buffer is full, on
    ``flush()`` and at most ``flush_interval`` seconds after they were logged; a batch that fails (a
    locked database, a server down) stays buffered (up to ``max_pending`` metrics, then the oldest are
    dropped and counted) and is sent again with the next batch or flush; the outage and the recovery
    are reported once each. HTTP requests give up after ``request_timeout`` seconds without retries
    of their own (unless ``MLFLOW_HTTP_REQUEST_TIMEOUT``/``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` say
    otherwise), so a dead server costs a bounded wait and the buffer does the retrying. Keys are
    sanitized (see :func:`sanitize_key`) with collisions detected. Images and histograms (which MLflow
    cannot plot) become artifacts under ``images/`` and ``histograms/``; the layout is
    ``tensorboard_layout.json``. The run ends KILLED after a SIGTERM, FAILED if the process dies of an
    exception or the ``with`` block raises, FINISHED otherwise. The run id is kept in
    ``<logdir>/mlflow_run_id``: ``resume=True`` reopens that run and skips steps it already holds.
    Note: sqlite stores ±inf as ±1.797e308.
    """

    timed_flush = True

    name = "mlflow"

    def __init__(
        self,
        *,
        logdir: str | os.PathLike[str] = "runs/mlflow",
        tracking_uri: str | None = None,
        experiment_name: str = "hjepa",
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        buffer_size: int = MAX_METRICS_PER_BATCH,
        max_pending: int = MAX_PENDING_METRICS,
        request_timeout: float = DEFAULT_TIMEOUT,
        resume: bool = False,
        all_ranks: bool = False,
    ) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(request_timeout))))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise missing_extra("MLflow", "mlflow") from exc
        self._Metric, self._Param = Metric, Param
        root = Path(logdir).resolve()
        if suffix := rank_suffix(all_ranks):  # every rank writes: its own run, store and run-id file
            root = root / suffix
            run_name = f"{run_name or experiment_name}-{suffix}"
        root.mkdir(parents=True, exist_ok=True)
        tracking_uri = (
            tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
        )
        artifact_location = None
        if tracking_uri.startswith("sqlite:///"):  # artifacts beside the store, not in the working directory
            artifact_location = (Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        id_file = root / RUN_ID_FILE
        if run_id is None and resume and id_file.exists():
            run_id = id_file.read_text(encoding="utf-8").strip()
        last_step: int | None = None
        if run_id is not None:
            run = self.client.get_run(run_id)
            self.client.update_run(run_id, status="RUNNING")
            if resume and LAST_STEP_TAG in run.data.tags:
                last_step = int(run.data.tags[LAST_STEP_TAG])
        else:
            experiment = self.client.get_experiment_by_name(experiment_name)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment(experiment_name, artifact_location=artifact_location)
            )
            run = self.client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
        self.run_id: str = run.info.run_id
        id_file.write_text(self.run_id, encoding="utf-8")  # what resume=True reopens
        self.gate = ResumeGate(self.name, last_step)
        self.keys = KeyMapper()
        self.outage = Outage(self.name)
        self._lock = threading.RLock()  # the timed flush sends from its own thread
        self._buffer: list[Any] = []
        self._direct = sql_store_metrics(self.client, self.run_id)
        self._buffer_size = max(1, min(buffer_size, MAX_METRICS_PER_BATCH))
        self._max_pending = max(self._buffer_size, max_pending)
        super().__init__()

    def locations(self) -> list[Location]:
        return [Location("MLflow", self.tracking_uri, f"mlflow ui --backend-store-uri {self.tracking_uri}")]

    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        step = check_step(step)
        if not self.gate.allows(step):
            return
        millis = int(1000 * (time.time() if wall_time is None else wall_time))
        key = self.keys
        new = [self._Metric(key(str(tag)), float(value), millis, step) for tag, value in metrics.items()]
        with self._lock:
            self._buffer.extend(new)
            self._mark_dirty()
            over = len(self._buffer) - self._max_pending
            if over > 0:  # only during an outage: keep the newest, count the rest
                del self._buffer[:over]
                self.outage.drop(over)
            if len(self._buffer) >= self._buffer_size and not self.outage.active:
                self._send()

    def _send(self) -> None:
        """Send the buffer; a failure keeps it (reported once per outage) and raises."""
        with self._lock:
            try:
                while self._buffer:
                    batch = self._buffer[:MAX_METRICS_PER_BATCH]
                    self._store_batch(batch, str(max(m.step for m in batch)))
                    del self._buffer[: len(batch)]  # only once sent: a failed batch is retried, not lost
            except Exception as exc:
                self.outage.failed("log_batch", exc)
                self._mark_dirty()
                raise
            self.outage.recovered()

    def _store_batch(self, batch: list[Any], last_step: str) -> None:
        """``batch`` and the run's last-step tag: straight into a sqlite store (see
        :mod:`writers._mlflow_store`), or through MLflow's client for any other store and to resend
        what the direct path refused (a batch partly stored before: ``log_batch`` skips those rows)."""
        refused: Exception | None = None
        if self._direct is not None:
            try:
                self._direct.log(batch, {LAST_STEP_TAG: last_step})
                return
            except Exception as exc:  # MLflow's path below raises in turn when the store itself fails
                refused = exc
        self.client.log_batch(self.run_id, metrics=batch)
        self.client.set_tag(self.run_id, LAST_STEP_TAG, last_step)
        if refused is not None and not _is_database_error(refused):
            # MLflow's path works where the direct one does not: its private store API has moved
            log.warning("mlflow: writing through log_batch from now on (direct path: %r)", refused)
            self._direct = None

    def error_counts(self) -> dict[str, int]:
        return self.outage.counts()

    def _artifact(self, path: PurePosixPath, data: bytes) -> None:
        """``data`` as the artifact file ``path`` (its folder, then its name) of the run."""
        with tempfile.TemporaryDirectory(prefix="hjepa-mlflow-") as tmp:
            local = Path(tmp) / path.name
            local.write_bytes(data)
            folder = str(path.parent)
            self.client.log_artifact(self.run_id, str(local), artifact_path=None if folder == "." else folder)

    def log_histogram(self, tag: str, values: Any, step: int) -> None:
        h = histogram(values, name=tag)
        data = json.dumps({"tag": tag, "step": check_step(step), **h.as_dict()}).encode("utf-8")
        self._artifact(tag_step_path("histograms", tag, check_step(step), ".json"), data)

    def log_image(self, tag: str, image: Any, step: int) -> None:
        self._artifact(tag_step_path("images", tag, check_step(step), ".png"), image_png(image, tag))

    def log_embedding(self, tag: str, values: Any, step: int, metadata: Sequence[str] | None = None) -> None:
        """Artifacts ``embeddings/<tag>/step_<N>/tensors.tsv`` (and ``metadata.tsv``): the files
        TensorBoard's projector (or projector.tensorflow.org) loads."""
        files = embedding_files(values, metadata, tag)
        with tempfile.TemporaryDirectory(prefix="hjepa-mlflow-") as tmp:
            files.write_to(Path(tmp))
            folder = tag_step_path("embeddings", tag, check_step(step))
            self.client.log_artifacts(self.run_id, tmp, artifact_path=str(folder))

    def log_config(self, config: Mapping[str, Any]) -> None:
        config = redact(config)  # secrets never reach a backend
        params = [self._Param(self.keys(k), str(v)[:MAX_PARAM_VALUE]) for k, v in flatten(config).items()]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS_PER_BATCH])

    def log_layout(self, layout: LayoutDict) -> None:
        self._artifact(PurePosixPath("tensorboard_layout.json"), json.dumps(layout, indent=2).encode("utf-8"))

    def _flush(self) -> None:
        self._send()

    def _close(self, failed: bool) -> None:
        try:
            self._send()
        finally:
            try:
                status = ("KILLED" if lifecycle.killed else "FAILED") if failed else "FINISHED"
                self.client.set_terminated(self.run_id, status=status)
            finally:
                _release_store(self.tracking_uri)


def _is_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it: MLflow wraps them) is SQLAlchemy's: the database failing,
    not the code calling it."""
    try:
        from sqlalchemy.exc import SQLAlchemyError
    except ImportError:
        return False
    seen: BaseException | None = exc
    for _ in range(16):  # MLflow wraps once or twice; a chain is never this long
        if seen is None:
            break
        if isinstance(seen, SQLAlchemyError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _release_store(tracking_uri: str) -> None:
    """Free what MLflow caches per tracking URI for the life of the process (a SQLAlchemy engine
    with its connections per sqlite file, and the store object), so a sweep of runs in separate
    directories does not keep two file descriptors and ~9 MB per closed run. Private MLflow state:
    where it moved, nothing is released and nothing breaks."""
    if not tracking_uri.startswith("sqlite:"):
        return
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.tracking._tracking_service import utils
    except ImportError:
        return
    engines = getattr(SqlAlchemyStore, "_engine_map", None)
    if isinstance(engines, dict):
        engine = engines.pop(tracking_uri, None)
        if engine is not None:
            engine.dispose()
    cached = getattr(getattr(utils, "_tracking_store_registry", None), "_get_store_with_resolved_uri", None)
    clear = getattr(cached, "cache_clear", None)
    if callable(clear):
        clear()


def _build(section: Mapping[str, Any], common: Mapping[str, Any]) -> MLflowWriter:
    tags = section.get("tags")
    writer = MLflowWriter(
        logdir=section.get("log_dir") or common["log_dir"],
        tracking_uri=section.get("tracking_uri"),
        experiment_name=section.get("experiment_name") or common["experiment_name"],
        run_name=section.get("run_name"),
        run_id=section.get("run_id"),
        tags=dict(tags) if isinstance(tags, Mapping) else dict.fromkeys(as_list(tags) or [], ""),
        request_timeout=common["timeout"],
        resume=common["resume"],
        all_ranks=common.get("all_ranks", False),
    )
    writer.flush_interval = common["flush_interval"]
    return writer


BACKEND = Backend(
    name="mlflow",
    build=_build,
    extra="mlflow",
    requires="mlflow",
    options=dict.fromkeys(("tracking_uri", "experiment_name", "run_name", "run_id", "tags", "log_dir")),
    writes="batches of ≤ 1000 metrics across steps from a writer process of its own (into a sqlite store's "
    "tables, one transaction each; `log_batch` elsewhere); keys sanitized with "
    "collisions detected; images and histograms as artifacts; batches kept and resent while the server is "
    "down; run KILLED or FAILED when training is killed or dies of an exception",
    writer=MLflowWriter,
    process=True,
)
