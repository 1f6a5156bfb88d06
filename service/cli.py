"""`m2 serve`: run the HTTP service (uvicorn) on a checkpoint.

Flags override `M2_*` environment variables, which override the defaults of
`service.settings.Settings`. There is one flag per settings field, made from the field
(name, type, description, default), so `--help` lists every `M2_*` setting. A missing or
damaged checkpoint stops the command with one line on stderr and exit status 2, never a
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo

from service.settings import Settings, env_name, shown_default

PROG = "m2 serve"


class _DropStartupNoise(logging.Filter):
    """uvicorn's own 'Application startup failed' line repeats what we print."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Application startup failed" not in record.getMessage()


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps at spaces only: `checkpoints/m2-demo` stays on one line."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(text, width, break_on_hyphens=False)


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _add_setting(group: argparse._ArgumentGroup, name: str, info: FieldInfo) -> None:
    """One flag for one settings field. Values stay strings: `Settings` parses them, so a
    flag and its `M2_*` variable are read by the same code."""
    kind = info.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `int | None` -> int
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    described = f"{info.description} ({env_name(name)}; default: {shown_default(name)})"
    kwargs: dict[str, Any] = {"help": described.replace("%", "%%"), "dest": name}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is typing.Literal:
        kwargs["choices"] = typing.get_args(kind)
    elif typing.get_origin(kind) in (list, tuple):  # cors_origins -> ORIGIN ...
        kwargs.update(nargs="+", metavar=name.rsplit("_", 1)[-1].removesuffix("s").upper())
    else:
        metavar = {Path: "DIR", SecretStr: "KEY", int: "N", float: "NUMBER", str: "TEXT"}
        kwargs["metavar"] = metavar.get(kind, "VALUE")
    group.add_argument(flag(name), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Serve an M2 checkpoint over HTTP.",
        formatter_class=_HelpFormatter,
        argument_default=argparse.SUPPRESS,  # a flag not given leaves its setting alone
    )
    settings = p.add_argument_group(
        "settings", "each flag overrides its M2_* environment variable, which overrides the default"
    )
    for name, info in Settings.model_fields.items():
        _add_setting(settings, name, info)
    p.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="the server's log level (default: info)",
    )  # fmt: skip
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """`Settings` from the flags given, then `M2_*` variables, then defaults."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**given)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)  # light; the app and torch come after the checks
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        where = flag(field) if field in vars(args) else env_name(field) if field else "settings"
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
