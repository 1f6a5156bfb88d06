"""Reader for the Penn Action layout: the real data set as distributed, or `m2 synth` output.

    ROOT/frames/NNNN/NNNNNN.jpg   frames, 1-based file names
    ROOT/labels/NNNN.mat          x, y, visibility, action, pose, bbox, dimensions, nframes, train
    ROOT/captions.json            optional: {"NNNN": ["caption of frame 1", ...]} (synth writes it)

`read_clip` copes with the quirks of the real files: MATLAB strings and scalars loaded as
(nested) arrays or plain values (`scipy.io.loadmat` with or without `squeeze_me`),
`bbox` with fewer rows than frames (padded by repeating its last row; a missing or empty
`bbox` is computed from the visible joints), invisible joints with meaningless (often 0)
coordinates (kept as they are: always check `visibility`), non-finite coordinates
(set to 0 and marked invisible), and frame sizes that vary by clip. Frames load lazily.
A missing or damaged file raises an error naming it; `iter_clips(..., skip_bad=True)`
logs such clips and skips them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from PIL import Image, UnidentifiedImageError

from m2core.modalities import NUM_JOINTS

log = logging.getLogger(__name__)
REQUIRED = ("x", "y", "visibility", "action", "nframes")


@dataclass
class Clip:
    """One clip's labels; frames are read from disk on demand."""

    clip_id: str
    action: str
    pose: str
    train: bool
    x: np.ndarray  # (n, 13) float64 pixels; meaningless where not visible
    y: np.ndarray  # (n, 13)
    visibility: np.ndarray  # (n, 13) bool
    bbox: np.ndarray  # (n, 4) float64 x1 y1 x2 y2, every row filled
    dims: tuple[int, int]  # (H, W)
    nframes: int
    captions: list[str] | None
    root: Path = field(repr=False)
    frame_action: list[str] | None = None  # a label per frame (m2 synth's switching clips)

    def frame_path(self, i: int) -> Path:
        """Path of frame i (0-based)."""
        if not 0 <= i < self.nframes:
            raise IndexError(f"clip {self.clip_id} has {self.nframes} frames, asked for frame {i}")
        return self.root / "frames" / self.clip_id / f"{i + 1:06d}.jpg"

    def frame(self, i: int) -> Image.Image:
        """Frame i (0-based) as an RGB image."""
        path = self.frame_path(i)
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"missing frame file {path}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot decode frame file {path}: {e}") from None

    def joints(self, i: int) -> np.ndarray:
        """(13, 3) float array of frame i: x, y in pixels and visible (0/1)."""
        return np.stack([self.x[i], self.y[i], self.visibility[i].astype(np.float64)], axis=1)


def _unwrap(v: Any) -> Any:
    """Strip the 1-element array nesting MATLAB values get from loadmat."""
    while isinstance(v, np.ndarray) and v.dtype == object and v.size == 1:
        v = v.reshape(-1)[0]
    return v


def as_str(v: Any, name: str = "value") -> str:
    """A MATLAB string in any form loadmat gives it: str, array(['s']), [[array(['s'])]],
    or a char matrix of single characters (chars_as_strings=False)."""
    v = _unwrap(v)
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, str):
        return v
    if isinstance(v, np.ndarray):
        if v.dtype.kind in "US":
            flat = [x.decode() if isinstance(x, bytes) else str(x) for x in v.reshape(-1)]
            return flat[0] if len(flat) == 1 else "".join(flat)
        if v.dtype == object:
            return "".join(as_str(x, name) for x in v.reshape(-1))
        if v.size == 0:
            return ""
    raise ValueError(
        f"field {name!r} is not a string: {type(v).__name__} {getattr(v, 'dtype', '')}"
    )


def as_number(v: Any, name: str = "value") -> float:
    """A MATLAB scalar: 103, array(103), array([[103]]) or [[array([[103]])]]."""
    arr = np.asarray(_unwrap(v), dtype=np.float64).reshape(-1)
    if arr.size != 1:
        raise ValueError(f"field {name!r} should be one number, got {arr.size} values")
    return float(arr[0])


def _matrix(v: Any, n: int, cols: int, name: str) -> np.ndarray:
    arr = np.asarray(_unwrap(v), dtype=np.float64)
    if arr.size == n * cols and arr.ndim <= 1:  # squeeze_me turned an (n, cols) into a vector
        arr = arr.reshape(n, cols)
    if arr.ndim == 2 and arr.shape == (cols, n) and n != cols:
        arr = arr.T
    if arr.ndim != 2 or arr.shape != (n, cols):
        raise ValueError(f"field {name!r} has shape {arr.shape}, expected ({n}, {cols})")
    return arr


def _bbox(v: Any, x: np.ndarray, y: np.ndarray, vis: np.ndarray) -> np.ndarray:
    """(n, 4) boxes: the file's rows, padded with its last row; else from visible joints."""
    n = len(x)
    arr = np.asarray(_unwrap(v) if v is not None else [], dtype=np.float64)
    arr = arr.reshape(-1, 4) if arr.size and arr.size % 4 == 0 else np.zeros((0, 4))
    if len(arr) >= n:
        return arr[:n].copy()
    if len(arr):
        return np.concatenate([arr, np.repeat(arr[-1:], n - len(arr), axis=0)])
    out = np.zeros((n, 4))
    for i in range(n):
        if vis[i].any():
            out[i] = [
                x[i, vis[i]].min(),
                y[i, vis[i]].min(),
                x[i, vis[i]].max(),
                y[i, vis[i]].max(),
            ]
        elif i:
            out[i] = out[i - 1]
    return out


def parse_label(mat: Mapping[str, Any], source: str = "label") -> dict[str, Any]:
    """Normalise a loaded Penn Action label dict (squeeze_me=True or False) to plain values:
    action, pose, train (bool), nframes, x, y, visibility (bool), bbox, dims ((H, W) or None)."""
    missing = [k for k in REQUIRED if k not in mat]
    if missing:
        raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
    n = int(as_number(mat["nframes"], "nframes"))
    if n < 1:
        raise ValueError(f"{source}: nframes is {n}")
    try:
        x = _matrix(mat["x"], n, NUM_JOINTS, "x")
        y = _matrix(mat["y"], n, NUM_JOINTS, "y")
        vis = _matrix(mat["visibility"], n, NUM_JOINTS, "visibility") > 0.5
        bad = ~(np.isfinite(x) & np.isfinite(y))
        x[bad], y[bad], vis[bad] = 0.0, 0.0, False
        dims = None
        if "dimensions" in mat:
            d = np.asarray(_unwrap(mat["dimensions"]), dtype=np.float64).reshape(-1)
            if d.size < 2 or d[0] < 1 or d[1] < 1:
                raise ValueError(f"field 'dimensions' should be [H W nframes], got {d.tolist()}")
            dims = (int(d[0]), int(d[1]))
        return {
            "action": as_str(mat["action"], "action"),
            "pose": as_str(mat["pose"], "pose") if "pose" in mat else "",
            "train": as_number(mat["train"], "train") > 0 if "train" in mat else True,
            "nframes": n, "x": x, "y": y, "visibility": vis,
            "bbox": _bbox(mat.get("bbox"), x, y, vis), "dims": dims,
            "frame_action": _frame_action(mat["frame_action"], n) if "frame_action" in mat else None,
        }  # fmt: skip
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _frame_action(v: Any, n: int) -> list[str]:
    """A per-frame label field (a char matrix, one row per frame) -> n labels."""
    v = _unwrap(v)
    rows = [v] if isinstance(v, (str, bytes)) else np.asarray(v).reshape(-1).tolist()
    out = [(r.decode() if isinstance(r, bytes) else str(r)).strip() for r in rows]
    if len(out) != n or not all(out):
        raise ValueError(f"field 'frame_action' should hold {n} labels, got {len(out)}")
    return out


def list_clips(root: str | Path) -> list[str]:
    """Clip ids (label file names without .mat), sorted."""
    labels = Path(root) / "labels"
    if not labels.is_dir():
        raise FileNotFoundError(
            f"no labels directory at {labels} (expected the Penn Action layout)"
        )
    return sorted(p.stem for p in labels.glob("*.mat") if not p.name.startswith("."))


def _captions(root: Path) -> dict[str, list[str]] | None:
    path = root / "captions.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold an object of clip id -> list of captions")
    return data


def read_clip(root: str | Path, clip_id: str, captions: dict[str, list[str]] | None = None) -> Clip:
    """Read one clip's labels and check its frame files exist (they load lazily).

    captions: an already-loaded captions.json (iter_clips passes it); by default read from root."""
    root = Path(root)
    path = root / "labels" / f"{clip_id}.mat"
    if not path.exists():
        raise FileNotFoundError(f"missing label file {path}")
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as e:  # scipy raises several types for damaged files
        raise ValueError(f"cannot read label file {path}: {e}") from None
    lab = parse_label(mat, str(path))
    n = lab["nframes"]
    frame_dir = root / "frames" / clip_id
    if not frame_dir.is_dir():
        raise FileNotFoundError(f"missing frame directory {frame_dir}")
    present = {p.name for p in frame_dir.iterdir()}
    for i in range(n):
        if f"{i + 1:06d}.jpg" not in present:
            raise FileNotFoundError(f"missing frame file {frame_dir / f'{i + 1:06d}.jpg'}")
    dims = lab["dims"]
    if dims is None:  # no dimensions field: take them from the first frame
        with Image.open(frame_dir / "000001.jpg") as im:
            dims = (im.height, im.width)
    caps = (_captions(root) if captions is None else captions) or {}
    clip_caps = caps.get(clip_id)
    if clip_caps is not None and (not isinstance(clip_caps, list) or len(clip_caps) != n):
        got = len(clip_caps) if isinstance(clip_caps, list) else type(clip_caps).__name__
        raise ValueError(
            f"{root / 'captions.json'}: clip {clip_id} has {got} captions for {n} frames"
        )
    return Clip(clip_id=clip_id, action=lab["action"], pose=lab["pose"], train=lab["train"],
                x=lab["x"], y=lab["y"], visibility=lab["visibility"], bbox=lab["bbox"],
                dims=dims, nframes=n, captions=clip_caps, root=root,
                frame_action=lab["frame_action"])  # fmt: skip


def iter_clips(
    root: str | Path, skip_bad: bool = False, train: bool | None = None
) -> Iterator[Clip]:
    """Every clip in id order. skip_bad: log and skip clips with missing/damaged files
    instead of raising. train: only the train (True) or test (False) split."""
    root = Path(root)
    ids = list_clips(root)
    captions = _captions(root)
    for cid in ids:
        try:
            clip = read_clip(root, cid, captions=captions)
        except (FileNotFoundError, ValueError) as e:
            if not skip_bad:
                raise
            log.warning("skipping clip %s: %s", cid, e)
            continue
        if train is None or clip.train == train:
            yield clip
