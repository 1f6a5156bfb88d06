"""`m2 eval-tokenizer`: how well an image tokenizer keeps the figure, on held-out clips.

    m2 eval-tokenizer --tokenizer DIR --data DIR --out DIR [--compare DIR] [--frames N]

Writes `OUT/report.json`, `OUT/report.md` and `OUT/sheet.png`:

- PSNR over the whole letterboxed frame and over the limb band (pixels within 5 px of the
  labelled shoulder-elbow-wrist and hip-knee-ankle segments), each beside the 16x16 block
  mean of the same frames: a tokenizer that only gets the background right scores well on
  the whole frame and no better than the block mean on the limbs;
- codebook usage (distinct ids over the vocabulary) and the share of dead codes, with the
  ids' perplexity;
- a sheet of original / reconstruction / difference (x4) for frames with raised arms and
  fast wrists (blur trails), one row each.

`--compare DIR` scores a second tokenizer (today's, say) on the same frames, in the same
table. Frames: the clips the labels mark as test (`train = -1`); `--split all` takes every
clip, for a folder rendered with a seed no tokenizer saw.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from m2core.tokenizers.image import ImageTokenizer, atomic_write
from training.data.penn_action import Clip, iter_clips
from training.tokenizer import data

SHEET_ROWS = 6


def held_out_clips(root: Path, split: str) -> list[Clip]:
    clips = list(iter_clips(root))
    chosen = clips if split == "all" else [c for c in clips if not c.train]
    if not chosen:
        raise ValueError(f"{root}: no {split} clips (labels with train = -1); try --split all")
    return chosen


def sheet_refs(clips: list[Clip], rows: int) -> list[data.FrameRef]:
    """One frame per clip, from the clips whose best frame has the arms highest and the
    wrists fastest (the blur trails), best first."""
    best: list[tuple[float, data.FrameRef]] = []
    for clip in clips:
        if clip.nframes < 2:
            continue
        scale = max(clip.dims)
        wrist_y = clip.y[:, 5:7].min(1)
        shoulder_y = clip.y[:, 1:3].mean(1)
        raised = (shoulder_y - wrist_y) / scale  # > 0: a wrist above the shoulders
        speed = np.zeros(clip.nframes)
        step = np.hypot(np.diff(clip.x[:, 5:7], axis=0), np.diff(clip.y[:, 5:7], axis=0))
        speed[1:] = step.max(1) / scale
        seen = clip.visibility[:, 5:7].all(1) & clip.visibility[:, 1:3].all(1)
        score = np.where(seen, np.clip(raised, 0, None) + 4 * speed, -np.inf)
        i = int(np.argmax(score))
        if np.isfinite(score[i]):
            best.append((float(score[i]), (clip, i)))
    best.sort(key=lambda t: -t[0])
    return [ref for _, ref in best[:rows]]


def draw_sheet(
    originals: torch.Tensor, recons: dict[str, torch.Tensor], path: Path, gain: int = 4
) -> None:
    """Rows of original | reconstruction | |difference| x gain, per tokenizer."""
    names = list(recons)
    cols = ["original"] + [f"{n}: {k}" for n in names for k in ("reconstruction", "difference")]
    size, label = originals.shape[1], 14
    sheet = Image.new("RGB", (size * len(cols), label + size * len(originals)), "white")
    pen = ImageDraw.Draw(sheet)
    for c, title in enumerate(cols):
        pen.text((c * size + 4, 1), title, fill="black")
    for r, frame in enumerate(originals):
        tiles = [frame.numpy()]
        for n in names:
            rec = recons[n][r].numpy()
            diff = np.abs(rec.astype(np.int16) - frame.numpy().astype(np.int16)) * gain
            tiles += [rec, np.clip(diff, 0, 255).astype(np.uint8)]
        for c, tile in enumerate(tiles):
            sheet.paste(Image.fromarray(tile), (c * size, label + r * size))
    atomic_write(path, lambda p: sheet.save(p, format="PNG"))


def evaluate_dir(
    tokenizers: dict[str, ImageTokenizer], root: Path, frames: int, split: str
) -> tuple[dict[str, Any], list[data.FrameRef]]:
    clips = held_out_clips(root, split)
    refs = data.spread(data.frame_refs(clips), frames)
    images, bands = data.load_frames(refs, "held-out frames", bands=True)
    report: dict[str, Any] = {"frames": len(refs), "clips": len(clips), "split": split}
    for k, (name, tok) in enumerate(tokenizers.items()):
        m = data.evaluate(tok, images, baselines=k == 0, bands=bands)  # baselines once
        report[name] = {
            "psnr": m["psnr"],
            "psnr_limb_band": m["psnr_limb_band"],
            "codebook_usage": m["codebook_usage"],
            "dead_codes": 1.0 - m["codebook_usage"],
            "ids_used": m["ids_used"],
            "vocab_size": m["vocab_size"],
            "perplexity": m["perplexity"],
            "params": tok.num_params(),
            "levels": list(tok.config.levels),
        }
        if k == 0:
            report["block_mean"] = {
                "psnr": m["psnr_block_mean"],
                "psnr_limb_band": m["psnr_limb_band_block_mean"],
            }
    return report, sheet_refs(clips, SHEET_ROWS)


def markdown(report: dict[str, Any], names: list[str]) -> str:
    base = report["block_mean"]
    lines = [
        f"Held-out frames: {report['frames']} from {report['clips']} clips ({report['split']}).",
        "",
        "| | whole frame (dB) | limb band (dB) | vs block mean (whole / band) "
        "| codebook usage | dead codes | perplexity |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = report[n]
        lines.append(
            f"| {n} ({r['vocab_size']:,} codes) | {r['psnr']:.2f} | {r['psnr_limb_band']:.2f} "
            f"| {r['psnr'] - base['psnr']:+.2f} / {r['psnr_limb_band'] - base['psnr_limb_band']:+.2f} "
            f"| {r['codebook_usage']:.1%} | {r['dead_codes']:.1%} | {r['perplexity']:.0f} |"
        )
    lines.append(
        f"| 16x16 block mean | {base['psnr']:.2f} | {base['psnr_limb_band']:.2f} | | | | |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="m2 eval-tokenizer",
        description="Score an image tokenizer on held-out clips: whole-frame and limb-band "
        "PSNR beside the 16x16 block mean, codebook usage, and a sheet of reconstructions.",
    )
    parser.add_argument("--tokenizer", required=True, help="exported tokenizer or checkpoint dir")
    parser.add_argument("--data", required=True, help="Penn-Action-layout folder")
    parser.add_argument("--out", required=True, help="folder for report.json, report.md, sheet.png")
    parser.add_argument("--compare", help="a second tokenizer to score on the same frames")
    parser.add_argument("--frames", type=int, default=512, help="held-out frames (default 512)")
    parser.add_argument(
        "--split", choices=["test", "all"], default="test", help="which clips (default test)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if args.frames < 1:
            raise ValueError(f"--frames must be >= 1, got {args.frames}")
        root = Path(args.data)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such data directory")
        tokenizers = {"tokenizer": ImageTokenizer.from_pretrained(args.tokenizer)}
        if args.compare:
            tokenizers["compare"] = ImageTokenizer.from_pretrained(args.compare)
        report, refs = evaluate_dir(tokenizers, root, args.frames, args.split)
        report["tokenizer_dir"], report["compare_dir"] = args.tokenizer, args.compare
        out.mkdir(parents=True, exist_ok=True)
        originals = data.load_frames(refs, "sheet frames")
        recons = {n: data.reconstruct(t, originals)[0] for n, t in tokenizers.items()}
        draw_sheet(originals, recons, out / "sheet.png")
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"m2 eval-tokenizer: error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(out / "report.json", lambda p: Path(p).write_text(text))
    table = markdown(report, list(tokenizers))
    atomic_write(out / "report.md", lambda p: Path(p).write_text(table))
    print(table, end="")
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'sheet.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
