"""One clip -> the samples `m2 prepare` stores (runs in the reader worker processes).

Key frames t = 0, H, 2H, ... while t + S is inside the clip (the hop H is S unless
`--hop` says otherwise: H < S gives more, overlapping samples from the same frames). For each: the letterboxed
frames t and t + S, the joints at t, at the six future offsets (t+1 ... t+6 for S = 6;
spread over (t, t+S] otherwise, the last always at t + S), at t - 1 (for the constant
velocity baseline; t itself at t = 0), the person's box at t, and one caption.
Coordinates are in frame units of the 256x256 letterboxed frame (m2core.geometry).

Pixel convention: the reader's labels are continuous pixel coordinates (`m2 synth`
writes them so: column k spans [k, k + 1)); `Letterbox.to_frame` takes pixel centres
(column k centred at k), so labels are shifted by half a pixel on the way in. For real
Penn Action files the convention is not documented; the same rule is used (at most half
a source pixel, under 1/500 of the frame).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from m2core.modalities import FUTURE_FRAMES, NUM_JOINTS
from training.data.captioners import template_caption

PIXEL_CENTRE = 0.5  # continuous label coordinate of a pixel's centre (see above)


class PrepareError(ValueError):
    """Input that cannot be prepared; the message names the clip or file."""


@lru_cache(maxsize=4)
def _captions_file(root: Path) -> dict[str, list[str]] | None:
    """captions.json, read once per worker process (read_clip checks each clip's entry)."""
    path = root / "captions.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PrepareError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise PrepareError(f"{path}: expected an object of clip id -> list of captions")
    return data


def future_offsets(stride: int) -> list[int]:
    """Frame offsets of the six future skeletons: spread over (0, S], the last at S."""
    return [max(1, round(k * stride / FUTURE_FRAMES)) for k in range(1, FUTURE_FRAMES + 1)]


def key_frames(nframes: int, stride: int, hop: int | None = None) -> list[int]:
    return list(range(0, nframes - stride, hop or stride))


def _joints(clip: Any, i: int, lb: Any) -> np.ndarray:
    """(13, 3) [x, y in frame units, visible] of frame i; unknown coordinates -> 0."""
    xy = np.stack([clip.x[i], clip.y[i]], axis=-1).astype(np.float64)
    vis = np.asarray(clip.visibility[i], dtype=bool) & np.isfinite(xy).all(-1)
    xy = np.nan_to_num(lb.to_frame(np.nan_to_num(xy) - PIXEL_CENTRE), nan=0.0)
    return np.concatenate([xy, vis[:, None].astype(np.float64)], axis=-1)


def _box(clip: Any, i: int, lb: Any, joints: np.ndarray) -> np.ndarray:
    """Person box at frame i in frame units; the visible joints' box when the label's is unusable."""
    box = np.asarray(clip.bbox[i], dtype=np.float64) if len(clip.bbox) > i else np.zeros(4)
    if np.isfinite(box).all() and box[2] > box[0] and box[3] > box[1]:
        return lb.to_frame(box.reshape(2, 2) - PIXEL_CENTRE).reshape(4)
    vis = joints[joints[:, 2] > 0, :2]
    if len(vis) == 0:
        return np.array([0.0, 0.0, 1.0, 1.0])
    return np.concatenate([vis.min(0), vis.max(0)])


def read_clip_samples(
    data: Path, clip_id: str, stride: int, hop: int | None = None
) -> dict[str, Any]:
    """Everything one clip contributes, before tokenization: the letterboxed frames each
    key frame needs (`images`, each frame once) and, per sample, which of them is frame t
    (`image_now`) and frame t + S (`image_next`)."""
    from m2core.geometry import letterbox, load_image
    from m2core.tokenizers.pose import PoseTokenizer
    from training.data.penn_action import read_clip

    clip = read_clip(data, clip_id, captions=_captions_file(Path(data)) or {})
    keys = key_frames(clip.nframes, stride, hop)
    frame_ids = sorted({*keys, *(t + stride for t in keys)})
    row = {f: i for i, f in enumerate(frame_ids)}
    frames, boxes = {}, {}
    for i in frame_ids:
        path = clip.frame_path(i)
        try:
            frames[i], boxes[i] = letterbox(load_image(path))
        except (ValueError, OSError) as e:  # ImageError is a ValueError
            raise PrepareError(f"clip {clip_id}: frame {path}: {e}") from None
    pose = PoseTokenizer()
    offs = future_offsets(stride)
    coords, future, prev, bbox, captions = [], [], [], [], []
    actions = [clip.frame_action[t] if clip.frame_action else str(clip.action) for t in keys]
    for t, action in zip(keys, actions, strict=True):
        lb = boxes[t]  # frames of one clip share a size; use each key frame's own map
        now = _joints(clip, t, lb)
        coords.append(now)
        future.append(np.stack([_joints(clip, t + o, lb) for o in offs]))
        prev.append(_joints(clip, max(t - 1, 0), lb))
        bbox.append(_box(clip, t, lb, now))
        if clip.captions:
            captions.append(str(clip.captions[t]))
        else:
            captions.append(template_caption(action, getattr(clip, "pose", None)))
    n = len(keys)
    empty = np.zeros((0, NUM_JOINTS, 3))
    return {
        "clip_id": clip_id,
        "action": np.asarray(actions, dtype=str),  # per sample: a clip may switch
        "train": bool(clip.train),
        "has_captions": bool(clip.captions),
        "frame": np.asarray(keys, dtype=np.int32),
        "images": np.stack([frames[i] for i in frame_ids])
        if n
        else np.zeros((0, 256, 256, 3), np.uint8),
        "image_now": np.asarray([row[t] for t in keys], dtype=np.int64),
        "image_next": np.asarray([row[t + stride] for t in keys], dtype=np.int64),
        "coords": pose.encode(np.stack(coords) if n else empty),
        "coords_next": pose.encode_future(
            np.stack(future) if n else np.zeros((0, FUTURE_FRAMES, NUM_JOINTS, 3))
        ),
        "coords_prev": pose.encode(np.stack(prev) if n else empty),
        "bbox": np.asarray(bbox, dtype=np.float32).reshape(n, 4),
        "captions": np.asarray(captions, dtype=str),
    }
