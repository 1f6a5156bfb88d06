"""Side-by-side sheet of held-out frames and their tokenizer reconstructions.

    python scripts/recon_sheet.py --tokenizer DIR --data DIR --out sheet.png [--n 8]

Rows, top to bottom: letterboxed originals, tokenizer reconstructions, and the two plain
baselines (16x16 block mean, nearest 16x16) for comparison. Frames are taken evenly from
the held-out clips (the same split `m2 train-tokenizer` uses), each labelled with its
PSNR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from m2core.tokenizers.image import ImageTokenizer, atomic_write, psnr
from training import tokenizer_data as data
from training.train_tokenizer import TokenizerTrainConfig


def sheet(
    rows: list[tuple[str, torch.Tensor]], originals: torch.Tensor, size: int = 256, gap: int = 4
) -> Image.Image:
    """One row per (label, uint8 (N, 256, 256, 3)); a PSNR caption under each tile."""
    n, label_w, cap = len(originals), 90, 14
    width = label_w + n * (size + gap)
    img = Image.new("RGB", (width, len(rows) * (size + cap + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for r, (label, images) in enumerate(rows):
        y = r * (size + cap + gap)
        draw.text((4, y + size // 2), label, fill=(0, 0, 0))
        values = psnr(images, originals)
        for i in range(n):
            x = label_w + i * (size + gap)
            img.paste(Image.fromarray(images[i].numpy()), (x, y))
            if label != "original":
                draw.text((x + 4, y + size + 1), f"{values[i]:.1f} dB", fill=(0, 0, 0))
    return img


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="exported tokenizer or checkpoint dir")
    parser.add_argument("--data", required=True, help="Penn-Action-layout folder")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--n", type=int, default=8, help="frames to show")
    parser.add_argument("--val-fraction", type=float, default=TokenizerTrainConfig.val_fraction)
    args = parser.parse_args(argv)
    try:
        tok = ImageTokenizer.from_pretrained(args.tokenizer)
        _, held = data.split_clips(args.data, args.val_fraction)
        refs = data.spread(data.frame_refs(held), args.n)
        frames = data.load_frames(refs)
        recon, _ = data.reconstruct(tok, frames)
        rows = [
            ("original", frames),
            ("tokenizer", recon),
            ("block mean", data.block_mean(frames)),
            ("nearest", data.nearest_resample(frames)),
        ]
        out = Path(args.out)
        atomic_write(out, lambda p: sheet(rows, frames).save(p, format="PNG"))
    except (ValueError, FileNotFoundError) as exc:
        print(f"recon_sheet: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {out}: {len(frames)} held-out frames from clips {sorted({c.clip_id for c, _ in refs})}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
