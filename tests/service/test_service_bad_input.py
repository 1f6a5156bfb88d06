"""Bad input: each case gets its documented status and a JSON error, and the server answers
a normal request right after (no 500, no dead batching loop)."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient
from svc_helpers import png_bytes

from m2core.modalities import NUM_JOINTS


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(w: int = 120, h: int = 90, mode: str = "RGB") -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side x side pixels (400 MP) that compresses to ~50 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    """A 120x60 JPEG whose EXIF says 'rotate 90' (orientation 6): shown as 60x120."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(_photo(120, 60), "JPEG", exif=exif.tobytes())


def animated(fmt: str) -> bytes:
    frames = [_photo(64, 48).rotate(a) for a in (0, 90, 180)]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


GOOD_JOINTS = [[10 + i, 20 + i, 1] for i in range(NUM_JOINTS)]

# (case, frame bytes, declared content type, extra fields, status, error code, field)
BAD = [
    ("zero bytes", b"", "image/png", {}, 415, "not_an_image", "frame"),
    ("text renamed .png", b"just some text, not a picture\n" * 20, "image/png", {}, 415, "not_an_image", "frame"),
    ("truncated PNG", png_bytes(200, 150)[:3000], "image/png", {}, 422, "corrupt_image", "frame"),
    ("truncated JPEG", _encode(_photo(400, 300), "JPEG")[:2500], "image/jpeg", {}, 422, "corrupt_image", "frame"),
    ("animated GIF", animated("GIF"), "image/gif", {}, 415, "unsupported_format", "frame"),
    ("TIFF", _encode(_photo(), "TIFF"), "image/tiff", {}, 415, "unsupported_format", "frame"),
    ("frame sent as text/plain", png_bytes(), "text/plain", {}, 415, "wrong_content_type", "frame"),
    ("JPEG declared as PNG", _encode(_photo(), "JPEG"), "image/png", {}, 415, "content_type_mismatch", "frame"),
    ("coords not JSON", png_bytes(), "image/png", {"coords": "[[1, 2, 1],"}, 422, "invalid_coords", "coords"),
    ("coords 12 joints", png_bytes(), "image/png", {"coords": json.dumps(GOOD_JOINTS[:12])}, 422, "invalid_coords", "coords"),
    ("coords NaN", png_bytes(), "image/png", {"coords": json.dumps(GOOD_JOINTS).replace("10", "NaN", 1)}, 422, "invalid_coords", "coords"),
    ("coords visible 2", png_bytes(), "image/png", {"coords": json.dumps([[1, 2, 2]] * NUM_JOINTS)}, 422, "invalid_coords", "coords"),
    ("coords as object", png_bytes(), "image/png", {"coords": '{"head": [1, 2, 1]}'}, 422, "invalid_coords", "coords"),
    ("steps 0", png_bytes(), "image/png", {"steps": "0"}, 422, "invalid_field", "steps"),
    ("steps 99", png_bytes(), "image/png", {"steps": "99"}, 422, "invalid_field", "steps"),
    ("steps not a number", png_bytes(), "image/png", {"steps": "two"}, 422, "invalid_field", "steps"),
    ("temperature negative", png_bytes(), "image/png", {"temperature": "-1"}, 422, "invalid_field", "temperature"),
    ("temperature nan", png_bytes(), "image/png", {"temperature": "nan"}, 422, "invalid_field", "temperature"),
    ("temperature huge", png_bytes(), "image/png", {"temperature": "1e9"}, 422, "invalid_field", "temperature"),
    ("seed negative", png_bytes(), "image/png", {"seed": "-3"}, 422, "invalid_field", "seed"),
    ("caption too long", png_bytes(), "image/png", {"caption": "x" * 600}, 422, "invalid_field", "caption"),
    ("caption too long as sent", png_bytes(), "image/png", {"caption": " " + "x" * 500}, 422, "invalid_field", "caption"),
    ("temperature text", png_bytes(), "image/png", {"temperature": "none"}, 422, "invalid_field", "temperature"),
]  # fmt: skip

GOOD = [
    ("CMYK JPEG", _encode(_photo(mode="CMYK"), "JPEG"), "image/jpeg"),
    ("16-bit PNG", _encode(Image.fromarray((np.arange(90 * 120).reshape(90, 120) * 6).astype(np.uint16)), "PNG"), "image/png"),
    ("palette PNG", _encode(_photo().quantize(16), "PNG"), "image/png"),
    ("RGBA PNG", _encode(_photo(mode="RGBA"), "PNG"), "image/png"),
    ("greyscale BMP", _encode(_photo(mode="L"), "BMP"), "image/bmp"),
    ("WebP", _encode(_photo(), "WEBP"), "image/webp"),
    ("untyped PNG", png_bytes(), "application/octet-stream"),
    ("1x2000 sliver", png_bytes(1, 2000), "image/png"),
]  # fmt: skip


def assert_still_serves(client: TestClient) -> None:
    r = client.post("/predict", files={"frame": ("ok.png", png_bytes(64, 48), "image/png")})
    assert r.status_code == 200, r.text


def assert_error(r, status: int, code: str | None = None, field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["message"] and (code is None or err["code"] == code), err
    assert field is None or err["field"] == field, err
    return err


@pytest.mark.parametrize(
    ("case", "data", "ctype", "fields", "status", "code", "field"), BAD, ids=[b[0] for b in BAD]
)
def test_bad_upload_gets_its_status(client, case, data, ctype, fields, status, code, field):
    r = client.post("/predict", files={"frame": ("upload.png", data, ctype)}, data=fields)
    assert_error(r, status, code, field)
    assert_still_serves(client)


@pytest.mark.parametrize(("case", "data", "ctype"), GOOD, ids=[g[0] for g in GOOD])
def test_unusual_but_valid_images_are_predicted(client, case, data, ctype):
    r = client.post("/predict", files={"frame": ("upload", data, ctype)})
    assert r.status_code == 200, r.text
    assert len(r.json()["coords"]) == NUM_JOINTS


def test_not_an_image_names_the_formats_the_service_takes(client):
    r = client.post("/predict", files={"frame": ("a.png", b"not a picture\n" * 20, "image/png")})
    message = assert_error(r, 415, "not_an_image", "frame")["message"]
    assert "PNG, JPEG, WEBP, BMP" in message and "TIFF" not in message


def test_decompression_bomb_is_refused_from_its_header(client):
    bomb = png_bomb()
    assert len(bomb) < 100_000  # 20000 x 20000 pixels in well under 100 KB
    err = assert_error(
        client.post("/predict", files={"frame": ("bomb.png", bomb, "image/png")}),
        413,
        "image_too_large",
    )
    assert "pixels" in err["message"]
    assert_still_serves(client)


def test_exif_rotation_is_applied_and_sizes_follow_it(client):
    d = client.post(
        "/predict", files={"frame": ("r.jpg", exif_rotated_jpeg(), "image/jpeg")}
    ).json()
    assert (d["width"], d["height"]) == (60, 120)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_png_and_webp_use_the_first_frame_and_say_so(client, fmt):
    r = client.post("/predict", files={"frame": ("a", animated(fmt), f"image/{fmt.lower()}")})
    assert r.status_code == 200, r.text
    animated_ = [w for w in r.json()["warnings"] if w["code"] == "animated_image"]
    assert len(animated_) == 1 and "the first frame was used" in animated_[0]["message"]


def test_200_mb_body_is_refused_while_streaming(client):
    """Straight at the ASGI app (TestClient would buffer the whole body first): 1 MiB
    chunks, no Content-Length, as a chunked upload arrives."""
    pulled, messages = 0, []

    head = b'--x\r\nContent-Disposition: form-data; name="frame"; filename="a.png"\r\n\r\n'

    async def receive():  # a well-formed multipart upload that never ends
        nonlocal pulled
        pulled += 1
        chunk = (head if pulled == 1 else b"") + b"\0" * (1 << 20)
        return {"type": "http.request", "body": chunk, "more_body": pulled < 200}

    async def send(message):
        messages.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/predict", "raw_path": b"/predict", "root_path": "",
        "query_string": b"", "server": ("test", 80), "client": ("test", 1), "state": {},
        "headers": [(b"host", b"test"), (b"content-type", b"multipart/form-data; boundary=x"),
                    (b"transfer-encoding", b"chunked")],
    }  # fmt: skip
    client.portal.call(client.app, scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    assert start["status"] == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    assert pulled <= 17  # stopped at the first chunk over the 16 MiB cap, not after 200
    assert_still_serves(client)


def test_declared_oversize_body_is_refused_before_reading(client):
    r = client.post(
        "/predict",
        content=b"tiny",
        headers={
            "Content-Length": str(200 << 20),
            "Content-Type": "multipart/form-data; boundary=x",
        },
    )
    assert_error(r, 413, "body_too_large")


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"json": {"frame": "abc"}}, 415),
        ({"data": {"frame": "abc"}}, 415),  # urlencoded
        (
            {
                "content": b"--x\r\nbroken",
                "headers": {"Content-Type": "multipart/form-data; boundary=x"},
            },
            422,
        ),
        ({"files": {"other": ("a.png", png_bytes(), "image/png")}}, 422),  # no frame field
    ],
    ids=["json", "urlencoded", "broken multipart", "no frame"],
)
def test_wrong_request_shapes(client, kwargs, status):
    err = assert_error(client.post("/predict", **kwargs), status)
    if status == 422 and "files" in kwargs:
        assert err["field"] == "frame"
    assert_still_serves(client)
