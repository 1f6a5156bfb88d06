"""Writing small clips in the Penn Action layout for tests: one label file per clip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io


def write_label(
    root: Path, cid: str, xs: np.ndarray, ys: np.ndarray, size: tuple[int, int], train: bool,
    action: str = "baseball_pitch",
) -> None:  # fmt: skip
    """ROOT/labels/CID.mat for frames of `size` (w, h), every joint visible."""
    w, h = size
    n = len(xs)
    scipy.io.savemat(root / "labels" / f"{cid}.mat", {
        "x": xs, "y": ys, "visibility": np.ones((n, 13)), "action": action,
        "pose": "front", "bbox": np.tile([0.0, 0.0, w, h], (n, 1)),
        "dimensions": np.array([h, w, n], dtype=float), "nframes": float(n),
        "train": 1.0 if train else -1.0,
    })  # fmt: skip
