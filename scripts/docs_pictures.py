"""Make the README's pictures of what goes beyond the guide: ``docs/eigenspectrum.png`` (from ``report``),
``docs/compare_collapse.png`` (from ``compare``) and ``docs/embeddings_pca.png`` (the last level-0 PCA
scatter of ``log_embedding`` in each run), from two real demo runs, healthy and collapsing.

    python scripts/docs_pictures.py [--steps 300]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hjepa_metrics.cli", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hjepa-docs-") as tmp:
        for scenario in ("healthy", "collapse"):
            cli(
                "demo",
                "--steps",
                str(args.steps),
                "--scenario",
                scenario,
                "--run-name",
                scenario,
                "--log-dir",
                tmp,
                "--backends",
                "jsonl",
                "--no-progress",
            )
        cli("report", f"{tmp}/healthy", "--out", f"{tmp}/report")
        cli("compare", f"{tmp}/healthy", f"{tmp}/collapse", "--out", f"{tmp}/compare")
        shutil.copy(next(Path(tmp, "report").glob("*_eigenspectrum.png")), DOCS / "eigenspectrum.png")
        shutil.copy(
            next(Path(tmp, "compare").glob("*_collapse_monitoring.png")), DOCS / "compare_collapse.png"
        )
        pca_side_by_side(Path(tmp), DOCS / "embeddings_pca.png")
    names = ("eigenspectrum.png", "compare_collapse.png", "embeddings_pca.png")
    print("wrote", ", ".join(str(DOCS / name) for name in names))


def pca_side_by_side(runs: Path, target: Path, tag: str = "val/collapse/level0_pca") -> None:
    """The last ``tag`` image of the healthy and the collapse run, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from writers import read_jsonl

    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    for ax, scenario in zip(axes, ("healthy", "collapse"), strict=True):
        record = [r for r in read_jsonl(runs / scenario) if r.get("tag") == tag][-1]
        ax.imshow(plt.imread(runs / scenario / record["path"]))
        ax.set_title(f"{scenario}: {tag}, step {record['step']}", fontsize=8)
        ax.set_axis_off()
    fig.savefig(target, dpi=80, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
