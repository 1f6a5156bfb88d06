"""Adding a part to a trained serving checkpoint and fitting it alone (`m2 fit-image-context`,
`m2 fit-motion`, `m2 fit-pose-reader`): the shared command line. The checkpoint is loaded, its config gets the
part's option, the part is fitted on a prepared data folder with everything else frozen,
and a new checkpoint is written atomically, with the fit's record in `extra[key]` (and the
records of earlier fits of the same part, when the checkpoint had it, under "earlier")."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from m2core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from m2core.model import M2Config, M2Model
from training.data.shards import Shards

# (model, train, val or None, steps, seed, batch size, **the options' values) -> figures
Fit = Callable[..., dict[str, float]]

# `--read-share` of the fits that learn from skeletons read from the frame (the motion head,
# the next-frame head; `pose_context.read_share_or_default`)
READ_SHARE_OPTION: dict[str, dict[str, Any]] = {
    "--read-share": dict(
        type=float, default=None, dest="read_share",
        help="share of each batch made from the skeleton the pose reader reads from the frame "
        "(default 0.5 with a pose reader, else 0)",
    )
}  # fmt: skip


def main(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    part: str,
    option: Callable[[Any], dict[str, Any]],
    fit: Fit,
    steps: tuple[int, str],
    batch_size: int,
    summary: Callable[[dict[str, float]], str],
    options: dict[str, dict[str, Any]] | None = None,
) -> int:
    """`option(bundle)` -> the config fields that add the part (raises ValueError when the
    checkpoint cannot take it); `part`: the module's name in the model and the key of its
    record in `extra`; `steps`: the default and its help; `options`: further flags
    (argparse keyword arguments, each with a `dest`), passed to `fit` as keywords."""
    log = logging.getLogger(f"m2.{part}")
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("checkpoint", type=Path, help="serving checkpoint (m2 export)")
    p.add_argument("--data", type=Path, required=True, help="prepared data folder (m2 prepare)")
    p.add_argument("--out", type=Path, required=True, help="where to write the new checkpoint")
    p.add_argument("--steps", type=int, default=steps[0], help=steps[1])
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage-dtype", choices=["float16", "bfloat16"], default=None,
                   help="store the weights at half size (loading restores fp32)")  # fmt: skip
    for flag, kwargs in (options or {}).items():
        p.add_argument(flag, **kwargs)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    if args.out.resolve() == args.checkpoint.resolve():
        p.error("--out must differ from the checkpoint (it is read while the new one is written)")
    try:
        bundle = load_checkpoint(args.checkpoint)
        old = bundle.model.config
        fields = option(bundle)
        train, val = Shards(args.data, "train"), None
        if (args.data / "val").is_dir():
            val = Shards(args.data, "val")
        if train.meta.get("image_vocab", old.image_vocab) != old.image_vocab:
            raise ValueError(f"{args.data} and {args.checkpoint} use different image vocabularies")
    except (OSError, ValueError, CheckpointError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = M2Model(M2Config.from_dict({**dataclasses.asdict(old), **fields}))
    missing, unexpected = model.load_state_dict(bundle.model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(part + ".") for k in missing), (missing, unexpected)
    more = {kw["dest"]: getattr(args, kw["dest"]) for kw in (options or {}).values()}
    t0 = time.perf_counter()
    try:
        got = fit(model, train, val, args.steps, args.seed, args.batch_size, **more)
    except ValueError as e:  # data the part cannot be fitted on
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    log.info("%s: %d steps in %.0f s; %s", part, args.steps, seconds, summary(got))
    extra = dict(bundle.config.get("extra") or {})
    record = {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
              "seconds": round(seconds, 1), "data": str(args.data), **more, **got}  # fmt: skip
    had = any(k.startswith(part + ".") for k in bundle.model.state_dict())
    if had and part in extra:  # a further fit of a part the checkpoint had (perhaps grown)
        before = dict(extra[part])
        record["earlier"] = [*before.pop("earlier", []), before]
    extra[part] = record
    card = args.checkpoint / "MODEL_CARD.md"
    save_checkpoint(args.out, model.eval(), bundle.image_tokenizer, bundle.text_tokenizer, extra,
                    card.read_text() if card.is_file() else None, args.storage_dtype)  # fmt: skip
    print(f"wrote {args.out} ({summary(got)})")
    return 0
