"""`m2 serve`: run the HTTP service (uvicorn) on a checkpoint.

Flags override `M2_*` environment variables, which override the defaults of
`service.settings.Settings`. A missing or damaged checkpoint stops the command with one
line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

PROG = "m2 serve"


class _DropStartupNoise(logging.Filter):
    """uvicorn's own 'Application startup failed' line repeats what we print."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Application startup failed" not in record.getMessage()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve an M2 checkpoint over HTTP.")
    p.add_argument("--checkpoint", help="checkpoint directory (default: checkpoints/m2-demo)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    p.add_argument("--max-batch-size", type=int, help="requests per model call (default 8)")
    p.add_argument("--max-wait-ms", type=float, help="wait to fill a batch (default 10)")
    p.add_argument("--max-queue", type=int, help="waiting requests before 503 (default 64)")
    p.add_argument("--no-warmup", action="store_true", help="ready without a warm-up prediction")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from service.settings import Settings  # light; the app and torch come after the checks

    overrides = {
        k: v
        for k, v in {
            "checkpoint": args.checkpoint, "host": args.host, "port": args.port,
            "device": args.device, "max_batch_size": args.max_batch_size,
            "max_wait_ms": args.max_wait_ms, "max_queue": args.max_queue,
            "warmup": False if args.no_warmup else None,
        }.items()
        if v is not None
    }  # fmt: skip
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        print(f"{PROG}: error: {where}: {err['msg']}", file=sys.stderr)
        return 2
    if not settings.checkpoint.is_dir():
        print(
            f"{PROG}: error: checkpoint directory not found: {settings.checkpoint} "
            "(pass --checkpoint DIR or set M2_CHECKPOINT)",
            file=sys.stderr,
        )
        return 2
    try:
        settings.resolved_device()
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2

    import uvicorn

    from service.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=args.log_level, lifespan="on",
        timeout_graceful_shutdown=5,
    )  # fmt: skip
    server = uvicorn.Server(config)
    logging.getLogger("uvicorn.error").addFilter(_DropStartupNoise())
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits itself on bind errors and failed startups
        code = e.code
    else:
        code = 0 if server.started else 3
    error = getattr(app.state, "startup_error", None)
    if error:  # the lifespan's one-line reason; uvicorn was given no traceback
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0 if not code else 2


if __name__ == "__main__":
    sys.exit(main())
