"""Skeleton drawing: bones where the joints are, sides told apart, invisible joints skipped."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from m2core.draw import CENTER_COLOR, LEFT_COLOR, RIGHT_COLOR, draw_skeleton, skeleton_canvas


def _standing(w: int = 200, h: int = 200) -> np.ndarray:
    """A front-facing stick person (the person's left on the image's right), all visible."""
    xy = [(100, 30), (120, 60), (80, 60), (130, 95), (70, 95), (135, 130), (65, 130),
          (112, 120), (88, 120), (114, 160), (86, 160), (115, 190), (85, 190)]  # fmt: skip
    return np.c_[np.array(xy, float) * [w / 200, h / 200], np.ones(13)]


def _near(img: Image.Image, x: float, y: float, colour: tuple) -> bool:
    a = np.asarray(img)[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2].reshape(-1, 3)
    return bool((np.abs(a.astype(int) - colour).max(axis=1) < 30).any())


def test_sides_coloured_and_input_untouched() -> None:
    base = Image.new("RGB", (200, 200))
    out = draw_skeleton(base, _standing())
    assert np.asarray(base).max() == 0  # drew on a copy
    assert _near(out, 125, 77.5, LEFT_COLOR)  # middle of the left upper arm
    assert _near(out, 75, 77.5, RIGHT_COLOR)
    assert _near(out, 100, 60, CENTER_COLOR)  # shoulder line
    assert not _near(out, 100, 150, LEFT_COLOR) and np.asarray(out)[150, 100].max() == 0


def test_invisible_joints_and_their_bones_skipped() -> None:
    j = _standing()
    j[5, 2] = 0  # left wrist unseen
    out = draw_skeleton(Image.new("RGB", (200, 200)), j)
    assert np.asarray(out)[130, 135].max() == 0 and not _near(out, 132.5, 112.5, LEFT_COLOR)
    assert _near(out, 125, 77.5, LEFT_COLOR)  # the upper arm is still there


def test_single_colour_and_canvas_in_frame_units() -> None:
    j = _standing()
    canvas = skeleton_canvas((100, 50), np.c_[j[:, 0] / 200, j[:, 1] / 200, j[:, 2]], normalized=True,
                             color=(255, 0, 0), background=(0, 0, 0))  # fmt: skip
    assert canvas.size == (100, 50)
    assert _near(canvas, 62.5, 19.4, (255, 0, 0))  # left upper arm, scaled to 100x50
    assert skeleton_canvas().getpixel((5, 5)) == (255, 255, 255)


def test_bad_joints_rejected() -> None:
    with pytest.raises(ValueError, match=r"\(13, 3\)"):
        draw_skeleton(Image.new("RGB", (10, 10)), np.zeros((12, 3)))
    j = _standing()
    j[0, :2] = np.nan  # NaN coordinates are treated as not visible
    draw_skeleton(Image.new("RGB", (200, 200)), j)
