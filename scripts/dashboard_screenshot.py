"""Make ``docs/custom_scalars.png``: the demo's run in TensorBoard's Custom Scalars tab (README picture).

    python scripts/dashboard_screenshot.py [--steps 300] [--out docs/custom_scalars.png]

Needs Chromium (Debian: ``apt-get install chromium``) and the ``[tensorboard]`` extra. It trains the demo
into a temporary directory, serves it with a real ``tensorboard`` on 127.0.0.1, and lets headless
Chromium render the tab; the server is stopped by process id at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def chromium() -> str | None:
    """The Chromium executable, if one is installed."""
    return next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(logdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A real TensorBoard on ``logdir``, answering on the returned port."""
    port = free_port()
    exe = Path(sys.executable).with_name("tensorboard")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tensorboard.main"]
    proc = subprocess.Popen(
        [*cmd, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=5) as resp:
                if resp.read() != b"[]":
                    return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError("tensorboard did not start")
        time.sleep(0.5)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def screenshot(url: str, out: Path, browser: str, size: str = "1400,1800") -> None:
    """``url`` rendered by headless Chromium into the PNG ``out``."""
    with tempfile.TemporaryDirectory(prefix="hjepa-chromium-") as profile:
        subprocess.run(
            [
                browser,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={size}",
                "--virtual-time-budget=20000",
                f"--screenshot={out}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "custom_scalars.png")
    )
    args = parser.parse_args()
    browser = chromium()
    if browser is None:
        raise SystemExit("no Chromium found: apt-get install chromium (Debian) or install Chrome")
    with tempfile.TemporaryDirectory(prefix="hjepa-screenshot-") as tmp:
        demo = [sys.executable, "-m", "hjepa_metrics.cli", "demo", "--steps", str(args.steps)]
        subprocess.run([*demo, "--log-dir", tmp, "--run-name", "demo", "--no-progress"], check=True)
        proc, port = serve(Path(tmp) / "tensorboard")
        try:
            screenshot(f"http://127.0.0.1:{port}/#custom_scalars", Path(args.out), browser)
        finally:
            stop(proc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
