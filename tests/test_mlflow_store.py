"""The MLflow writer's direct path into a SQL store (``writers._mlflow_store``), against what
MLflow's own ``log_batch`` and ``set_tag`` store, read back through ``MlflowClient``."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mlflow")

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from writers._mlflow_store import SqlStoreMetrics, sql_store_metrics
from writers.mlflow import LAST_STEP_TAG, MLflowWriter

T0 = 1_700_000_000.0


def _calls() -> list[tuple[dict[str, float], int, float]]:
    """(scalars, step, wall time): NaN, ±inf, steps out of order, one key twice at a step, an exact
    repeat, ties broken by the timestamp then the value, and more than one batch of 1,000."""
    calls: list[tuple[dict[str, float], int, float]] = [
        ({"a": 1.0, "b": math.nan, "c": math.inf, "d": -math.inf}, 0, T0),
        ({"a": 2.0, "b": 3.0}, 5, T0 + 1),
        ({"a": 9.0, "b": math.nan}, 3, T0 + 2),  # a lower step later: not the latest
        ({"a": 4.0}, 5, T0 + 1),  # same step and time, larger value: the latest
        ({"a": 4.0}, 5, T0 + 1),  # an exact repeat: stored once
        ({"c": 1.0}, 5, T0 + 0.5),
        ({"c": 0.5}, 5, T0 + 0.75),  # same step, later time: the latest
    ]
    calls += [({f"many/{i % 1300}": float(i)}, 10 + i // 1300, T0 + 3 + i / 1e3) for i in range(2600)]
    return calls


def _stored(client: MlflowClient, run_id: str) -> tuple[dict[str, Any], dict[str, float], str | None]:
    run = client.get_run(run_id)
    history = {
        key: sorted(
            (m.step, m.timestamp, "nan" if math.isnan(m.value) else m.value)
            for m in client.get_metric_history(run_id, key)
        )
        for key in run.data.metrics
    }
    latest = {k: ("nan" if math.isnan(v) else v) for k, v in run.data.metrics.items()}
    return history, latest, run.data.tags.get(LAST_STEP_TAG)


def test_the_direct_path_stores_what_log_batch_stores(tmp_path: Path) -> None:
    calls = _calls()
    writer = MLflowWriter(logdir=tmp_path, experiment_name="exp", run_name="direct")
    assert isinstance(writer._direct, SqlStoreMetrics)
    refused: list[Any] = []
    writer.client.log_batch = lambda *a, **k: refused.append(a)  # type: ignore[method-assign]
    for scalars, step, wall in calls:
        writer.log_scalars(scalars, step, wall_time=wall)
    writer.close()
    assert refused == []  # every batch went the direct way
    client = MlflowClient(tracking_uri=writer.tracking_uri)
    experiment = client.get_experiment_by_name("exp")
    assert experiment is not None
    reference = client.create_run(experiment.experiment_id, run_name="log_batch").info.run_id
    metrics = [
        Metric(key, value, int(1000 * wall), step)
        for scalars, step, wall in calls
        for key, value in scalars.items()
    ]
    for i in range(0, len(metrics), 1000):
        client.log_batch(reference, metrics=metrics[i : i + 1000])
    client.set_tag(reference, LAST_STEP_TAG, str(max(m.step for m in metrics[-1000:])))

    ours, theirs = _stored(client, writer.run_id), _stored(client, reference)
    assert ours == theirs
    history, latest, last_step = ours
    assert history["a"] == [(0, 1_700_000_000_000, 1.0), (3, 1_700_000_002_000, 9.0),
                            (5, 1_700_000_001_000, 2.0), (5, 1_700_000_001_000, 4.0)]  # fmt: skip
    assert latest["a"] == 4.0 and latest["b"] == 3.0 and latest["c"] == 0.5
    assert latest["d"] == -1.7976931348623157e308  # -inf, as MLflow stores it
    assert len(history) == 4 + 1300 and last_step == "11"


def test_a_batch_stored_before_is_resent_through_log_batch_without_repeats(tmp_path: Path) -> None:
    writer = MLflowWriter(logdir=tmp_path)
    batch = [Metric("x", float(s), 1_000 + s, s) for s in range(5)]
    writer._store_batch(batch, "4")
    writer._store_batch([*batch, Metric("x", 5.0, 1_005, 5)], "5")  # the first five are in the table
    assert isinstance(writer._direct, SqlStoreMetrics)  # a database refusal keeps the direct path
    writer.close()
    history, latest, last_step = _stored(MlflowClient(tracking_uri=writer.tracking_uri), writer.run_id)
    assert history == {"x": [(s, 1_000 + s, float(s)) for s in range(6)]}
    assert latest == {"x": 5.0} and last_step == "5"


def test_a_direct_path_that_fails_in_code_gives_way_to_log_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def moved(self: SqlStoreMetrics, metrics: Any, tags: Any) -> None:
        raise AttributeError("'SqlAlchemyStore' object has no attribute '_get_run'")

    monkeypatch.setattr(SqlStoreMetrics, "log", moved)
    writer = MLflowWriter(logdir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="writers.mlflow"):
        for step in range(3):
            writer.log_scalars({"x": float(step)}, step)
            writer.flush()
    writer.close()
    assert writer._direct is None
    assert sum("through log_batch from now on" in r.getMessage() for r in caplog.records) == 1
    history, _, last_step = _stored(MlflowClient(tracking_uri=writer.tracking_uri), writer.run_id)
    assert [v for _, _, v in history["x"]] == [0.0, 1.0, 2.0] and last_step == "2"
    assert writer.error_counts() == {}


def test_a_deleted_run_keeps_its_batch_until_restored(tmp_path: Path) -> None:
    writer = MLflowWriter(logdir=tmp_path)
    client = MlflowClient(tracking_uri=writer.tracking_uri)
    client.delete_run(writer.run_id)
    writer.log_scalars({"x": 1.0}, 7)
    with pytest.raises(Exception, match="active"):
        writer.flush()  # MLflow refuses a deleted run's metrics by either path: kept for the retry
    assert isinstance(writer._direct, SqlStoreMetrics) and sum(writer.error_counts().values()) == 1
    client.restore_run(writer.run_id)
    writer.close()
    assert [(m.step, m.value) for m in client.get_metric_history(writer.run_id, "x")] == [(7, 1.0)]


def test_only_a_sql_store_gets_the_direct_path() -> None:
    assert sql_store_metrics(MlflowClient(tracking_uri="http://127.0.0.1:9"), "0" * 32) is None
