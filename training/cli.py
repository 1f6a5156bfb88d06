"""The `m2` console script: one entry point that dispatches to each command's module.

Every command lives in its own module with a `main(argv) -> int` that owns its argparse
parser, so `m2 <command> --help` shows that command's flags. Modules are imported only
when their command runs, so `m2 synth` never pays for FastAPI and `m2 serve` never
imports the training code.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("training.synth.synth", "render synthetic clips in the Penn Action layout"),
    "contact-sheet": ("training.eval.contact_sheet", "draw skeletons over frames of several clips"),
    "train-tokenizer": ("training.tokenizer.train", "train the image tokenizer"),
    "eval-tokenizer": ("training.eval.tokenizer", "score an image tokenizer on held-out clips"),
    "tokenize-image": ("training.data.tokenize_image", "round-trip an image through the tokenizer"),
    "prepare": ("training.data.prepare", "raw clips -> token shards"),
    "train": ("training.train", "train M2 (same as accelerate launch training/train.py)"),
    "export": ("training.export", "serving checkpoint from a training checkpoint"),
    "fit-image-context": (
        "training.image_context",
        "fit a checkpoint's image context (captions from the frame)",
    ),
    "fit-pose-reader": (
        "training.pose_reader",
        "fit a checkpoint's pose reader (the skeleton from the frame)",
    ),
    "fit-motion": (
        "training.motion",
        "fit a checkpoint's motion head (the forecast from the shape)",
    ),
    "fit-next-frame": (
        "training.next_frame",
        "fit a checkpoint's next-frame head (the next key frame)",
    ),
    "eval": ("training.eval.evaluate", "evaluate a checkpoint against baselines"),
    "calibrate-domain": (
        "training.eval.domain",
        "store a checkpoint's in-domain statistics (the out_of_domain warning)",
    ),
    "serve": ("service.cli", "serve a checkpoint over HTTP"),
    "predict": ("service.predict_cli", "predict from one frame, locally or via a server"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: m2 <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `m2 <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"m2: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM (kill, a scheduler's stop) unwinds like Ctrl-C: worker pools are shut down
    # and temporary files removed instead of orphaned worker processes left running
    signal.signal(signal.SIGTERM, _terminate)
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
