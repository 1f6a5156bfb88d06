"""`m2 prepare`: Penn-Action-layout clips -> token shards that training memory-maps.

For every clip: key frames t = 0, H, 2H, ... (while t + S is in the clip; the hop H is the
stride S unless `--hop` sets it) are loaded,
letterboxed to 256x256 and tokenized with the image tokenizer; a sample holds frame t
(`tok_rgb`), frame t + S (`tok_rgb_next`), the joints at t (`coords`) and at six frames
spread up to t + S (`coords_next`: t+1 ... t+6 for S = 6), one caption for frame t, plus
what evaluation needs (joints at t - 1 for the constant-velocity baseline, the person's
box at t, clip, frame and action ids).

Captions come from the dataset's `captions.json` (the synthetic side file), else from
the action label through a template, or from a local BLIP (`--captioner blip:PATH`).
The compact text vocabulary is built from the training captions only.

Splits are by clip, never by frame: Penn Action's own test flag gives `test`, and a
seeded share of the training clips gives `val`.

Output (`--out DIR`): `DIR/<split>/<array>.npy` (open with `np.load(mmap_mode="r")`),
`DIR/text_tokenizer.json`, `DIR/image_tokenizer/`, and `DIR/meta.json`, written last:
a directory without `meta.json` is incomplete. Per-clip results are cached under
`DIR/.work/` as they finish, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from training.data.captioners import BlipCaptioner, parse_captioner
from training.data.prepare_clip import PrepareError, read_clip_samples
from training.data.shard_writer import (
    FORMAT,
    SPLITS,
    file_sha256,
    save_npz,
    write_json,
    write_shards,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareOptions:
    data: Path
    tokenizer: Path
    out: Path
    stride: int = 6
    hop: int | None = None  # key-frame hop; None = stride
    captioner: str = "template"
    val_fraction: float = 0.1
    seed: int = 0
    workers: int = 2
    caption_len: int = 32
    caption_vocab: str = "compact"
    batch_size: int = 32
    skip_bad: bool = False
    device: str = "auto"  # tokenizer / BLIP: auto = cuda when present
    all_to: str | None = None  # put every clip in this split (a held-out evaluation set)


# --- the job ------------------------------------------------------------------------------


def prepare(opts: PrepareOptions) -> dict[str, Any]:
    """Run the whole job; return the meta.json contents."""
    import torch

    from m2core.tokenizers.image import ImageTokenizer, resolve_dir
    from training.data.penn_action import list_clips

    if opts.stride < 1:
        raise ValueError(f"--stride must be >= 1, got {opts.stride}")
    if opts.hop is not None and opts.hop < 1:
        raise ValueError(f"--hop must be >= 1, got {opts.hop}")
    if not 0 <= opts.val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {opts.val_fraction}")
    if not opts.data.is_dir():
        raise FileNotFoundError(f"--data {opts.data}: no such directory")
    kind, blip_path = parse_captioner(opts.captioner)
    tok_dir = resolve_dir(opts.tokenizer)
    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device
    )
    image_tok = ImageTokenizer.from_pretrained(tok_dir, device=device)
    tok_hash = file_sha256(tok_dir / "config.json", tok_dir / "model.safetensors")
    clip_ids = list_clips(opts.data)
    if not clip_ids:
        raise PrepareError(
            f"--data {opts.data}: no clips found (expected frames/NNNN/ and labels/NNNN.mat)"
        )

    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # from now on the folder reads as incomplete
    work = out / ".work"
    job = {"format": FORMAT, "data": str(opts.data.resolve()), "stride": opts.stride,
           "hop": opts.hop or opts.stride, "captioner": opts.captioner, "image_tokenizer_sha256": tok_hash}  # fmt: skip
    job_file = work / "job.json"
    if job_file.is_file() and json.loads(job_file.read_text()) != job:
        log.info("settings changed since the cached run: starting over")
        shutil.rmtree(work)
    (work / "clips").mkdir(parents=True, exist_ok=True)
    write_json(job_file, job)

    todo = [c for c in clip_ids if not (work / "clips" / f"{c}.npz").is_file()]
    if len(todo) < len(clip_ids):
        log.info(
            "resuming: %d of %d clips already prepared", len(clip_ids) - len(todo), len(clip_ids)
        )
    # BLIP words and GPT-2 tokens are about one to one: generate what a caption can hold
    blip = BlipCaptioner(blip_path, device, opts.caption_len - 2) if kind == "blip" else None
    bad: list[str] = []
    with torch.inference_mode():
        for clip_id, res in _clip_results(opts, todo, bad):
            now, nxt = res.pop("image_now"), res.pop("image_next")
            if blip is not None:
                res["captions"] = np.asarray(
                    _batched(blip, res["images"][now], opts.batch_size), dtype=str
                )
            ids = _tokenize(image_tok, res.pop("images"), opts.batch_size)
            save_npz(
                work / "clips" / f"{clip_id}.npz",
                tok_rgb=ids[now], tok_rgb_next=ids[nxt],
                **{k: v for k, v in res.items() if isinstance(v, np.ndarray)},
                info=np.asarray(json.dumps({k: v for k, v in res.items() if not isinstance(v, np.ndarray)})),
            )  # fmt: skip
    return write_shards(opts, clip_ids, bad, work, tok_dir, tok_hash, image_tok.vocab_size)


def _clip_results(opts: PrepareOptions, todo: list[str], bad: list[str]):
    """Yield (clip_id, samples) in order, reading clips in worker processes."""
    bar = tqdm(total=len(todo), desc="prepare", unit="clip", disable=not todo)

    def handle(clip_id: str, get):
        try:
            return get()
        except (ValueError, OSError, KeyError) as e:
            msg = str(e) if clip_id in str(e) else f"clip {clip_id}: {e}"
            if not opts.skip_bad:
                raise PrepareError(msg) from None
            log.warning("skipping %s", msg)
            bad.append(clip_id)
            return None

    try:
        if opts.workers <= 1:
            for c in todo:
                res = handle(c, lambda c=c: read_clip_samples(opts.data, c, opts.stride, opts.hop))
                bar.update()
                if res is not None:
                    yield c, res
        else:
            import multiprocessing as mp

            # a bounded window of clips in flight: each holds its decoded frames (~9 MB for
            # 45 frames), and the tokenizer may be slower than the readers
            window = 2 * opts.workers + 2
            with ProcessPoolExecutor(opts.workers, mp_context=mp.get_context("spawn")) as pool:
                pending: deque = deque()
                queue = iter(todo)
                try:
                    while True:
                        for c in islice(queue, window - len(pending)):
                            pending.append(
                                (
                                    c,
                                    pool.submit(
                                        read_clip_samples, opts.data, c, opts.stride, opts.hop
                                    ),
                                )
                            )
                        if not pending:
                            break
                        c, fut = pending.popleft()
                        res = handle(c, fut.result)
                        bar.update()
                        if res is not None:
                            yield c, res
                except BaseException:
                    for _, fut in pending:
                        fut.cancel()
                    raise
    finally:
        bar.close()


def _batched(fn, items: np.ndarray, batch: int) -> list:
    out: list = []
    for i in range(0, len(items), batch):
        out.extend(fn(items[i : i + batch]))
    return out


def _tokenize(image_tok: Any, images: np.ndarray, batch: int) -> np.ndarray:
    if len(images) == 0:
        return np.zeros((1, 256), np.int64)
    parts = [
        image_tok.encode(images[i : i + batch]).reshape(-1, 256).cpu().numpy()
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(parts)


# --- CLI ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m2 prepare", description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="Penn-Action-layout folder (m2 synth or the real dataset)",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        type=Path,
        help="image tokenizer dir (or a serving checkpoint)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder for the shards")
    p.add_argument("--stride", type=int, default=6, help="key-frame stride S (default 6)")
    p.add_argument(
        "--hop",
        type=int,
        default=None,
        help="frames between key frames (default: the stride); 1 makes every frame a sample",
    )
    p.add_argument(
        "--captioner", default="template", help="template | blip:PATH (local BLIP checkpoint)"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of training clips held out"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="reader processes"
    )
    p.add_argument("--caption-len", type=int, default=32, help="max caption tokens incl. bos/eos")
    p.add_argument("--caption-vocab", choices=("compact", "full"), default="compact")
    p.add_argument("--batch-size", type=int, default=32, help="frames per tokenizer batch")
    p.add_argument("--skip-bad", action="store_true", help="skip broken clips instead of stopping")
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="for the tokenizer / BLIP"
    )
    p.add_argument(
        "--all-to",
        choices=SPLITS,
        default=None,
        help="put every clip in this split (e.g. test, for a held-out evaluation set)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = PrepareOptions(**{k: v for k, v in vars(args).items()})
    try:
        meta = prepare(opts)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"m2 prepare: error: {e}", file=sys.stderr)
        return 2
    c = meta["counts"]
    print(
        f"wrote {opts.out}: "
        + ", ".join(f"{s} {c[s]['samples']} samples / {c[s]['clips']} clips" for s in SPLITS)
        + f"; image vocab {meta['image_vocab']}, text vocab {meta['text_vocab']}"
    )
    return 0
