"""The architecture's promises: the registry knows every tag a full demo run emits, every backend is
reachable from its one declaration, and the Writer protocol is all a caller needs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from hjepa_metrics import registry
from hjepa_metrics.cli import build_parser, main
from writers import BackgroundWriter, Location, MultiWriter, Writer, build_writers, read_jsonl
from writers.backends import BUILTIN, backends_markdown
from writers.process import ProcessWriter

ROOT = Path(__file__).resolve().parents[1]


def test_every_tag_of_a_full_demo_run_is_in_the_registry(tmp_path: Path) -> None:
    from hjepa_metrics.examples import train_hjepa

    # 26 steps: losses ... EMA (steps 0 and 25), media at step 0, validation twice
    train_hjepa.main(
        [
            "--steps",
            "26",
            "--log-dir",
            str(tmp_path),
            "--backends",
            "jsonl",
            "--no-progress",
            "--run-name",
            "r",
        ]
    )
    records = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    emitted = {t for r in records for t in r.get("metrics", {})}
    emitted |= {r["tag"] for r in records if r.get("kind") in ("histogram", "image")}
    assert len(emitted) > 100
    unknown = sorted(t for t in emitted if registry.lookup(t) is None)
    assert unknown == [], f"tags emitted but not in the registry: {unknown}"
    groups = {m.spec.group for t in emitted if (m := registry.lookup(t)) is not None}
    assert {"losses", "collapse", "prediction", "ema", "media"} <= groups


def _section(name: str) -> dict[str, Any]:
    return {"wandb": {"mode": "offline", "project": "p"}}.get(name, {})


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_each_builtin_backend_is_reachable_from_its_declaration(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip({"jsonl": "json"}.get(name, name))
    backend = BUILTIN[name]
    # config: a section with the declared keys only, unknown keys refused with the declared list
    config = {
        "log_dir": str(tmp_path),
        "backends": [name],
        "background": False,
        # a writer process reports where its run is once started: wait for it however loaded the
        # machine is (MLflow's first start creates its schema: past the default 10 s under load, seen)
        "timeout": 120,
        name: _section(name),
    }
    writer = build_writers(config)
    # in a writer process by default where the backend says so, its own class otherwise
    expected = ProcessWriter if backend.process else backend.writer
    assert expected is not None and isinstance(writer, expected)
    assert writer.locations() and all(isinstance(w, Location) for w in writer.locations())
    writer.close()
    in_thread = build_writers({**config, name: {**_section(name), "process": False}})
    assert backend.writer is not None and isinstance(in_thread, backend.writer)
    assert in_thread.locations() == writer.locations() or name == "wandb"  # a new W&B run each time
    in_thread.close()
    with pytest.raises(ValueError, match=rf"config\['{name}'\]: unknown keys \['nope'\]"):
        build_writers({"log_dir": str(tmp_path), "backends": [name], name: {"nope": 1}})
    # replay --to and the CLI listing
    args = build_parser().parse_args(["replay", "x.jsonl", "--to", name])
    assert args.to == name
    assert main(["backends"]) == 0
    assert name in capsys.readouterr().out
    # the docs table
    assert f"| `{name}` | `[{backend.extra}]` | {backend.writes} |" in backends_markdown()


def test_readme_backend_table_is_generated() -> None:
    assert backends_markdown() in (ROOT / "README.md").read_text(encoding="utf-8"), (
        "README's backend table is stale: paste `hjepa-metrics backends --format markdown`"
    )


def test_an_entry_point_backend_reaches_replay_too(monkeypatch: pytest.MonkeyPatch) -> None:
    import writers.backends as backends_module

    class EP:
        name = "memory"

        def load(self) -> Any:
            raise AssertionError("listing a backend must not load it")

    monkeypatch.setattr(backends_module, "entry_points", lambda group: [EP()])
    assert build_parser().parse_args(["replay", "x.jsonl", "--to", "memory"]).to == "memory"


class Plain:
    """A writer that implements the protocol without BaseWriter."""

    name = "plain"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def log_scalars(self, metrics: Mapping[str, float], step: int, wall_time: float | None = None) -> None:
        self.calls.append(("scalars", dict(metrics)))

    def log_histogram(self, tag: str, values: Any, step: int) -> None:
        self.calls.append(("histogram", tag))

    def log_image(self, tag: str, image: Any, step: int) -> None:
        self.calls.append(("image", tag))

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.calls.append(("config", dict(config)))

    def log_layout(self, layout: Mapping[str, Any]) -> None:
        self.calls.append(("layout", None))

    def define_summaries(self, summaries: Mapping[str, str]) -> None:
        self.calls.append(("summaries", dict(summaries)))

    def locations(self) -> list[Location]:
        return [Location("plain", "memory")]

    def error_counts(self) -> dict[str, int]:
        return {}

    def flush(self) -> None:
        self.calls.append(("flush", None))

    def close(self, failed: bool | None = None) -> None:
        self.calls.append(("close", failed))

    def __enter__(self) -> Plain:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(failed=exc is not None)


def test_a_protocol_writer_gets_the_close_status_and_summaries_through_wrappers() -> None:
    from hjepa_metrics import HJEPAMetricsLogger

    inner = Plain()
    assert isinstance(inner, Writer)
    multi = MultiWriter([BackgroundWriter(inner)])
    logger = HJEPAMetricsLogger(multi)
    logger.log_scalars({"loss/total": 1.0}, global_step=1)
    assert [str(w) for w in logger.writer.locations()] == [str(Location("plain", "memory"))]
    with pytest.raises(RuntimeError), logger:
        raise RuntimeError("boom")
    kinds = [k for k, _ in inner.calls]
    assert kinds[:2] == ["layout", "summaries"] and ("close", True) in inner.calls
    summaries = next(v for k, v in inner.calls if k == "summaries")
    assert summaries["train/loss/total"] == "min"
