"""Request and response models of the HTTP API (pydantic), and the error body.

Coordinates in and out are in the uploaded image's pixels, as the image is displayed
(EXIF orientation applied), pixel-centre convention (`m2core.geometry`): a joint is
`[x, y, visible]` with visible 0 or 1, 13 joints in Penn Action order.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, Field

from m2core.modalities import JOINT_NAMES, NUM_JOINTS

Joint = tuple[float, float, int]  # x, y in pixels of the upload, visible 0/1
MAX_COORD = 1e6  # largest |x| or |y| a given skeleton may have
MAX_SEED = 2**63 - 1  # seeds are int64


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. `image_too_large`")
    message: str = Field(description="what was wrong, for a person")
    field: str | None = Field(None, description="the request field at fault, if one is")


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer of the service has this body."""

    error: ErrorDetail


class Timings(BaseModel):
    """Milliseconds spent in each stage of one request."""

    decode: float = Field(description="reading and decoding the upload, letterboxing")
    queue: float = Field(description="waiting for a batch to start")
    model: float = Field(description="the batch's model call (tokenize, generate, decode)")
    encode: float = Field(description="building this response (coords, PNG)")
    total: float = Field(description="arrival to response")
    batch_size: int = Field(description="requests in the model call that served this one")


class Links(BaseModel):
    gif: str
    gif_plain: str
    next_frame: str


LOW_CONFIDENCE = 0.5  # a joint whose confidence is below this is "uncertain"

WarningCode = Literal["animated_image", "out_of_domain", "no_person", "low_confidence_joints"]
WARNING_CODES: dict[str, str] = {
    "animated_image": "an animated upload: only its first frame was used",
    "out_of_domain": "the frame is unlike the checkpoint's training frames (`domain_score` "
    "above 1): treat every output as a guess",
    "no_person": "the model found no visible joint: no caption, and the forecast means nothing",
    "low_confidence_joints": "visible joints of the skeleton read from the frame whose "
    f"confidence is below {LOW_CONFIDENCE} (format-2 checkpoints; named in the message)",
}


class Warning(BaseModel):
    """Something the caller should know about this answer; `code` is stable, `message` is
    for a person."""

    code: WarningCode = Field(
        description="; ".join(f"`{c}`: {what}" for c, what in WARNING_CODES.items())
    )
    message: str


class Confidence(BaseModel):
    """Per joint, in [0, 1]: the model's probability that the joint is within about PCK@0.05
    of where it says (format-2 checkpoints, from each coordinate's predicted spread)."""

    coords: list[float] = Field(description="13 numbers, the skeleton now (1.0 where given)")
    coords_next: list[list[list[float]]] = Field(description="steps x 6 x 13, the forecast")


class PredictResponse(BaseModel):
    id: str = Field(description="unguessable id of this prediction (for the GIF and PNG)")
    caption: str | None = Field(description="null when no person was found (`no_person`)")
    caption_given: bool = Field(description="the caption was supplied, not generated")
    coords: list[Joint] = Field(description="13 joints now, upload pixels")
    coords_given: bool = Field(description="the skeleton was supplied, not predicted")
    coords_next: list[list[list[Joint]]] = Field(description="steps x 6 future skeletons")
    tok_rgb_next: list[list[list[int]]] = Field(description="steps x 16 x 16 image token ids")
    action: str | None = Field(
        default=None,
        description="the action the model names (null for checkpoints without an action modality)",
    )
    confidence: Confidence | None = Field(
        default=None, description="null for checkpoints without per-joint confidence"
    )
    domain_score: float | None = Field(
        default=None,
        description="how far the frame (and the skeleton read from it) is from the training "
        "frames, over the checkpoint's threshold: above 1 is `out_of_domain`; null for "
        "checkpoints without in-domain statistics (m2 calibrate-domain)",
    )
    joint_names: list[str] = Field(default_factory=lambda: list(JOINT_NAMES))
    width: int = Field(description="upload width (after EXIF orientation)")
    height: int = Field(description="upload height (after EXIF orientation)")
    steps: int
    temperature: float
    seed: int = Field(description="seed used (send it back to get the same answer)")
    device: str
    dtype: str
    model_version: str = Field(description="hash of the checkpoint's weights")
    timings_ms: Timings
    links: Links
    warnings: list[Warning] = Field(default_factory=list)


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    model_version: str | None = None
    device: str | None = None
    detail: str | None = None


def parse_coords(text: str) -> list[list[float]]:
    """The `coords` form field: JSON, 13 x [x, y, visible]; ValueError says what is wrong."""
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(data, list) or len(data) != NUM_JOINTS:
        got = f"{len(data)} items" if isinstance(data, list) else type(data).__name__
        raise ValueError(f"must be a list of {NUM_JOINTS} joints [x, y, visible], got {got}")
    out = []
    for i, joint in enumerate(data):
        name = JOINT_NAMES[i]
        if not isinstance(joint, list) or len(joint) != 3:
            raise ValueError(f"joint {i} ({name}) must be [x, y, visible], got {joint!r}")
        x, y, v = joint
        for label, value in (("x", x), ("y", y)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"joint {i} ({name}) {label} must be a number, got {value!r}")
            if not math.isfinite(value) or abs(value) > MAX_COORD:
                raise ValueError(f"joint {i} ({name}) {label} must be finite, got {value!r}")
        if v not in (0, 1):  # True / False compare equal to 1 / 0
            raise ValueError(f"joint {i} ({name}) visible must be 0 or 1, got {v!r}")
        out.append([float(x), float(y), float(v)])
    return out
