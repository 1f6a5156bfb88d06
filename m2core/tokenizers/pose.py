"""Skeletons <-> pose tokens: deterministic binning of joint coordinates.

A skeleton is `(13, 3)` floats per joint: x, y in frame units ([0, 1] over the 256x256
letterboxed frame, see `m2core.geometry`) and a visible flag (0 or 1). It becomes 39 ids,
joint-major (x, y, visible per joint):

- x, y: `bins` equal bins over [0, 1] (id = floor(v * bins), clamped to [0, bins - 1]);
  decoding gives the bin centre, so `decode(encode(p))` is within half a bin
  (1 / (2 * bins)) of every in-frame coordinate. Out-of-frame values clamp to the edge.
- visible: id `bins` (NOT_VISIBLE_ID) or `bins + 1` (VISIBLE_ID), so one table of
  `bins + 2` ids (`POSE_VOCAB`) serves every component.

Invisible joints still carry their (clamped) coordinates; callers write 0 for unknown
ones, NaN is refused. `coords_next` is six skeletons, frame-major (6 x 39 = 234 ids).
"""

from __future__ import annotations

import numpy as np

from m2core.modalities import (
    FUTURE_FRAMES,
    NUM_JOINTS,
    POSE_BINS,
    POSE_COMPONENTS,
    TOKENS_PER_POSE,
)

NOT_VISIBLE_ID = POSE_BINS  # id of the visible component for a hidden joint
VISIBLE_ID = POSE_BINS + 1  # id of the visible component for a visible joint
_NC = len(POSE_COMPONENTS)  # 3: x, y, visible


class PoseTokenizer:
    """Bins skeletons to ids and back. Stateless apart from the number of bins."""

    def __init__(self, bins: int = POSE_BINS):
        if not isinstance(bins, int | np.integer) or bins < 2:
            raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
        self.bins = int(bins)
        self.not_visible_id = self.bins
        self.visible_id = self.bins + 1

    @property
    def vocab_size(self) -> int:
        """bins coordinate ids + 2 visibility ids."""
        return self.bins + 2

    @property
    def bin_width(self) -> float:
        """Width of one bin in frame units; decode(encode(p)) is within half of it."""
        return 1.0 / self.bins

    def __repr__(self) -> str:
        return f"PoseTokenizer(bins={self.bins})"

    # --- one skeleton per (..., 13, 3) ---------------------------------------------------

    def encode(self, coords: np.ndarray) -> np.ndarray:
        """(..., 13, 3) floats [x, y, visible] -> (..., 39) int64 ids."""
        arr = self._check_coords(coords, (NUM_JOINTS, _NC), "(..., 13, 3)")
        xy = np.clip(arr[..., :2], 0.0, 1.0)
        xy_ids = np.minimum(np.floor(xy * self.bins), self.bins - 1).astype(np.int64)
        vis_ids = np.where(arr[..., 2] > 0.5, self.visible_id, self.not_visible_id)
        ids = np.concatenate([xy_ids, vis_ids[..., None].astype(np.int64)], axis=-1)
        return ids.reshape(*arr.shape[:-2], TOKENS_PER_POSE)

    def decode(self, ids: np.ndarray, strict: bool = True) -> np.ndarray:
        """(..., 39) ids -> (..., 13, 3) float32 [x, y at bin centres, visible 0/1].

        strict=True refuses ids in the wrong slot (a visibility id where x belongs, or a
        coordinate id where the flag belongs). strict=False is for sampled model output:
        a coordinate slot's id is clamped into [0, bins - 1], and a flag slot counts as
        visible only when it holds VISIBLE_ID.
        """
        arr = self._check_ids(ids, TOKENS_PER_POSE, "(..., 39)")
        arr = arr.reshape(*arr.shape[:-1], NUM_JOINTS, _NC)
        xy_ids, vis_ids = arr[..., :2], arr[..., 2]
        if strict:
            bad_xy = (xy_ids < 0) | (xy_ids >= self.bins)
            bad_vis = (vis_ids != self.visible_id) & (vis_ids != self.not_visible_id)
            if bad_xy.any() or bad_vis.any():
                raise ValueError(
                    f"invalid pose ids: x/y ids must be in [0, {self.bins - 1}] and "
                    f"visible ids {self.not_visible_id} or {self.visible_id} "
                    f"({int(bad_xy.sum())} bad x/y, {int(bad_vis.sum())} bad visible)"
                )
        xy = (np.clip(xy_ids, 0, self.bins - 1).astype(np.float64) + 0.5) / self.bins
        vis = (vis_ids == self.visible_id).astype(np.float64)
        return np.concatenate([xy, vis[..., None]], axis=-1).astype(np.float32)

    # --- the six-skeleton future block ---------------------------------------------------

    def encode_future(self, coords: np.ndarray) -> np.ndarray:
        """(..., 6, 13, 3) -> (..., 234) ids, frame-major."""
        arr = self._check_coords(coords, (FUTURE_FRAMES, NUM_JOINTS, _NC), "(..., 6, 13, 3)")
        return self.encode(arr).reshape(*arr.shape[:-3], FUTURE_FRAMES * TOKENS_PER_POSE)

    def decode_future(self, ids: np.ndarray, strict: bool = True) -> np.ndarray:
        """(..., 234) ids -> (..., 6, 13, 3) float32."""
        n = FUTURE_FRAMES * TOKENS_PER_POSE
        arr = self._check_ids(ids, n, f"(..., {n})")
        per_frame = arr.reshape(*arr.shape[:-1], FUTURE_FRAMES, TOKENS_PER_POSE)
        return self.decode(per_frame, strict=strict)

    # --- validation ----------------------------------------------------------------------

    @staticmethod
    def _check_coords(coords: np.ndarray, tail: tuple[int, ...], shape_txt: str) -> np.ndarray:
        try:
            arr = np.asarray(coords, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"pose coords must be numbers of shape {shape_txt}: {e}") from None
        if arr.ndim < len(tail) or arr.shape[-len(tail) :] != tail:
            raise ValueError(f"pose coords must have shape {shape_txt}, got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(
                f"pose coords contain {int((~np.isfinite(arr)).sum())} NaN/inf values; "
                "write 0 for unknown joints and mark them not visible"
            )
        vis = arr[..., 2]
        if not ((vis == 0) | (vis == 1)).all():
            raise ValueError("the visible component of pose coords must be 0 or 1")
        return arr

    @staticmethod
    def _check_ids(ids: np.ndarray, n: int, shape_txt: str) -> np.ndarray:
        arr = np.asarray(ids)
        whole_floats = np.issubdtype(arr.dtype, np.floating) and bool((arr == np.rint(arr)).all())
        if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or whole_floats):
            raise ValueError(f"pose ids must be integers of shape {shape_txt}, got {arr.dtype}")
        if arr.ndim < 1 or arr.shape[-1] != n:
            raise ValueError(f"pose ids must have shape {shape_txt}, got {arr.shape}")
        return arr.astype(np.int64, copy=False)
