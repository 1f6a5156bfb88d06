"""The seed's GIF pair, `pose_future_original.gif` and `pose_future_predicted.gif`, and
(format 2) `steering.gif`.

Each GIF has 7 frames (the skeleton now, then the six future skeletons) with a few
validation clips side by side, drawn over the decoded key frame (dimmed) so the motion
reads against the picture. Frame 0 is the true current skeleton in both files; after it,
one shows the ground truth and the other the model's forecast, in the same colours.
`steering.gif` shows each sample twice, forecast under its true action and under another
one, with the action named on the panel.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from m2core.modalities import FRAME_SIZE

NOW_COLOR = (255, 255, 255)
FUTURE_COLOR = (255, 160, 40)
FRAME_MS = 250


def pick_samples(clips: np.ndarray, count: int) -> list[int]:
    """Indices of up to `count` samples, each from a different clip."""
    seen: set[int] = set()
    out = []
    for i, c in enumerate(np.asarray(clips).tolist()):
        if c not in seen:
            seen.add(c)
            out.append(i)
        if len(out) == count:
            break
    return out


def _background(image_tokenizer: Any, tok_rgb: np.ndarray) -> list[Image.Image]:
    if image_tokenizer is None:
        return [Image.new("RGB", (FRAME_SIZE, FRAME_SIZE)) for _ in range(len(tok_rgb))]
    frames = image_tokenizer.decode(np.asarray(tok_rgb, np.int64).reshape(-1, 16, 16)).cpu().numpy()
    return [Image.fromarray((f * 0.5).astype(np.uint8)) for f in frames]


def _panel(bg: Image.Image, joints: np.ndarray, color: tuple[int, int, int]) -> Image.Image:
    from m2core.draw import draw_skeleton

    px = joints.copy()
    px[:, :2] = px[:, :2] * FRAME_SIZE  # frame units -> frame pixels
    return draw_skeleton(bg, px, color=color, width=3)


def render(
    backgrounds: list[Image.Image],
    now: np.ndarray,
    future: np.ndarray,
    labels: list[str] | None = None,
) -> list[Image.Image]:
    """7 frames, the samples tiled left to right. now (n, 13, 3), future (n, 6, 13, 3);
    `labels`: a line of text written on each panel. Each panel names its step ("now",
    "+1".."+6"), which also keeps Pillow from merging frames where nothing moves."""
    frames = []
    for k in range(future.shape[1] + 1):
        strip = Image.new("RGB", (FRAME_SIZE * len(backgrounds), FRAME_SIZE))
        for j, bg in enumerate(backgrounds):
            pose, color = (now[j], NOW_COLOR) if k == 0 else (future[j, k - 1], FUTURE_COLOR)
            strip.paste(_panel(bg, pose, color), (FRAME_SIZE * j, 0))
        draw = ImageDraw.Draw(strip)
        for j in range(len(backgrounds)):
            draw.text(
                (FRAME_SIZE * j + 6, FRAME_SIZE - 16), f"+{k}" if k else "now", fill=NOW_COLOR
            )
            if labels:
                draw.text((FRAME_SIZE * j + 6, 4), labels[j], fill=NOW_COLOR)
        frames.append(strip)
    return frames


def save_gif(path: Path, frames: list[Image.Image]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.gif")
    frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=FRAME_MS, loop=0)
    os.replace(tmp, path)


def write_gif_pair(out: Path, image_tokenizer: Any, arrays: dict[str, np.ndarray], rows: np.ndarray,
                   gt_now: np.ndarray, gt_next: np.ndarray, pred_next: np.ndarray, count: int) -> list[Path]:  # fmt: skip
    """Write the pair into `out` for up to `count` samples from different clips."""
    idx = pick_samples(np.asarray(arrays["clip"][rows]), count)
    if not idx:
        return []
    bgs = _background(image_tokenizer, np.asarray(arrays["tok_rgb"][rows[idx]]))
    paths = [out / "pose_future_original.gif", out / "pose_future_predicted.gif"]
    save_gif(paths[0], render(bgs, gt_now[idx], gt_next[idx]))
    save_gif(paths[1], render(bgs, gt_now[idx], pred_next[idx]))
    return paths


def write_steering_gif(out: Path, image_tokenizer: Any, arrays: dict[str, np.ndarray],
                       rows: np.ndarray, now: np.ndarray, forecasts: tuple[np.ndarray, np.ndarray],
                       names: tuple[list[str], list[str]], count: int) -> Path | None:  # fmt: skip
    """`steering.gif`: up to `count` samples from different clips, each as two panels side
    by side, the forecast under `names[0]` (left) and under `names[1]` (right), both from
    the same frame and skeleton `now`. forecasts: two (n, 6, 13, 3); names: per row."""
    idx = pick_samples(np.asarray(arrays["clip"][rows]), count)
    if not idx:
        return None
    bgs = _background(image_tokenizer, np.asarray(arrays["tok_rgb"][rows[idx]]))
    pair = [i for i in idx for _ in range(2)]
    future = np.stack([forecasts[k % 2][i] for k, i in enumerate(pair)])
    labels = [f"action: {names[k % 2][i].replace('_', ' ')}" for k, i in enumerate(pair)]
    path = out / "steering.gif"
    save_gif(path, render([bg for bg in bgs for _ in range(2)], now[pair], future, labels))
    return path
