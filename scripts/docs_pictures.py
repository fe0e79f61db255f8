"""Make the README's pictures of what goes beyond the guide: ``docs/eigenspectrum.png`` (from ``report``)
and ``docs/compare_collapse.png`` (from ``compare``), from two real demo runs, healthy and collapsing.

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
    print(f"wrote {DOCS / 'eigenspectrum.png'} and {DOCS / 'compare_collapse.png'}")


if __name__ == "__main__":
    main()
