"""Pictures the service returns: the roll-out GIF, the next-frame PNG, the warm-up frame.

The GIF shows 7 frames per roll-out step (the skeleton now, then the six predicted),
drawn over the uploaded frame (or a plain canvas), optionally beside the decoded
predicted key frame of that step. Where the checkpoint gives per-joint confidence
(format 2), a joint below LOW_CONFIDENCE is drawn as a hollow ring with thin, faded
bones. It is rendered on first request and cached in the store, at most `gif_max_side`
pixels on its longer side whatever the upload's size.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from m2core.draw import CENTER_COLOR, EDGE_COLOR, LEFT_COLOR, RIGHT_COLOR, draw_skeleton
from m2core.geometry import Letterbox
from m2core.modalities import JOINT_NAMES, SKELETON_EDGES
from service.schemas import LOW_CONFIDENCE
from service.store import Prediction

CANVAS_COLOR = (28, 30, 36)
SKELETON_COLORS = (LEFT_COLOR, RIGHT_COLOR, CENTER_COLOR)


def _faded(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """Half way to grey: the colour of a bone that touches an uncertain joint."""
    return tuple((c + 128) // 2 for c in color)  # type: ignore[return-value]


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(img: Image.Image, quality: int = 88) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_background(img: Image.Image, max_side: int) -> tuple[bytes, float]:
    """The upload shrunk to `max_side` (never enlarged) as JPEG, and its scale."""
    scale = min(1.0, max_side / max(img.width, img.height))
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    small = img if (w, h) == img.size else img.resize((w, h), Image.Resampling.LANCZOS)
    # The exact per-axis scale of the rounded size is ~scale; one number keeps it simple.
    return encode_jpeg(small), w / img.width


def content_crop(frame: np.ndarray, box: Letterbox) -> np.ndarray:
    """The part of a letterboxed frame that shows the picture (padding cut away)."""
    x0, y0, x1, y1 = box.content_box()
    return frame[y0:y1, x0:x1]


def _to_thumb(joints: np.ndarray, scale: float) -> np.ndarray:
    """Upload pixels -> thumbnail pixels (pixel-centre convention), visibility kept."""
    out = np.array(joints, dtype=np.float64, copy=True)
    out[..., :2] = (out[..., :2] + 0.5) * scale - 0.5
    return out


def _joint_color(*js: int) -> tuple[int, int, int]:
    """m2core.draw's palette: the person's left, right, or the centre (mixed bones too)."""
    sides = {JOINT_NAMES[j][:2] for j in js}
    side = sides.pop() if len(sides) == 1 else ""
    return {"l_": LEFT_COLOR, "r_": RIGHT_COLOR}.get(side, CENTER_COLOR)


def draw_pose(
    img: Image.Image, joints: np.ndarray, confidence: np.ndarray | None = None
) -> Image.Image:
    """A copy of `img` with the skeleton drawn (m2core.draw's style).

    With `confidence` (13,), a joint below LOW_CONFIDENCE is an uncertain one: a hollow
    ring instead of a filled dot, and its bones thinner, in faded colours, stopping at the
    ring. Without it (format-1 checkpoints) this is m2core.draw.draw_skeleton."""
    if confidence is None:
        return draw_skeleton(img, joints)
    pts = np.asarray(joints, dtype=np.float64)
    visible = (pts[:, 2] > 0.5) & np.isfinite(pts[:, :2]).all(axis=1)
    sure = np.asarray(confidence, dtype=np.float64) >= LOW_CONFIDENCE
    width = max(2, round(2.5 * max(1.0, min(img.size) / 256.0)))  # draw_skeleton's sizes
    radius = max(2.0, 1.3 * width)
    out = img.convert("RGB")
    draw = ImageDraw.Draw(out)
    ring = radius + 1  # a little larger than a dot, so the hole shows
    for a, b in SKELETON_EDGES:
        if not (visible[a] and visible[b]) or (sure[a] and sure[b]):
            continue
        p, q = pts[a, :2], pts[b, :2]
        length = float(np.hypot(*(q - p)))
        u = (q - p) / length if length > 0 else np.zeros(2)
        p = p if sure[a] else p + u * ring  # stop at an uncertain joint's ring
        q = q if sure[b] else q - u * ring
        if np.dot(q - p, u) > 0:
            draw.line(
                [tuple(p), tuple(q)], fill=_faded(_joint_color(a, b)), width=max(1, width // 2)
            )
    for j in np.flatnonzero(visible & ~sure):
        x, y = pts[j, :2]
        draw.ellipse((x - ring - 1, y - ring - 1, x + ring + 1, y + ring + 1), outline=EDGE_COLOR)
        draw.ellipse(
            (x - ring, y - ring, x + ring, y + ring),
            outline=_joint_color(j),
            width=max(1, width - 1),
        )
    # the sure part on top: bones between sure joints, filled dots
    return draw_skeleton(out, np.where((visible & sure)[:, None], pts, [[0.0, 0.0, 0.0]]),
                         width=width, radius=radius)  # fmt: skip


def _label(img: Image.Image, text: str) -> None:
    draw = ImageDraw.Draw(img)
    x, y = 4, 4
    box = draw.textbbox((x, y), text)
    draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
    draw.text((x, y), text, fill=(255, 255, 255))


def _shared_palette(pictures: list[Image.Image]) -> Image.Image:
    """One 256-colour palette for every frame: the backgrounds plus the skeleton colours.

    Quantising all frames to one palette (no dithering) is ~20x faster than Pillow's
    per-frame adaptive palettes and lets the GIF store only what changes between frames.
    """
    colors = [
        *SKELETON_COLORS,
        *map(_faded, SKELETON_COLORS),
        EDGE_COLOR,
        (0, 0, 0),
        (255, 255, 255),
    ]
    width = sum(p.width for p in pictures)
    height = max(p.height for p in pictures)
    ref = Image.new("RGB", (width, height + 8))
    x = 0
    for p in pictures:
        ref.paste(p, (x, 0))
        x += p.width
    cell = max(1, width // len(colors))
    for i, c in enumerate(colors):
        ref.paste(c, (i * cell, height, (i + 1) * cell, height + 8))
    return ref.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def render_gif(
    pred: Prediction, overlay: bool = True, side_by_side: bool = False, frame_ms: int = 120
) -> bytes:
    """The animated GIF of a prediction: 7 frames per step, looping."""
    background = Image.open(io.BytesIO(pred.background_jpeg)).convert("RGB")
    if not overlay:
        background = Image.new("RGB", background.size, CANVAS_COLOR)
    steps = pred.coords_next.shape[0]
    panels: list[Image.Image | None] = [None] * steps
    if side_by_side:  # the decoded predicted key frame of each step, at the GIF's height
        for s in range(steps):
            key = Image.open(io.BytesIO(pred.next_frames_png[s])).convert("RGB")
            h = background.height
            panels[s] = key.resize((max(1, round(key.width * h / key.height)), h))
    palette = _shared_palette([background, *(p for p in panels if p is not None)])
    frames: list[Image.Image] = []
    conf = pred.confidence
    for s in range(steps):
        now = pred.coords if s == 0 else pred.coords_next[s - 1, -1]
        sure: list = [None] * (1 + pred.coords_next.shape[1])  # per frame's joints, or None
        if conf is not None:
            sure = [conf[0] if s == 0 else conf[1][s - 1, -1], *conf[1][s]]
        for k, joints in enumerate([now, *pred.coords_next[s]]):
            # Left side orange, right side blue (m2core.draw's palette), uncertain joints
            # hollow; the label says which frame is "now" and which are predicted.
            img = draw_pose(background, _to_thumb(joints, pred.thumb_scale), sure[k])
            label = "now" if k == 0 else f"+{k}"
            _label(img, f"step {s + 1}/{steps}  {label}" if steps > 1 else label)
            if panels[s] is not None:
                both = Image.new("RGB", (img.width + panels[s].width, img.height))
                both.paste(img, (0, 0))
                both.paste(panels[s], (img.width, 0))
                img = both
            frames.append(img.quantize(palette=palette, dither=Image.Dither.NONE))
    buf = io.BytesIO()
    frames[0].save(
        buf, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0
    )
    return buf.getvalue()


def warmup_png(width: int = 320, height: int = 240) -> bytes:
    """A small picture of a stick figure, drawn here so no binary asset is committed."""
    yy, xx = np.mgrid[0:height, 0:width]
    sky = np.stack([90 + 60 * yy / height, 120 + 40 * xx / width, 170 + 0 * xx], -1)
    img = Image.fromarray(sky.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, int(height * 0.8), width, height), fill=(70, 120, 60))  # ground
    cx, top, s = width / 2, height * 0.15, height / 240
    joints = np.array(
        [
            (cx, top + 15 * s),  # head
            (cx - 22 * s, top + 45 * s), (cx + 22 * s, top + 45 * s),  # shoulders
            (cx - 40 * s, top + 75 * s), (cx + 40 * s, top + 70 * s),  # elbows
            (cx - 50 * s, top + 105 * s), (cx + 55 * s, top + 50 * s),  # wrists
            (cx - 15 * s, top + 105 * s), (cx + 15 * s, top + 105 * s),  # hips
            (cx - 20 * s, top + 140 * s), (cx + 22 * s, top + 140 * s),  # knees
            (cx - 22 * s, top + 175 * s), (cx + 26 * s, top + 175 * s),  # ankles
        ]
    )  # fmt: skip
    for a, b in SKELETON_EDGES:
        draw.line([tuple(joints[a]), tuple(joints[b])], fill=(200, 60, 50), width=int(9 * s))
    r = 14 * s
    draw.ellipse((cx - r, top + 15 * s - r, cx + r, top + 15 * s + r), fill=(230, 190, 160))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
