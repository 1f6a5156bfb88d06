"""Images in, 256x256 letterboxed frames out, and joint coordinates mapped both ways.

Every image M2 sees passes through here: `load_image` decodes anything Pillow can read
(EXIF orientation applied, any mode made RGB), `letterbox` scales the longer side to
`FRAME_SIZE`, centres it and pads with black, and the returned `Letterbox` maps joint
coordinates between the original picture and the frame.

Coordinate conventions (one for each space, used everywhere in M2):

- Original-image pixels use the *pixel-centre* convention: the pixel in column i,
  row j has its centre at (x, y) = (i, j) and covers [i - 0.5, i + 0.5) x
  [j - 0.5, j + 0.5). That is what PIL's drawing calls and array indices assume, so a
  joint drawn at (x, y) lights up pixel (round(x), round(y)).
- Frame units are continuous over the letterboxed frame: 0 is the left (top) edge of
  frame pixel 0 and 1 the right (bottom) edge of the last frame pixel, so frame pixel k
  spans [k / size, (k + 1) / size). Pose tokens bin these units.

The map is one uniform scale plus an offset per axis (`to_frame`, `to_image` are exact
inverses up to float rounding), and the resampling uses exactly that scale and offset,
so the pixels of the frame agree with the map to a fraction of a frame pixel.

Untrusted bytes: `probe_image` reads only the header, so a decompression bomb is refused
before anything is decoded; `load_image` does the same check before decoding. Pillow's
own global limit (`Image.MAX_IMAGE_PIXELS`) is left untouched: our `max_pixels` is
checked explicitly and Pillow's bomb warning is silenced only around our own open call.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from m2core.modalities import FRAME_SIZE

# Large enough for any camera photo (8k x 6k = 48 MP), small enough that one decoded RGB
# image stays under ~200 MB.
DEFAULT_MAX_PIXELS = 64_000_000
# Formats accepted from files and bytes. Deliberately short: no EPS (which would run
# Ghostscript), no exotic plugins an upload could aim at. "JPEG" also opens MPO
# (multi-picture JPEGs from phones).
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")

ImageSource = str | Path | bytes | bytearray | memoryview | Image.Image


class ImageError(ValueError):
    """An image that cannot be used; the message says why."""


class NotAnImage(ImageError):
    """The data is not an image of a supported format."""


class CorruptImage(ImageError):
    """The header looked like an image but the pixel data is damaged or truncated."""


class ImageTooLarge(ImageError):
    """The image has more pixels than allowed (refused before decoding)."""


def check_image_size(width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Raise `ImageTooLarge` (or `CorruptImage` for empty sizes) unless w x h is allowed."""
    if width <= 0 or height <= 0:
        raise CorruptImage(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height:,} pixels, more than the "
            f"{max_pixels:,} allowed"
        )


def _sniff(data: bytes) -> str | None:
    """The allowed format whose signature `data` starts with (Pillow's own checks), if any."""
    Image.init()
    for fmt in ALLOWED_FORMATS:
        accept = Image.OPEN.get(fmt, (None, None))[1]
        if accept is not None and accept(data[:16]):
            return fmt
    return None


def _open(data: bytes, max_pixels: int, what: str) -> Image.Image:
    """Lazily open (header only) with our size check; map Pillow's errors to ours."""
    if not data:
        raise NotAnImage(f"{what} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below is the guard; Pillow's warning is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(
            f"{what} has more than the {max_pixels:,} pixels allowed ({e})"
        ) from None
    except UnidentifiedImageError:
        looks_like = _sniff(data)
        if looks_like:
            raise CorruptImage(
                f"{what} looks like {looks_like} but its header is damaged"
            ) from None
        raise NotAnImage(
            f"{what} is not an image in a supported format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise CorruptImage(f"{what} has a damaged header: {e}") from None
    check_image_size(img.width, img.height, max_pixels)
    return img


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, int, int, int]:
    """(format, width, height, n_frames) from the header alone; nothing is decoded.

    Raises `NotAnImage`, `CorruptImage` or `ImageTooLarge`. The size is that of the stored
    picture (before any EXIF rotation).
    """
    img = _open(bytes(data), max_pixels, "upload")
    try:
        n_frames = int(getattr(img, "n_frames", 1))
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise CorruptImage(f"upload has damaged frames: {e}") from None
    finally:
        img.close()
    return str(img.format), img.width, img.height, n_frames


def _to_8bit(arr: np.ndarray, mode: str) -> np.ndarray:
    """uint8 grey levels from a 16/32-bit integer or float single-channel array.

    I;16*: fixed /257 (65535 -> 255). I (32-bit): 8-bit range if it fits, else 16-bit.
    F: [0, 1] if it fits, else like I. Out-of-range values clip.
    """
    a = arr.astype(np.float64)
    hi = float(np.nanmax(a)) if a.size else 0.0
    if mode.startswith("I;16"):
        a = a / 257.0
    elif mode == "F" and hi <= 1.0:
        a = a * 255.0
    elif hi > 255.0:
        a = a / 257.0
    return np.clip(np.nan_to_num(np.rint(a)), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as RGB: alpha composited on black, high bit depths scaled to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_8bit(np.asarray(img), mode), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        if mode == "La":  # premultiplied: already composited on black
            return img.getchannel("L").convert("RGB")
        if mode == "RGBa":
            return img.convert("RGB")
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ImageError(f"cannot convert image mode {mode!r} to RGB: {e}") from None


def load_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a path, bytes or PIL image to an RGB PIL image with EXIF orientation applied.

    Multi-frame files (GIF, APNG, TIFF) give their first frame. Raises
    `FileNotFoundError` for a missing path, and `ImageError` subclasses (`NotAnImage`,
    `CorruptImage`, `ImageTooLarge`) for data that cannot be used.
    """
    if isinstance(src, Image.Image):
        img, what = src, "image"
        check_image_size(img.width, img.height, max_pixels)
    elif isinstance(src, str | Path):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        img, what = _open(path.read_bytes(), max_pixels, str(path)), str(path)
    elif isinstance(src, bytes | bytearray | memoryview):
        img, what = _open(bytes(src), max_pixels, "image data"), "image data"
    else:
        raise TypeError(f"load_image takes a path, bytes or PIL image, not {type(src).__name__}")
    try:
        img.load()
        oriented = ImageOps.exif_transpose(img)
        rgb = to_rgb(oriented)
        if rgb is img:  # never hand back (or later mutate) the caller's object
            rgb = rgb.copy()
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{what}: {e}") from None
    except ImageError:
        raise
    except Exception as e:  # untrusted data through Pillow's decoders: any failure is the data's
        raise CorruptImage(f"{what} could not be decoded (damaged or truncated): {e}") from None
    check_image_size(rgb.width, rgb.height, max_pixels)
    return rgb


@dataclass(frozen=True)
class Letterbox:
    """The map between an original image and its letterboxed square frame.

    frame_pixel = (image_xy + 0.5) * scale + pad   (frame pixels, continuous)
    frame_units = frame_pixel / size               ([0, 1] over the frame)

    `pad_x`, `pad_y` are where the image's left / top edge lands in the frame, in
    (fractional) frame pixels. See the module docstring for the conventions.
    """

    src_w: int
    src_h: int
    scale: float
    pad_x: float
    pad_y: float
    size: int = FRAME_SIZE

    @classmethod
    def fit(cls, src_w: int, src_h: int, size: int = FRAME_SIZE) -> Letterbox:
        """Longer side to `size`, centred."""
        if src_w <= 0 or src_h <= 0 or size <= 0:
            raise ValueError(f"letterbox needs positive sizes, got {src_w}x{src_h} -> {size}")
        scale = size / max(src_w, src_h)
        return cls(
            src_w, src_h, scale, (size - src_w * scale) / 2, (size - src_h * scale) / 2, size
        )

    def _pad(self) -> np.ndarray:
        return np.array([self.pad_x, self.pad_y], dtype=np.float64)

    @staticmethod
    def _check(xy: np.ndarray, what: str) -> np.ndarray:
        arr = np.asarray(xy, dtype=np.float64)
        if arr.ndim == 0 or arr.shape[-1] != 2:
            raise ValueError(f"{what} must have shape (..., 2) (x, y), got {arr.shape}")
        return arr

    def to_frame(self, xy: np.ndarray) -> np.ndarray:
        """Original-image pixels (pixel-centre convention) -> frame units ([0, 1] inside)."""
        arr = self._check(xy, "image coordinates")
        return ((arr + 0.5) * self.scale + self._pad()) / self.size

    def to_image(self, xy: np.ndarray) -> np.ndarray:
        """Frame units -> original-image pixels (pixel-centre convention)."""
        arr = self._check(xy, "frame coordinates")
        return (arr * self.size - self._pad()) / self.scale - 0.5

    def content_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1): the frame pixels fully covered by the image (at least 1x1)."""
        eps = 1e-6
        out = []
        for pad, extent in (
            (self.pad_x, self.src_w * self.scale),
            (self.pad_y, self.src_h * self.scale),
        ):
            lo, hi = math.ceil(pad - eps), math.floor(pad + extent + eps)
            if hi <= lo:  # a sliver thinner than one frame pixel still gets one pixel
                lo = min(max(math.floor(pad + extent / 2), 0), self.size - 1)
                hi = lo + 1
            out.append((lo, hi))
        (x0, x1), (y0, y1) = out
        return x0, y0, x1, y1


def letterbox(img: Image.Image, size: int = FRAME_SIZE) -> tuple[np.ndarray, Letterbox]:
    """uint8 (size, size, 3) RGB frame of `img` (longer side scaled to `size`, centred,
    black padding) and the `Letterbox` that maps coordinates between the two.

    Only frame pixels the image covers completely are filled, resampled with exactly the
    `Letterbox` map (so nothing is stretched to whole pixels); the at most one partly
    covered row or column at each end of the shorter side stays black.

    `img` may be in any mode (see `to_rgb`); EXIF orientation is NOT applied here
    (`load_image` does that), so coordinates refer to `img` exactly as given.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"letterbox takes a PIL image, not {type(img).__name__}")
    rgb = to_rgb(img)
    lb = Letterbox.fit(rgb.width, rgb.height, size)
    x0, y0, x1, y1 = lb.content_box()
    # The source region that lands exactly on frame pixels [x0, x1) x [y0, y1) under the
    # map above (continuous source coords: left edge of pixel 0 is 0).
    box = [(x0 - lb.pad_x) / lb.scale, (y0 - lb.pad_y) / lb.scale,
           (x1 - lb.pad_x) / lb.scale, (y1 - lb.pad_y) / lb.scale]  # fmt: skip
    box = [min(max(v, 0.0), lim) for v, lim in zip(box, (rgb.width, rgb.height) * 2, strict=True)]
    if box[2] <= box[0] or box[3] <= box[1]:
        box = [0.0, 0.0, float(rgb.width), float(rgb.height)]
    content = rgb.resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC, box=tuple(box))
    frame = np.zeros((size, size, 3), dtype=np.uint8)
    frame[y0:y1, x0:x1] = np.asarray(content, dtype=np.uint8)
    return frame, lb
