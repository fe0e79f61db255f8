"""The ``hjepa-metrics`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from writers import RecordError, available_backends
from writers.backends import backends_markdown

from . import registry


def tags_markdown(num_hierarchies: int = 3) -> str:
    """The tag reference (``docs/tags.md``), generated from the registry."""
    lines = [
        "# Tag reference",
        "",
        f"Generated from `hjepa_metrics.registry` by `hjepa-metrics tags --format markdown` "
        f"({num_hierarchies} levels). Tags are written under `train/` or `val/`. Templates with "
        "`{module}`, `{group}` or `{param}` expand to the names in your model; the guide's names are listed.",
        "",
    ]
    for group in registry.GROUPS:
        lines += [
            f"## {group}",
            "",
            "| tag | unit | meaning | formula | dashboard | alert |",
            "|---|---|---|---|---|---|",
        ]
        for spec in registry.REGISTRY:
            if spec.group != group:
                continue
            for tag in spec.expand(num_hierarchies) or [spec.template]:
                match = registry.lookup(tag)
                level = match.level if match else None
                meaning = spec.meaning.format(level=level, **_names(spec, match.name if match else None))
                where = spec.category if spec.in_layout(level) and match else ""
                alert = spec.alert.describe() if spec.alert else ""
                formula = spec.formula.replace("|", "\\|")
                lines.append(f"| `{tag}` | {spec.unit} | {meaning} | {formula} | {where or ''} | {alert} |")
        lines.append("")
    return "\n".join(lines)


def _cmd_tags(args: argparse.Namespace) -> int:
    tags = registry.tags(args.num_hierarchies)
    if args.format == "markdown":
        print(tags_markdown(args.num_hierarchies), end="")
        return 0
    if args.format == "json":
        rows = []
        for tag in tags:
            match = registry.lookup(tag)
            assert match is not None
            spec = match.spec
            rows.append(
                {
                    "tag": args.prefix + tag,
                    "group": spec.group,
                    "unit": spec.unit,
                    "meaning": spec.meaning.format(level=match.level, **_names(spec, match.name)),
                    "category": spec.category if spec.in_layout(match.level) else None,
                    "formula": spec.formula,
                    "alert": spec.alert.describe() if spec.alert else None,
                }
            )
        print(json.dumps(rows, indent=2))
    else:
        width = max(len(args.prefix + t) for t in tags)
        for tag in tags:
            match = registry.lookup(tag)
            assert match is not None
            print(f"{args.prefix + tag:<{width}}  {match.spec.unit}")
    return 0


def _names(spec: registry.TagSpec, name: str | None) -> dict[str, str]:
    return {spec.placeholder: name or ""} if spec.placeholder else {}


def _cmd_layout(args: argparse.Namespace) -> int:
    from . import layout

    guide = args.format == "guide-json" or args.guide
    tree = (
        layout.guide_layout(args.num_hierarchies, prefix=args.prefix)
        if guide
        else layout.dashboard_layout(args.num_hierarchies, args.prefix, cuda=args.cuda)
    )
    if args.format in ("guide-json", "json"):
        text = json.dumps(tree, indent=2)
        if args.logdir:
            path = Path(args.logdir) / "tensorboard_layout.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n", encoding="utf-8")
            print(f"wrote {path}")
        else:
            print(text)
        return 0
    from writers.tensorboard import TensorBoardWriter, layout_proto

    if args.logdir:
        with TensorBoardWriter(args.logdir) as writer:
            writer.log_layout(tree)
        print(f"wrote the custom-scalars layout to {args.logdir}")
        print(f"open it with: tensorboard --logdir {args.logdir}")
        return 0
    from google.protobuf import text_format

    print(text_format.MessageToString(layout_proto(tree)), end="")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from writers import build_writers
    from writers.config import config_from_env, load_config

    from .replay import DestinationError, destination_config, replay, scan_run, skipped_records

    contents = scan_run(args.run, args.run_number)  # a bad run is refused before any backend is touched
    config = destination_config(
        contents,
        to=[b.strip() for b in args.to.split(",") if b.strip()] if args.to else None,
        log_dir=args.log_dir,
        run_name=args.run_name,
        experiment_name=args.experiment_name,
        tracking_uri=args.tracking_uri,
        project=args.project,
        mode=args.mode,
        resume=args.resume,
        base=load_config(args.config) if args.config else config_from_env(os.environ),
    )
    destination = Path(config["log_dir"])
    if not config["resume"] and destination.is_dir() and any(destination.iterdir()):
        raise FileExistsError(
            f"{destination} already holds a run; pass --resume to continue it (steps already there are "
            "skipped) or choose another --log-dir"
        )
    backends = ", ".join(config["backends"])
    try:
        writer = build_writers(config)
    except (ImportError, ValueError, TypeError):
        raise
    except Exception as exc:  # W&B not logged in, a server down: one line, exit 1
        raise DestinationError(f"could not open {backends}: {type(exc).__name__}: {exc}") from exc
    try:
        counts = replay(contents, writer, num_hierarchies=args.num_hierarchies)
        writer.close()
    except RecordError:
        writer.close(failed=True)
        raise
    except Exception as exc:
        writer.close(failed=True)
        raise DestinationError(f"writing to {backends} failed: {type(exc).__name__}: {exc}") from exc
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    print(f"replayed {sum(counts.values())} records of {contents.path} ({kinds}) to {backends}")
    for name, skipped in sorted(skipped_records(writer).items()):
        print(f"  {name}: {skipped} scalar records skipped, their steps were already there")
    print("look at it with:")
    for where in writer.locations():
        print(f"  {where}")
    return 0


def _cmd_backends(args: argparse.Namespace) -> int:
    if args.format == "markdown":
        print(backends_markdown(), end="")
        return 0
    for name, backend in available_backends().items():
        extra = (
            f'pip install "hjepa-metrics[{backend.extra}]"' if backend.extra else "(installed by its package)"
        )
        print(f"{name:<12} {extra}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    out = args.out or str(Path(args.run).with_suffix("")) + "_report"
    report = build_report(
        args.run, out, num_hierarchies=args.num_hierarchies, run=args.run_number, html=args.html
    )
    print(report.text())
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_runs

    result = compare_runs(args.runs, args.out)
    print(result.text())
    print(f"\nFigures and compare.html (self-contained) in {args.out}")
    return 0


def run_demo(argv: Sequence[str]) -> int:
    """``hjepa-metrics demo ARGS`` is ``python examples/train_hjepa.py ARGS``."""
    from importlib import import_module

    # examples/ is installed as hjepa_metrics.examples (package-dir mapping in pyproject.toml)
    import_module("hjepa_metrics.examples.train_hjepa").main(list(argv), prog="hjepa-metrics demo")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hjepa-metrics", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_tags = sub.add_parser("tags", help="list every tag of the registry")
    p_tags.add_argument("--num-hierarchies", type=int, default=3)
    p_tags.add_argument("--prefix", default="", help="prefix such as train/")
    p_tags.add_argument("--format", choices=("text", "json", "markdown"), default="text")
    p_tags.set_defaults(func=_cmd_tags)

    p_layout = sub.add_parser("layout", help="print or write the custom-scalars layout")
    p_layout.add_argument(
        "--format",
        choices=("guide-json", "json", "tensorboard"),
        default="guide-json",
        help="guide-json: the guide's exact tensorboard_layout.json; json: the dashboard the logger writes "
        "(no CUDA charts unless --cuda, one unit per chart, val/ beside train/); tensorboard: the "
        "dashboard as TensorBoard's Layout proto (the guide's with --guide)",
    )
    p_layout.add_argument("--guide", action="store_true", help="the guide's exact charts for every format")
    p_layout.add_argument("--cuda", action="store_true", help="keep the CUDA memory charts (dashboard)")
    p_layout.add_argument("--num-hierarchies", type=int, default=3)
    p_layout.add_argument("--prefix", default="train/")
    p_layout.add_argument(
        "--logdir", default=None, help="write into this TensorBoard log dir instead of printing"
    )
    p_layout.set_defaults(func=_cmd_layout)

    p_replay = sub.add_parser("replay", help="send a JSONL run into TensorBoard, MLflow, W&B or JSONL")
    p_replay.add_argument("run", help="a metrics.jsonl file or the directory holding it")
    p_replay.add_argument(
        "--to",
        help=f"backends, comma-separated, of {', '.join(sorted(available_backends()))} "
        "(default: HJEPA_METRICS_BACKENDS, else tensorboard)",
    )
    p_replay.add_argument("--log-dir", help="where the replay goes (default runs/replay/<run name>)")
    p_replay.add_argument("--run-name", help="the replayed run's name (default: the run directory's name)")
    p_replay.add_argument("--experiment-name", help="MLflow experiment (default hjepa)")
    p_replay.add_argument(
        "--tracking-uri",
        help="MLflow server or store (default: MLFLOW_TRACKING_URI, else sqlite in --log-dir)",
    )
    p_replay.add_argument("--project", help="W&B project (default: WANDB_PROJECT, else the experiment name)")
    p_replay.add_argument(
        "--mode", choices=("online", "offline"), help="W&B mode (default: WANDB_MODE, else online)"
    )
    p_replay.add_argument(
        "--resume",
        action="store_true",
        help="continue a replay already in --log-dir: steps already there are skipped",
    )
    p_replay.add_argument(
        "--run", dest="run_number", type=int, help="which run of a file that holds several (1 = first)"
    )
    p_replay.add_argument(
        "--config",
        help="a YAML/JSON logging config (default: HJEPA_METRICS_* variables); the options above override it",
    )
    p_replay.add_argument("--num-hierarchies", type=int, default=None, help="default: read from the tags")
    p_replay.set_defaults(func=_cmd_replay)

    p_report = sub.add_parser(
        "report", help="a training-health report (PNGs, alerts, summary) from a JSONL run"
    )
    p_report.add_argument("run", help="a metrics.jsonl file or the directory holding it")
    p_report.add_argument("--out", help="output folder (default: next to the run, <run>_report)")
    p_report.add_argument(
        "--html", action="store_true", help="also write report.html: one self-contained page (no network)"
    )
    p_report.add_argument("--num-hierarchies", type=int, default=None, help="default: read from the tags")
    p_report.add_argument(
        "--run", dest="run_number", type=int, help="which run of a file that holds several (1 = first)"
    )
    p_report.set_defaults(func=_cmd_report)

    p_compare = sub.add_parser(
        "compare", help="overlay runs per dashboard category and tabulate each tag's last, min and max"
    )
    p_compare.add_argument("runs", nargs="+", help="metrics.jsonl files or the directories holding them")
    p_compare.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p_compare.set_defaults(func=_cmd_compare)

    p_backends = sub.add_parser("backends", help="list the backends, their extras and what they write")
    p_backends.add_argument("--format", choices=("text", "markdown"), default="text")
    p_backends.set_defaults(func=_cmd_backends)

    # parsed by the example itself (see run_demo); listed here for --help
    sub.add_parser(
        "demo",
        help="train a small H-JEPA on synthetic images on the CPU (about a minute), logging "
        "every guide metric; `hjepa-metrics demo --help` for its options",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["demo"]:
        return run_demo(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    levels = getattr(args, "num_hierarchies", None)
    if levels is not None and levels < 1:
        parser.error(f"--num-hierarchies: got {args.num_hierarchies}; expected >= 1")
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `hjepa-metrics tags | head`
        sys.stderr.close()
        return 0
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        # bad input (a missing or malformed run, a missing extra): one line, not a traceback
        if os.environ.get("HJEPA_METRICS_TRACEBACK"):
            raise
        print(f"hjepa-metrics {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
