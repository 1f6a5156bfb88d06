"""Loading any image, letterboxing it, and mapping joints between image and frame."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from m2core.geometry import (
    CorruptImage,
    ImageError,
    ImageTooLarge,
    Letterbox,
    NotAnImage,
    letterbox,
    load_image,
    probe_image,
)

ODD_SIZES = [(1, 1), (3, 1000), (1000, 3), (641, 479), (479, 641), (256, 256), (300, 200), (2, 3)]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels but carries almost no data (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    assert len(xs), "mark not found"
    return np.array([xs.mean(), ys.mean()])


# --- letterbox ---------------------------------------------------------------------------


@pytest.mark.parametrize("w,h", ODD_SIZES)
def test_letterbox_fills_longer_side_centred_with_black_padding(w, h):
    frame, lb = letterbox(Image.new("RGB", (w, h), (255, 255, 255)))
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    assert (lb.src_w, lb.src_h, lb.size) == (w, h, 256)
    lit = frame.max(axis=2) > 0
    cols, rows = np.nonzero(lit.any(axis=0))[0], np.nonzero(lit.any(axis=1))[0]
    # the longer side spans the whole frame; the shorter is centred (within a pixel)
    if w >= h:
        assert (cols[0], cols[-1]) == (0, 255)
    if h >= w:
        assert (rows[0], rows[-1]) == (0, 255)
    # only frame pixels the image covers completely are filled (at most one partly covered
    # row/column at each end of the shorter side stays black); a sliver still gets one pixel
    for n, exp in ((len(cols), w * 256 / max(w, h)), (len(rows), h * 256 / max(w, h))):
        assert exp - 2 - 1e-9 <= n <= max(exp, 1) + 1e-9
    assert (
        abs((cols[0] + cols[-1] + 1) / 2 - 128) <= 1.0
        and abs((rows[0] + rows[-1] + 1) / 2 - 128) <= 1.0
    )
    # outside the content everything is black padding; inside it is the white image
    x0, y0, x1, y1 = lb.content_box()
    assert lit.sum() == (x1 - x0) * (y1 - y0)
    assert (frame[y0:y1, x0:x1] >= 250).all()


@pytest.mark.parametrize("w,h", ODD_SIZES)
def test_coordinate_round_trip_is_exact(w, h):
    lb = Letterbox.fit(w, h)
    rng = np.random.default_rng(w * 7919 + h)
    pts = np.concatenate(
        [
            rng.uniform(-0.5, [w - 0.5, h - 0.5], size=(200, 2)),
            [[-0.5, -0.5], [w - 0.5, h - 0.5], [0, 0]],
        ]
    )
    np.testing.assert_allclose(lb.to_image(lb.to_frame(pts)), pts, rtol=0, atol=1e-9 * max(w, h))
    u = rng.uniform(0, 1, size=(5, 7, 2))  # any leading shape
    np.testing.assert_allclose(lb.to_frame(lb.to_image(u)), u, rtol=0, atol=1e-12)
    # the image's outer edges land on the content edges; the longer side spans [0, 1]
    lo, hi = lb.to_frame(np.array([[-0.5, -0.5], [w - 0.5, h - 0.5]]))
    np.testing.assert_allclose(lo + hi, [1.0, 1.0], atol=1e-12)  # centred
    assert max(hi - lo) == pytest.approx(1.0)
    assert (hi - lo)[0] / (hi - lo)[1] == pytest.approx(w / h)


def test_coordinates_reject_wrong_shapes():
    lb = Letterbox.fit(10, 20)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        lb.to_frame(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="positive"):
        Letterbox.fit(0, 5)


@pytest.mark.parametrize("w,h", [(641, 479), (479, 641), (97, 300), (1200, 90)])
def test_a_mark_lands_where_the_map_says(w, h):
    arr = np.zeros((h, w, 3), np.uint8)
    mx, my, r = int(w * 0.7), int(h * 0.3), max(3, min(w, h) // 15)
    arr[my - r : my + r + 1, mx - r : mx + r + 1] = 255
    frame, lb = letterbox(Image.fromarray(arr))
    found = _centroid(frame.max(axis=2) > 127)  # frame pixel indices (centres)
    expected = lb.to_frame(np.array([mx, my], float)) * 256 - 0.5  # frame units -> pixel index
    np.testing.assert_allclose(found, expected, atol=0.6)
    # and back: the found frame position maps to the mark in the original image
    back = lb.to_image((found + 0.5) / 256)
    np.testing.assert_allclose(back, [mx, my], atol=0.6 / lb.scale)


# --- load_image: modes, EXIF, formats ------------------------------------------------------


def test_exif_rotated_jpeg_is_shown_upright_and_the_mark_follows():
    # Stored 200 wide x 100 high with a red mark near the top-left; EXIF orientation 6
    # means "rotate 90 degrees clockwise to display", so the photo is 100 x 200 upright and
    # stored pixel (x, y) is displayed at (H - 1 - y, x) with H = 100.
    stored = np.zeros((100, 200, 3), np.uint8)
    stored[10:21, 20:31] = (255, 0, 0)  # centre (25, 15)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95)
    img = load_image(data)
    assert img.mode == "RGB" and img.size == (100, 200)
    a = np.asarray(img).astype(int)
    red = (a[..., 0] > 150) & (a[..., 1] < 100) & (a[..., 2] < 100)
    np.testing.assert_allclose(_centroid(red), [100 - 1 - 15, 25], atol=0.6)
    # the letterboxed frame and the map agree on the rotated picture
    frame, lb = letterbox(img)
    f = frame.astype(int)
    red_f = (f[..., 0] > 150) & (f[..., 1] < 100) & (f[..., 2] < 100)
    expected = lb.to_frame(np.array([84.0, 25.0])) * 256 - 0.5
    np.testing.assert_allclose(_centroid(red_f), expected, atol=0.8)
    # loading the already-upright image again does not rotate it twice
    assert load_image(img).size == (100, 200)


def _mode_cases():
    """(name, image bytes or PIL image, expected RGB of pixel (0, 0))."""
    white = Image.new("RGB", (5, 4), (255, 255, 255))
    rgba = Image.new("RGBA", (5, 4), (255, 255, 255, 128))
    clear = Image.new("RGBA", (5, 4), (200, 10, 10, 0))
    pal = Image.new("P", (5, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 1
    i16 = Image.fromarray(np.full((4, 5), 257 * 100, np.uint16))
    assert i16.mode == "I;16"
    return [
        ("RGB", white, (255, 255, 255)),
        ("L", Image.new("L", (5, 4), 77), (77, 77, 77)),
        ("1", Image.new("1", (5, 4), 1), (255, 255, 255)),
        ("RGBA half alpha on black", rgba, (128, 128, 128)),
        ("RGBA clear", clear, (0, 0, 0)),
        ("LA", Image.new("LA", (5, 4), (200, 0)), (0, 0, 0)),
        ("P", pal, (10, 200, 30)),
        ("P transparent", pal_t, (0, 0, 0)),
        ("I;16", i16, (100, 100, 100)),
        ("I;16 max", Image.fromarray(np.full((4, 5), 65535, np.uint16)), (255, 255, 255)),
        ("I 8-bit range", Image.fromarray(np.full((4, 5), 60, np.int32)), (60, 60, 60)),
        ("F [0,1]", Image.fromarray(np.full((4, 5), 0.5, np.float32)), (128, 128, 128)),
        ("CMYK", Image.new("CMYK", (5, 4), (0, 0, 0, 0)), (255, 255, 255)),
        ("YCbCr", white.convert("YCbCr"), (255, 255, 255)),
        ("HSV", Image.new("HSV", (5, 4), (0, 0, 255)), (255, 255, 255)),
        ("PNG 16-bit bytes", _encode(i16, "PNG"), (100, 100, 100)),
        ("TIFF 16-bit bytes", _encode(i16, "TIFF"), (100, 100, 100)),
        ("PNG palette+transparency bytes", _encode(pal_t, "PNG"), (0, 0, 0)),
        ("PNG RGBA bytes", _encode(rgba, "PNG"), (128, 128, 128)),
        (
            "JPEG CMYK bytes",
            _encode(Image.new("CMYK", (5, 4), (0, 0, 0, 0)), "JPEG", quality=100),
            (255, 255, 255),
        ),
        ("JPEG grey bytes", _encode(Image.new("L", (5, 4), 77), "JPEG", quality=100), (77, 77, 77)),
        ("GIF bytes", _encode(pal, "GIF"), (10, 200, 30)),
        ("BMP bytes", _encode(white, "BMP"), (255, 255, 255)),
        ("WEBP lossless bytes", _encode(white, "WEBP", lossless=True), (255, 255, 255)),
    ]


@pytest.mark.parametrize("name,src,rgb", _mode_cases(), ids=[c[0] for c in _mode_cases()])
def test_every_mode_loads_as_rgb(name, src, rgb):
    img = load_image(src)
    assert img.mode == "RGB" and img.size == (5, 4)
    np.testing.assert_allclose(np.asarray(img)[0, 0], rgb, atol=2)
    frame, lb = letterbox(src if isinstance(src, Image.Image) else Image.open(io.BytesIO(src)))
    assert frame.shape == (256, 256, 3) and lb.src_w == 5


def test_load_image_from_path_and_missing_path(tmp_path):
    p = tmp_path / "x.png"
    Image.new("RGB", (7, 3), (1, 2, 3)).save(p)
    assert load_image(p).size == (7, 3) and load_image(str(p)).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        load_image(tmp_path / "nope.png")


def test_load_image_does_not_alter_the_callers_image():
    src = Image.new("RGB", (4, 4), (9, 9, 9))
    out = load_image(src)
    out.putpixel((0, 0), (255, 0, 0))
    assert src.getpixel((0, 0)) == (9, 9, 9)


# --- bad data --------------------------------------------------------------------------------


def _bad_inputs():
    jpeg = _encode(Image.new("RGB", (64, 48), (10, 200, 30)), "JPEG")
    png = _encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)), "PNG"
    )
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    return [
        ("empty", b"", NotAnImage),
        ("text", b"hello, I am not a picture", NotAnImage),
        ("eps refused", eps, NotAnImage),
        ("jpeg truncated", jpeg[: len(jpeg) // 2], CorruptImage),
        ("png truncated", png[: len(png) // 2], CorruptImage),
        ("png header only", png[:40], CorruptImage),
        ("png bad crc", png[:30] + bytes([png[30] ^ 0xFF]) + png[31:], CorruptImage),
    ]


@pytest.mark.parametrize("name,data,exc", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_data_raises_a_clear_image_error(name, data, exc):
    with pytest.raises(exc) as info:
        load_image(data)
    assert isinstance(info.value, ImageError) and isinstance(info.value, ValueError)
    assert str(info.value)  # a message for the user


def test_probe_refuses_a_bomb_header_without_decoding():
    bomb = _png_header_only(20000, 20000)  # 400 MP claimed, ~100 bytes of data
    assert len(bomb) < 200
    with pytest.raises(ImageTooLarge, match="pixels"):
        probe_image(bomb)
    with pytest.raises(ImageTooLarge, match=r"9000x9000 = 81,000,000"):
        probe_image(_png_header_only(9000, 9000), max_pixels=50_000_000)
    with pytest.raises(ImageTooLarge):
        load_image(_png_header_only(9000, 9000), max_pixels=50_000_000)
    # the same header under the limit probes fine (and decoding it would fail)
    assert probe_image(_png_header_only(300, 200)) == ("PNG", 300, 200, 1)
    with pytest.raises(CorruptImage):
        load_image(_png_header_only(300, 200))


def test_probe_reports_format_size_and_frames():
    frames = [Image.new("RGB", (30, 20), (80 * i, 255 - 80 * i, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert probe_image(buf.getvalue()) == ("GIF", 30, 20, 3)
    assert load_image(buf.getvalue()).size == (30, 20)  # first frame
    jpeg = _encode(Image.new("RGB", (64, 48)), "JPEG")
    assert probe_image(jpeg)[:3] == ("JPEG", 64, 48)
    with pytest.raises(ImageTooLarge, match="3,072"):
        probe_image(jpeg, max_pixels=3000)
    with pytest.raises(CorruptImage, match="GIF"):
        probe_image(b"GIF89a")
    with pytest.raises(NotAnImage):
        probe_image(bytes(range(64)))
