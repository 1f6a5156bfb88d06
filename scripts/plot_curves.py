"""Plot a training run's curves from logs/metrics.jsonl into a PNG, with Pillow only.

    python scripts/plot_curves.py RUN_DIR_OR_JSONL --out curves.png [--smooth N]

Panels, top to bottom: training loss and per-modality training CE (moving average, raw loss
in grey behind), validation CE per modality, and the learning rate, all against tokens seen
in millions; CE axes are logarithmic. Validation lines carry only a step, so their tokens
come from the training lines' tokens per step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

MODALITIES = ("tok_rgb", "coords", "captions", "tok_rgb_next", "coords_next", "mean")
RGB = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
COLOR = dict(zip(MODALITIES, RGB, strict=True)) | {"action": (23, 190, 207)}  # the action head's CE
Color = tuple[int, int, int]
Series = tuple[str, Color, list[float], list[float]]  # legend name, colour, xs, ys
Panel = tuple[str, str, list[Series], bool]  # title, y label, series, log scale
W, PANEL_H, TOP, LEFT, RIGHT = 1300, 330, 50, 80, 190


def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def read_rows(path: Path) -> list[dict]:
    """JSON objects with a step; a half-written last line (the run may be live) is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int | float)]


def smooth(ys: list[float], window: int) -> list[float]:
    """Centred moving average; the window shrinks near the ends."""
    spans = (ys[max(0, i - window // 2) : i + window // 2 + 1] for i in range(len(ys)))
    return [sum(span) / len(span) for span in spans]


def ticks(lo: float, hi: float, log: bool) -> list[float]:
    """About five round values in [lo, hi]: 1-2-3-5 per decade on a log axis spanning decades."""
    if log:
        decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        out = [m * 10.0**d for d in decades for m in (1, 2, 3, 5) if lo <= m * 10.0**d <= hi]
        if len(out) >= 3:
            return out
    raw = (hi - lo) / 5 or 1.0
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10)), key=lambda s: abs(s - raw))
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def panel(img: Image.Image, y0: int, spec: Panel, xr: tuple[float, float], xlabel: str) -> None:
    """One framed plot with grid, tick labels, axis labels and a legend to its right."""
    title, ylabel, series, log = spec
    draw, small, bold = ImageDraw.Draw(img), font(13), font(15, bold=True)
    x0, x1, top, bot = LEFT, W - RIGHT, y0 + 28, y0 + PANEL_H - 50
    draw.text((x0, y0 + 4), title, fill="black", font=bold)
    draw.rectangle((x0, top, x1, bot), outline="black")
    series = [s for s in series if s[3] and (min(s[3]) > 0 or not log)]
    if not series:
        draw.text((x0 + 20, top + 20), "no data yet", fill="gray", font=bold)
        return
    ymin, ymax = min(min(s[3]) for s in series), max(max(s[3]) for s in series)
    f = math.log10 if log else float  # linear axes (the learning rate) start at 0
    ymin, ymax = (ymin / 1.04 if log else min(ymin, 0.0)), (ymax * 1.05 or 1.0)

    def sx(x: float) -> float:
        return x0 + (x - xr[0]) / (xr[1] - xr[0]) * (x1 - x0)

    def sy(y: float) -> float:
        return bot - (f(y) - f(ymin)) / (f(ymax) - f(ymin)) * (bot - top)

    yticks = ticks(ymin, ymax, log)
    big = max((abs(t) for t in yticks), default=1.0)
    scale = 10.0 ** math.floor(math.log10(big)) if 0 < big < 0.01 else 1.0  # lr: units of 1e-4
    for t in yticks:
        draw.line((x0, sy(t), x1, sy(t)), fill=(228, 228, 228))
        draw.text((x0 - 6, sy(t)), f"{t / scale:g}", fill="black", font=small, anchor="rm")
    for t in ticks(*xr, log=False):
        draw.line((sx(t), top, sx(t), bot), fill=(236, 236, 236))
        draw.text((sx(t), bot + 5), f"{t:g}", fill="black", font=small, anchor="ma")
    draw.rectangle((x0, top, x1, bot), outline="black")
    draw.text(((x0 + x1) / 2, bot + 24), xlabel, fill="black", font=small, anchor="ma")
    label = ylabel + (f" (x {scale:.0e})" if scale != 1 else "") + (", log scale" if log else "")
    tile = Image.new("RGB", (int(draw.textlength(label, font=small)) + 4, 18), "white")
    ImageDraw.Draw(tile).text((2, 1), label, fill="black", font=small)
    tile = tile.rotate(90, expand=True)
    img.paste(tile, (8, (top + bot - tile.height) // 2))
    for i, (name, color, xs, ys) in enumerate(series):
        pts = [(sx(x), sy(y)) for x, y in zip(xs, ys, strict=True)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=1 if name.startswith("raw") else 2, joint="curve")
        for px, py in pts if len(pts) < 40 else []:  # few points: mark each one
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
        draw.line((x1 + 14, top + 14 + 20 * i, x1 + 38, top + 14 + 20 * i), fill=color, width=3)
        draw.text((x1 + 44, top + 6 + 20 * i), name, fill="black", font=small)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="run directory (reads logs/metrics.jsonl) or a .jsonl")
    ap.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG to write")
    ap.add_argument("--smooth", type=int, default=0, help="moving-average window (0: auto)")
    args = ap.parse_args(argv)
    path = args.run if args.run.is_file() else args.run / "logs" / "metrics.jsonl"
    if not path.is_file():
        print(f"plot_curves: no metrics file at {path}", file=sys.stderr)
        return 2
    rows = read_rows(path)
    train = [r for r in rows if isinstance(r.get("train/loss"), int | float)]
    if not train:
        print(f"plot_curves: no training data in {path}", file=sys.stderr)
        return 2
    val = [r for r in rows if any(k.startswith("val/") for k in r)]
    per_step = next((r["tokens"] / r["step"] for r in train[::-1] if r.get("tokens")), 0.0)
    xlabel = "tokens (millions)" if per_step else "step"

    def x(r: dict) -> float:
        return r["step"] * per_step / 1e6 if per_step else r["step"]

    def curve(rs: list[dict], key: str, name: str, color: Color, window: int = 1) -> Series:
        rs = [r for r in rs if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        return name, color, [x(r) for r in rs], smooth([r[key] for r in rs], window)

    win = max(1, args.smooth or len(train) // 50)
    trains = [curve(train, "train/loss", "raw loss", (200, 200, 200))] if win > 1 else []
    trains += [curve(train, "train/loss", "loss", (0, 0, 0), win)]
    trains += [curve(train, f"train/ce_{m}", m, COLOR[m], win) for m in (*MODALITIES[:5], "action")]
    smoothed = f" (moving average over {win} lines)" if win > 1 else ""
    vals = [curve(val, f"val/ce_{m}", m, COLOR[m]) for m in (*MODALITIES, "action")]
    panels: list[Panel] = [
        ("Training loss and CE per modality" + smoothed, "CE", trains, True),
        ("Validation CE per modality", "CE", vals, True),
        ("Learning rate", "learning rate", [curve(train, "lr", "lr", RGB[0])], False),
    ]
    xs = [x(r) for r in train + val]
    lo = 0.0 if 0 <= min(xs) < 0.2 * max(xs) else min(xs)  # start at 0 unless that wastes room
    xr = (lo, max(xs) if max(xs) > lo else lo + 1.0)
    last, name = train[-1], path.parent.parent.name if path.parent.name == "logs" else path.stem
    head = f"{name}: step {last['step']}" + (f", {x(last):.2f}M tokens" if per_step else "")
    head += f", train loss {last['train/loss']:.3f}"
    if val and isinstance(val[-1].get("val/ce_mean"), float):
        head += f", val CE mean {val[-1]['val/ce_mean']:.3f}"
    img = Image.new("RGB", (W, TOP + len(panels) * PANEL_H), "white")
    ImageDraw.Draw(img).text((W / 2, 14), head, fill="black", font=font(20, bold=True), anchor="ma")
    for i, spec in enumerate(panels):
        panel(img, TOP + i * PANEL_H, spec, xr, xlabel)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"wrote {args.out}: {len(train)} training lines, {len(val)} validation lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
