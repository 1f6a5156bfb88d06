"""`m2 predict FRAME`: one prediction from the command line, written as JSON + GIF + PNG.

With `--url` it asks a running `m2 serve`; otherwise it runs the very same app in this
process on `--checkpoint` (the app's own routes, through Starlette's in-process client),
so both ways give the same answer for the same frame and seed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

PROG = "m2 predict"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Predict what happens next in one frame.")
    p.add_argument("frame", help="image file (PNG, JPEG, WebP, BMP)")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--url", help="base URL of a running `m2 serve` (e.g. http://127.0.0.1:8000)"
    )
    where.add_argument("--checkpoint", help="run locally on this checkpoint (default: the demo)")
    p.add_argument("--out", default="out/predict", help="output directory (default out/predict)")
    p.add_argument("--caption", help="a sentence about the frame (else predicted)")
    p.add_argument("--coords", help="JSON 13 x [x, y, visible] in the frame's pixels, or @FILE")
    p.add_argument("--steps", type=int, default=1, help="roll-out steps (default 1)")
    p.add_argument("--temperature", type=float, help="sampling temperature")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument("--action", help="an action name of the checkpoint: steers the forecast")
    p.add_argument("--side-by-side", action="store_true", help="GIF with the predicted key frame")
    p.add_argument(
        "--api-key", default=os.environ.get("M2_API_KEY"), help="for --url (or M2_API_KEY)"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (--url)")
    return p


class CliError(Exception):
    pass


def _client(args: argparse.Namespace) -> AbstractContextManager[Any]:
    if args.url:
        import httpx

        headers = {"X-API-Key": args.api_key} if args.api_key else {}
        return httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=args.timeout)
    from starlette.testclient import TestClient

    from service.app import StartupError, create_app
    from service.settings import Settings

    overrides: dict[str, Any] = {"warmup": False, "api_key": None}
    if args.checkpoint:
        overrides["checkpoint"] = Path(args.checkpoint)
    settings = Settings(**overrides)
    if not settings.checkpoint.is_dir():
        raise CliError(
            f"checkpoint directory not found: {settings.checkpoint} (pass --checkpoint DIR)"
        )

    class _Local(TestClient):
        def __enter__(self):  # one line for a damaged checkpoint, not a traceback
            try:
                return super().__enter__()
            except StartupError as e:
                raise CliError(str(e)) from None

    return _Local(create_app(settings), raise_server_exceptions=False)


def _check(response: Any, what: str) -> Any:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise CliError(f"{what}: HTTP {response.status_code}: {message}")
    return response


def _write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run(args: argparse.Namespace) -> dict[str, Any]:
    frame = Path(args.frame)
    if not frame.is_file():
        raise CliError(f"frame not found: {frame}")
    coords = args.coords
    if coords and coords.startswith("@"):
        coords = Path(coords[1:]).read_text()
    fields = {"caption": args.caption, "coords": coords, "steps": str(args.steps),
              "temperature": args.temperature, "seed": args.seed, "action": args.action}  # fmt: skip
    data = {k: str(v) for k, v in fields.items() if v is not None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with _client(args) as client:
        files = {"frame": (frame.name, frame.read_bytes(), "application/octet-stream")}
        result = _check(client.post("/predict", files=files, data=data), "predict").json()
        params = {"id": result["id"], "side_by_side": str(args.side_by_side).lower()}
        gif = _check(client.get("/rollout.gif", params=params), "GIF").content
        png = _check(client.get("/next_frame.png", params={"id": result["id"]}), "PNG").content
    _write(out / "prediction.json", (json.dumps(result, indent=1) + "\n").encode())
    _write(out / "rollout.gif", gif)
    _write(out / "next_frame.png", png)
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreachable server, unwritable --out, unreadable @FILE
        print(f"{PROG}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # httpx transport errors are not OSErrors
        if type(e).__module__.startswith("httpx"):
            print(f"{PROG}: error: cannot reach {args.url}: {e}", file=sys.stderr)
            return 2
        raise
    out = Path(args.out)
    t = result["timings_ms"]
    print(f"caption: {result['caption']}")
    if result.get("action"):
        print(f"action: {result['action']}")
    for w in result.get("warnings", []):
        print(f"warning ({w['code']}): {w['message']}")
    print(f"model {result['model_version']} on {result['device']}: {t['total']:.0f} ms "
          f"(model {t['model']:.0f} ms)")  # fmt: skip
    for name in ("prediction.json", "rollout.gif", "next_frame.png"):
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
