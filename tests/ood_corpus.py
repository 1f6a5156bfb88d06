"""Frames unlike the synthetic training clips, built at test time from what installed
packages ship (scikit-image's sample photos) and from PIL drawing: real photos (people,
animals, objects, scenes), blank and solid images, noise, a screenshot, a gradient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# scikit-image's bundled sample images (its data folder ships them in the wheel)
PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "chessboard_RGB.png",
    "clock_motion.png", "coffee.png", "coins.png", "color.png", "grass.png", "gravel.png",
    "horse.png", "hubble_deep_field.jpg", "ihc.png", "logo.png", "microaneurysms.png",
    "moon.png", "motorcycle_left.png", "page.png", "phantom.png", "retina.jpg", "rocket.jpg",
    "text.png",
)  # fmt: skip


def photo_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def photos() -> list[tuple[str, Image.Image]]:
    return [(name, Image.open(photo_dir() / name).convert("RGB")) for name in PHOTOS]


def drawn(seed: int = 0) -> list[tuple[str, Image.Image]]:
    rng = np.random.default_rng(seed)
    out = [
        (f"solid {c}", Image.new("RGB", (320, 240), c))
        for c in ((0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 30, 30), (40, 90, 200))
    ]
    out.append(("uniform noise", Image.fromarray(rng.integers(0, 256, (240, 320, 3), np.uint8))))
    gauss = rng.normal(128, 20, (240, 320, 3)).clip(0, 255).astype(np.uint8)
    out.append(("gaussian noise", Image.fromarray(gauss)))
    ramp = np.linspace(0, 255, 320, dtype=np.float32)[None, :, None].repeat(240, 0).repeat(3, 2)
    out.append(("gradient", Image.fromarray(ramp.astype(np.uint8))))
    shot = Image.new("RGB", (640, 400), (245, 245, 245))
    d = ImageDraw.Draw(shot)
    d.rectangle((0, 0, 640, 28), fill=(50, 60, 80))
    d.rectangle((0, 28, 140, 400), fill=(225, 228, 235))
    for row in range(14):
        d.text(
            (160, 44 + 24 * row),
            f"line {row}: def predict(frame, steps=6) -> Prediction",
            fill=(20, 20, 20),
        )
    out.append(("screenshot", shot))
    return out


def corpus() -> list[tuple[str, Image.Image]]:
    """(name, RGB image) for every out-of-domain frame: the photos, then the drawn ones."""
    return photos() + drawn()
