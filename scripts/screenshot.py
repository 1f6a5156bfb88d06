"""Screenshot of the service's web page after a prediction, for people to look at.

    python scripts/screenshot.py --checkpoint checkpoints/m2-demo --frame photo.jpg --out out/page.png
    python scripts/screenshot.py --url http://127.0.0.1:8000 --frame photo.jpg

Starts `m2 serve` on a free port unless `--url` is given, opens `/` in headless Debian
chromium (Playwright, never a downloaded browser), uploads the frame, waits for the
caption and the GIF, and writes a full-page PNG. Without `--frame` it uses the service's
warm-up picture.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--disable-background-networking", "--disable-component-update", "--no-first-run",
               "--disable-sync", "--disable-gpu", "--no-sandbox"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"screenshot: error: m2 serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"screenshot: error: {url} not ready after {timeout:.0f} s")


def shoot(url: str, frame: Path, out: Path, side_by_side: bool) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.goto(url + "/")
        page.set_input_files("#file", str(frame))
        if side_by_side:
            page.check("#side")
        page.click("#go")
        page.wait_for_function(
            "() => { const g = document.getElementById('gif'); return !g.hidden && g.naturalWidth > 0; }",
            timeout=120_000,
        )
        page.wait_for_timeout(600)  # let the GIF show a predicted frame, not only "now"
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running server (else one is started)")
    ap.add_argument("--checkpoint", help="checkpoint for the server started here")
    ap.add_argument("--frame", type=Path, help="image to upload (default: the warm-up picture)")
    ap.add_argument("--out", type=Path, default=Path("out/page.png"))
    ap.add_argument("--side-by-side", action="store_true", help="GIF with the predicted key frame")
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(
            f"screenshot: error: {CHROMIUM} not found (apt-get install -y chromium)",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        frame = args.frame
        if frame is None:
            from service.render import warmup_png

            frame = Path(tmp) / "frame.png"
            frame.write_bytes(warmup_png())
        elif not frame.is_file():
            print(f"screenshot: error: frame not found: {frame}", file=sys.stderr)
            return 2
        proc = None
        url = args.url
        if url is None:
            port = _free_port()
            cmd = [
                sys.executable,
                "-m",
                "training.cli",
                "serve",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ]
            if args.checkpoint:
                cmd += ["--checkpoint", args.checkpoint]
            proc = subprocess.Popen(cmd, env={**os.environ})
            url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url.rstrip("/"), proc)
            shoot(url.rstrip("/"), frame, args.out, args.side_by_side)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=15)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
