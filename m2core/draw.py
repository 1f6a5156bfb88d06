"""Skeleton drawing shared by the contact sheet, the service's GIFs and evaluation.

`draw_skeleton` draws the 13 Penn Action joints over a copy of an image: bones from
`SKELETON_EDGES`, the person's left side in one colour, the right in another, the
centre (head-shoulders, shoulders, hips) in a third, each bone with a dark edge so it
reads on any background. Invisible joints (and bones touching them) are skipped.
`skeleton_canvas` draws on a blank canvas, optionally from [0, 1] frame units.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from m2core.modalities import JOINT_NAMES, NUM_JOINTS, SKELETON_EDGES

Color = tuple[int, int, int]
LEFT_COLOR: Color = (255, 140, 0)  # orange: the person's left
RIGHT_COLOR: Color = (0, 170, 255)  # blue: the person's right
CENTER_COLOR: Color = (255, 230, 0)
EDGE_COLOR: Color = (20, 20, 20)


def _side(j: int) -> str:
    name = JOINT_NAMES[j]
    return "l" if name.startswith("l_") else "r" if name.startswith("r_") else "c"


def _as_joints(joints: np.ndarray | Sequence) -> np.ndarray:
    """(13, 3) float array: x, y, visible (a (13, 2) input is all visible; NaN -> invisible)."""
    arr = np.asarray(joints, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != NUM_JOINTS or arr.shape[1] not in (2, 3):
        raise ValueError(
            f"joints must have shape ({NUM_JOINTS}, 3) or ({NUM_JOINTS}, 2), got {arr.shape}"
        )
    if arr.shape[1] == 2:
        arr = np.concatenate([arr, np.ones((NUM_JOINTS, 1))], axis=1)
    arr = arr.copy()
    arr[~np.isfinite(arr[:, :2]).all(axis=1), 2] = 0.0
    return arr


def draw_skeleton(
    img: Image.Image,
    joints: np.ndarray | Sequence,
    color: Color | None = None,
    width: int | None = None,
    radius: float | None = None,
) -> Image.Image:
    """A copy of `img` (converted to RGB) with the skeleton drawn over it.

    joints: (13, 3) in that image's pixels + visible flag (> 0.5 means visible), or (13, 2).
    color: one colour for the whole skeleton (e.g. to tell prediction from truth); None
    colours the left side, right side and centre differently. width / radius default to
    sizes that scale with the image.
    """
    out = img.convert("RGB")  # always a copy
    pts = _as_joints(joints)
    scale = max(1.0, min(out.size) / 256.0)
    width = int(width if width is not None else max(2, round(2.5 * scale)))
    radius = float(radius if radius is not None else max(2.0, 1.3 * width))
    if width < 1 or radius <= 0:
        raise ValueError(f"width must be >= 1 and radius > 0, got {width}, {radius}")
    draw = ImageDraw.Draw(out)
    visible = pts[:, 2] > 0.5
    palette = {"l": LEFT_COLOR, "r": RIGHT_COLOR, "c": CENTER_COLOR}

    def col(*js: int) -> Color:
        if color is not None:
            return tuple(color)  # type: ignore[return-value]
        sides = {_side(j) for j in js}
        return palette[sides.pop()] if len(sides) == 1 else CENTER_COLOR

    bones = [(a, b) for a, b in SKELETON_EDGES if visible[a] and visible[b]]
    for a, b in bones:  # dark edges first, so every bone has an outline
        draw.line([tuple(pts[a, :2]), tuple(pts[b, :2])], fill=EDGE_COLOR, width=width + 2)
    for a, b in bones:
        draw.line([tuple(pts[a, :2]), tuple(pts[b, :2])], fill=col(a, b), width=width)
    for j in np.flatnonzero(visible):
        x, y = pts[j, :2]
        draw.ellipse(
            (x - radius, y - radius, x + radius, y + radius), fill=col(j), outline=EDGE_COLOR
        )
    return out


def skeleton_canvas(
    size: tuple[int, int] = (256, 256),
    joints: np.ndarray | Sequence | None = None,
    *,
    normalized: bool = False,
    background: Color = (255, 255, 255),
    **draw_kwargs,
) -> Image.Image:
    """A blank (width, height) RGB canvas, with a skeleton drawn on it if `joints` is given.

    normalized: joints are in [0, 1] frame units (x * width, y * height) instead of pixels.
    Extra keyword arguments go to `draw_skeleton` (color, width, radius).
    """
    w, h = int(size[0]), int(size[1])
    if w < 1 or h < 1:
        raise ValueError(f"canvas size must be positive, got {size}")
    canvas = Image.new("RGB", (w, h), tuple(background))
    if joints is None:
        return canvas
    pts = _as_joints(joints)
    if normalized:
        pts[:, 0] *= w
        pts[:, 1] *= h
    return draw_skeleton(canvas, pts, **draw_kwargs)
