"""The Penn Action reader on a fixture with the real files' quirks, and on synth output."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from training.data.penn_action import Clip, iter_clips, list_clips, parse_label, read_clip
from training.synth.synth import generate


def _write_clip(root: Path, cid: str, n: int, size: tuple[int, int], *, bbox_rows: int | None,
                nested: bool = False, skip_frame: int | None = None) -> dict:  # fmt: skip
    """Write a Penn-Action-style clip: frames of size (W, H) and a label .mat."""
    w, h = size
    rng = np.random.default_rng(int(cid))
    x, y = rng.uniform(5, w - 5, (n, 13)), rng.uniform(5, h - 5, (n, 13))
    vis = np.ones((n, 13), bool)
    vis[:, [3, 5]] = False  # elbows and wrists of the left arm unseen...
    x[~vis], y[~vis] = 0.0, 0.0  # ...with zeros for coordinates, as in the real files
    label = {
        "x": x, "y": y, "visibility": vis, "nframes": float(n), "train": -1.0 if cid == "0002" else 1.0,
        "dimensions": np.array([h, w, n], float), "pose": "front",
        "action": np.array([["tennis_serve"]], dtype=object) if nested else "tennis_serve",
    }  # fmt: skip
    if bbox_rows is not None:
        label["bbox"] = np.array([[1 + i, 2, w - 1, h - 2] for i in range(bbox_rows)], float)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "labels" / f"{cid}.mat", label)
    fdir = root / "frames" / cid
    fdir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if i != skip_frame:
            Image.new("RGB", (w, h), (10 * i, 50, 90)).save(fdir / f"{i + 1:06d}.jpg")
    return label


@pytest.fixture
def penn(tmp_path: Path) -> Path:
    _write_clip(tmp_path, "0001", 5, (64, 48), bbox_rows=3)  # bbox shorter than the clip
    _write_clip(tmp_path, "0002", 4, (40, 30), bbox_rows=None, nested=True)  # no bbox at all
    _write_clip(tmp_path, "0003", 3, (50, 50), bbox_rows=3, skip_frame=1)  # a frame file missing
    return tmp_path


def test_parse_label_same_with_and_without_squeeze_me(penn: Path) -> None:
    path = penn / "labels" / "0002.mat"
    a = parse_label(scipy.io.loadmat(path, squeeze_me=False), str(path))
    b = parse_label(scipy.io.loadmat(path, squeeze_me=True), str(path))
    c = parse_label(scipy.io.loadmat(path, squeeze_me=False, chars_as_strings=False), str(path))
    for lab in (a, b, c):
        assert lab["action"] == "tennis_serve" and lab["pose"] == "front"
        assert lab["nframes"] == 4 and lab["train"] is False and lab["dims"] == (30, 40)
    for key in ("x", "y", "visibility", "bbox"):
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a[key], c[key])


def test_single_frame_clip_squeezed_to_vectors(tmp_path: Path) -> None:
    _write_clip(tmp_path, "0007", 1, (32, 32), bbox_rows=1)
    clip = read_clip(tmp_path, "0007")  # squeeze_me turns (1, 13) into (13,)
    assert clip.x.shape == (1, 13) and clip.bbox.shape == (1, 4)


def test_read_clip_fills_bbox_and_keeps_invisible_zeros(penn: Path) -> None:
    clip = read_clip(penn, "0001")
    assert isinstance(clip, Clip) and clip.nframes == 5 and clip.train and clip.dims == (48, 64)
    assert clip.bbox.shape == (5, 4)
    np.testing.assert_array_equal(clip.bbox[3], clip.bbox[2])  # padded with the last row
    np.testing.assert_array_equal(clip.bbox[4], clip.bbox[2])
    assert clip.bbox[0, 0] == 1 and clip.bbox[2, 0] == 3
    assert clip.visibility.dtype == bool and not clip.visibility[:, 3].any()
    assert (clip.x[:, 3] == 0).all() and clip.joints(0).shape == (13, 3)
    assert clip.captions is None


def test_bbox_from_visible_joints_when_missing(penn: Path) -> None:
    clip = read_clip(penn, "0002")
    assert clip.action == "tennis_serve" and not clip.train
    vis = clip.visibility[0]
    expected = [
        clip.x[0, vis].min(),
        clip.y[0, vis].min(),
        clip.x[0, vis].max(),
        clip.y[0, vis].max(),
    ]
    np.testing.assert_allclose(clip.bbox[0], expected)
    assert clip.bbox[0, 0] > 0  # the zeros of invisible joints did not leak into the box


def test_frames_lazy_and_sized_per_clip(penn: Path) -> None:
    a, b = read_clip(penn, "0001"), read_clip(penn, "0002")
    assert a.frame(0).size == (64, 48) and b.frame(3).size == (40, 30)
    assert a.frame(4).mode == "RGB" and a.frame_path(4).name == "000005.jpg"
    with pytest.raises(IndexError):
        a.frame(5)


def test_missing_files_named_and_skippable(penn: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match=r"0003/000002\.jpg"):
        read_clip(penn, "0003")
    with pytest.raises(FileNotFoundError, match=r"labels/0009\.mat"):
        read_clip(penn, "0009")
    with pytest.raises(FileNotFoundError, match=r"000002\.jpg"):
        list(iter_clips(penn))
    with caplog.at_level(logging.WARNING):
        ids = [c.clip_id for c in iter_clips(penn, skip_bad=True)]
    assert ids == ["0001", "0002"] and "0003" in caplog.text
    assert [c.clip_id for c in iter_clips(penn, skip_bad=True, train=False)] == ["0002"]
    with pytest.raises(FileNotFoundError, match="labels"):
        list_clips(penn / "nowhere")


def test_damaged_label_named(penn: Path) -> None:
    (penn / "labels" / "0004.mat").write_bytes(b"not a mat file")
    with pytest.raises(ValueError, match=r"0004\.mat"):
        read_clip(penn, "0004")
    scipy.io.savemat(penn / "labels" / "0005.mat", {"x": np.zeros((2, 13)), "nframes": 2.0})
    with pytest.raises(ValueError, match=r"0005\.mat.*missing field"):
        read_clip(penn, "0005")


def test_reads_synth_output(tmp_path: Path) -> None:
    root = tmp_path / "s"
    generate(root, clips=2, seed=4, workers=1, frames=(3, 4), progress=False)
    captions = json.loads((root / "captions.json").read_text())
    clips = list(iter_clips(root))
    assert [c.clip_id for c in clips] == list_clips(root) == ["0001", "0002"]
    for clip in clips:
        assert clip.captions == captions[clip.clip_id]
        h, w = clip.dims
        assert clip.frame(clip.nframes - 1).size == (w, h)
        assert clip.visibility.any() and clip.x.shape == (clip.nframes, 13)
        vis = clip.visibility
        assert (
            (clip.x[vis] >= 0) & (clip.x[vis] < w) & (clip.y[vis] >= 0) & (clip.y[vis] < h)
        ).all()
