"""An upload's header checks: the image format, its size and the declared content type,
all before any pixel is decoded. Every refusal is a `ServiceError` with its own status."""

from __future__ import annotations

from m2core.geometry import CorruptImage, ImageError, ImageTooLarge, NotAnImage, probe_image
from service.errors import ServiceError
from service.settings import Settings

# Declared content type -> the format the bytes must have.
CONTENT_TYPES = {
    "image/png": "PNG", "image/apng": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG",
    "image/pjpeg": "JPEG", "image/webp": "WEBP", "image/bmp": "BMP", "image/x-bmp": "BMP",
    "image/x-ms-bmp": "BMP", "image/gif": "GIF", "image/tiff": "TIFF",
}  # fmt: skip
UNTYPED = {"", "application/octet-stream", "binary/octet-stream"}


def check_upload(data: bytes, content_type: str | None, settings: Settings) -> tuple[str, int]:
    """-> (format, frames) from the header only: the format, the size and the declared type
    are checked before any pixel is decoded."""
    try:
        fmt, _, _, n_frames = probe_image(data, max_pixels=settings.max_pixels)
    except NotAnImage:  # name the formats this service takes, not all Pillow reads
        raise ServiceError(
            415, "not_an_image",
            f"upload is not an image; send one of {', '.join(settings.allowed_formats)}",
            "frame",
        ) from None  # fmt: skip
    except ImageTooLarge as e:
        raise ServiceError(413, "image_too_large", str(e), "frame") from None
    except (CorruptImage, ImageError) as e:
        raise ServiceError(422, "corrupt_image", str(e), "frame") from None
    fmt = "JPEG" if fmt == "MPO" else fmt
    if fmt not in settings.allowed_formats:
        raise ServiceError(
            415, "unsupported_format",
            f"{fmt} images are not accepted; send one of {', '.join(settings.allowed_formats)}",
            "frame",
        )  # fmt: skip
    _check_type(content_type, fmt)
    return fmt, n_frames


def _check_type(content_type: str | None, fmt: str) -> None:
    declared = (content_type or "").split(";")[0].strip().lower()
    if declared in UNTYPED:
        return
    if not declared.startswith("image/"):
        raise ServiceError(
            415, "wrong_content_type", f"frame was sent as {declared}, not as an image", "frame"
        )
    if CONTENT_TYPES.get(declared) != fmt:
        raise ServiceError(
            415,
            "content_type_mismatch",
            f"frame was sent as {declared} but the data is {fmt}",
            "frame",
        )
