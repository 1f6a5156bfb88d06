"""`m2 contact-sheet`: one PNG grid of frames from several clips with skeletons drawn over.

    m2 contact-sheet --data DIR --out sheet.png [--clips K] [--frames F] [--cell PX]

Rows are clips (spread evenly over the data set), columns are frames spread evenly over
each clip; every cell shows the frame with its labelled skeleton (visible joints only)
and box, and a caption line with the clip id, action, view and frame number. It is the
quickest way to see that labels sit on the people and that a data set looks right.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from m2core.draw import draw_skeleton
from training.data.penn_action import list_clips, read_clip

LABEL_H = 14  # pixels of text under each cell
BOX_COLOR = (255, 255, 0)


def _cell(img: Image.Image, joints: np.ndarray, bbox: np.ndarray, cell: int) -> Image.Image:
    """Frame letterboxed into a cell x cell square, with skeleton and box drawn at cell scale
    (so lines stay thin and sharp whatever the frame size)."""
    scale = cell / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    off = np.array([(cell - size[0]) // 2, (cell - size[1]) // 2], float)
    out = Image.new("RGB", (cell, cell))
    out.paste(img.resize(size, Image.Resampling.LANCZOS), tuple(int(v) for v in off))
    pts = joints.copy()
    pts[:, :2] = pts[:, :2] * scale + off
    out = draw_skeleton(out, pts, width=1, radius=2)
    box = np.asarray(bbox, float).reshape(2, 2) * scale + off
    ImageDraw.Draw(out).rectangle(tuple(box.reshape(-1)), outline=BOX_COLOR)
    return out


def make_contact_sheet(
    data: str | Path, clips: int = 8, frames: int = 6, cell: int = 192
) -> Image.Image:
    """The contact sheet of `clips` clips x `frames` frames as an RGB image."""
    if clips < 1 or frames < 1 or cell < 32:
        raise ValueError(f"need clips >= 1, frames >= 1, cell >= 32; got {clips}, {frames}, {cell}")
    ids = list_clips(data)
    if not ids:
        raise ValueError(f"no clips in {Path(data) / 'labels'}")
    chosen = [
        ids[i]
        for i in np.unique(np.linspace(0, len(ids) - 1, min(clips, len(ids))).round().astype(int))
    ]
    sheet = Image.new("RGB", (frames * cell, len(chosen) * (cell + LABEL_H)), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for row, cid in enumerate(tqdm(chosen, desc="contact sheet", unit="clip")):
        clip = read_clip(data, cid)
        idx = np.unique(np.linspace(0, clip.nframes - 1, frames).round().astype(int))
        for col, i in enumerate(idx):
            x0, y0 = col * cell, row * (cell + LABEL_H)
            sheet.paste(
                _cell(clip.frame(int(i)), clip.joints(int(i)), clip.bbox[i], cell), (x0, y0)
            )
            text = f"{cid} {clip.action} {clip.pose} f{i + 1}" if col == 0 else f"f{i + 1}"
            draw.text((x0 + 3, y0 + cell + 1), text, fill=(230, 230, 230))
    return sheet


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m2 contact-sheet", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="data set in the Penn Action layout")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--clips", type=int, default=8, help="clips (rows), default 8")
    p.add_argument("--frames", type=int, default=6, help="frames per clip (columns), default 6")
    p.add_argument("--cell", type=int, default=192, help="cell size in pixels, default 192")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    out = Path(args.out)
    try:
        if out.suffix.lower() != ".png":
            raise ValueError(f"--out must be a .png file, got {out}")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"--out directory {out.parent} does not exist")
        sheet = make_contact_sheet(args.data, args.clips, args.frames, args.cell)
        tmp = out.with_name(f".tmp-{out.name}")
        sheet.save(tmp, format="PNG")
        os.replace(tmp, out)
    except (ValueError, OSError) as e:
        print(f"m2 contact-sheet: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({sheet.width}x{sheet.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
