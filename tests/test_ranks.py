"""Only rank 0 writes: on another rank no writer opens a file, a run, a thread or a process, unless asked
for with ``all_ranks=True``, and then each rank gets its own file and run."""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import pytest

from writers import (
    BackgroundWriter,
    JSONLWriter,
    MetricsLoggerWriter,
    MultiWriter,
    TensorBoardWriter,
    build_writers,
    read_jsonl,
)
from writers.base import NullWriter
from writers.process import ProcessWriter

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")


def _children() -> list[int]:
    """Process ids whose parent is this process (Linux /proc)."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                found.append(int(entry.name))
    return found


@pytest.fixture
def rank1(monkeypatch: pytest.MonkeyPatch) -> None:
    # what torchrun, accelerate launch and Lightning set in every process they start
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")


@pytest.mark.usefixtures("rank1")
def test_no_writer_opens_anything_on_another_rank(tmp_path: Path) -> None:
    from writers.mlflow import MLflowWriter
    from writers.wandb import WandbWriter

    threads, children = threading.active_count(), _children()
    made = [
        JSONLWriter(tmp_path / "m.jsonl"),
        TensorBoardWriter(tmp_path / "tb"),
        MLflowWriter(logdir=tmp_path / "ml"),
        WandbWriter(dir=tmp_path / "wb", mode="offline"),
        BackgroundWriter(JSONLWriter(tmp_path / "bg.jsonl")),
        ProcessWriter(functools.partial(JSONLWriter, tmp_path / "p.jsonl"), name="p"),
        MultiWriter([JSONLWriter(tmp_path / "x.jsonl")]),
        MetricsLoggerWriter(object()),
        build_writers(
            {"log_dir": str(tmp_path / "all"), "backends": ["jsonl", "tensorboard", "mlflow", "wandb"]}
        ),
    ]
    for writer in made:
        assert isinstance(writer, NullWriter)
        writer.log_scalars({"a": 1.0}, 1)
        writer.flush()
        writer.close()
    assert list(tmp_path.iterdir()) == []  # no file, no directory
    assert threading.active_count() == threads and _children() == children  # no thread, no process
    with pytest.raises(ValueError, match="unknown backends"):  # the config is still checked on every rank
        build_writers({"backends": ["tensorbored"]})


@pytest.mark.usefixtures("rank1")
def test_all_ranks_gives_each_rank_its_own_file_and_run(tmp_path: Path) -> None:
    import wandb_reader
    from mlflow.tracking import MlflowClient

    config = {
        "log_dir": str(tmp_path),
        "backends": ["jsonl", "tensorboard", "mlflow", "wandb"],
        "wandb": {"mode": "offline", "project": "p"},
        "all_ranks": True,
    }
    writer = build_writers(config)
    assert isinstance(writer, MultiWriter)
    writer.log_scalars({"train/loss": 0.5}, 3)
    writer.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.rank1.jsonl")] == [3]
    assert list((tmp_path / "tensorboard" / "hjepa" / "rank1").glob("events.out.tfevents.*"))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'rank1' / 'mlflow.db'}")
    run = client.get_run((tmp_path / "rank1" / "mlflow_run_id").read_text().strip())
    assert run.info.run_name == "hjepa-rank1" and run.data.metrics == {"train/loss": 0.5}
    assert [r["global_step"] for r in wandb_reader.history(tmp_path / "rank1")] == [3]
    direct = JSONLWriter(tmp_path / "direct.jsonl", all_ranks=True)
    direct.log_scalars({"a": 1.0}, 1)
    direct.close()
    assert (tmp_path / "direct.rank1.jsonl").exists() and not (tmp_path / "direct.jsonl").exists()


def test_rank_zero_and_single_processes_write_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with JSONLWriter(tmp_path / "m.jsonl") as writer:
        writer.log_scalars({"a": 1.0}, 1)
    assert isinstance(writer, JSONLWriter) and (tmp_path / "m.jsonl").exists()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    with JSONLWriter(tmp_path / "n.jsonl", all_ranks=True) as alone:  # one process: no rank suffix
        alone.log_scalars({"a": 1.0}, 1)
    assert alone.path == tmp_path / "n.jsonl"
