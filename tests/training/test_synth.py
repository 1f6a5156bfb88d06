"""m2 synth: deterministic, labels that match the pixels, the Penn Action layout, the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from training.eval import contact_sheet
from training.synth import synth
from training.synth.render import background, render_frame
from training.synth.synth import (
    ACTIONS,
    action_from_caption,
    action_keywords,
    generate,
    sample_spec,
)
from training.synth.text import caption

FRAMES = (6, 8)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    generate(out, clips=3, seed=11, workers=1, frames=FRAMES, progress=False)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _labels(root: Path) -> dict[str, dict]:
    out = {}
    for p in sorted((root / "labels").glob("*.mat")):
        m = scipy.io.loadmat(p, squeeze_me=True)
        out[p.stem] = {k: v for k, v in m.items() if not k.startswith("__")}
    return out


def test_same_seed_same_bytes_whatever_the_worker_count(data: Path, tmp_path: Path) -> None:
    other = tmp_path / "b"
    generate(other, clips=3, seed=11, workers=2, frames=FRAMES, progress=False)
    a, b = _files(data), _files(other)
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert len(jpgs) >= 3 * FRAMES[0]
    assert a.keys() == b.keys()
    for k in [*jpgs, "captions.json", "synth.json"]:
        assert a[k] == b[k], k
    la, lb = _labels(data), _labels(other)
    for cid in la:
        for field, value in la[cid].items():
            np.testing.assert_array_equal(
                np.asarray(value), np.asarray(lb[cid][field]), err_msg=field
            )


def test_other_seed_other_clips(data: Path, tmp_path: Path) -> None:
    generate(tmp_path / "c", clips=1, seed=12, workers=1, frames=FRAMES, progress=False)
    a = (data / "frames/0001/000001.jpg").read_bytes()
    assert a != (tmp_path / "c/frames/0001/000001.jpg").read_bytes()


def test_penn_action_fields_and_types(data: Path) -> None:
    captions = json.loads((data / "captions.json").read_text())
    meta = json.loads((data / "synth.json").read_text())
    assert meta["seed"] == 11 and meta["clips"] == 3 and sum(meta["actions"].values()) == 3
    for cid, lab in _labels(data).items():
        n = int(lab["nframes"])
        assert FRAMES[0] <= n <= FRAMES[1]
        for key in ("x", "y", "bbox"):
            assert lab[key].dtype == np.float64
        assert lab["x"].shape == lab["y"].shape == lab["visibility"].shape == (n, 13)
        assert lab["bbox"].shape == (n, 4)
        assert set(np.unique(lab["visibility"])) <= {0, 1}
        assert isinstance(lab["action"], str) and lab["action"] in ACTIONS
        assert lab["pose"] in {"front", "back", "left", "right"}
        assert lab["train"] in (1, -1)
        h, w, nf = lab["dimensions"]
        frames = sorted((data / "frames" / cid).glob("*.jpg"))
        assert [p.name for p in frames] == [f"{i:06d}.jpg" for i in range(1, n + 1)] and nf == n
        with Image.open(frames[0]) as im:
            assert im.size == (w, h) and im.format == "JPEG"
        assert max(w, h) <= 640
        box = lab["bbox"]
        assert (box[:, 0] < box[:, 2]).all() and (box[:, 1] < box[:, 3]).all()
        assert len(captions[cid]) == n
        assert all(action_from_caption(c) == lab["action"] for c in captions[cid])


def test_captions_name_their_action_and_only_it() -> None:
    seen: dict[str, set[str]] = {a: set() for a in ACTIONS}
    for i in range(300):
        spec = sample_spec(3, i, (60, 60))
        for u in (0.1, 0.35, 0.6, 0.9):
            text = caption(spec.style, spec.motion.action, u)
            assert action_from_caption(text) == spec.motion.action, text
            seen[spec.motion.action].add(text)
    assert all(len(v) >= 5 for v in seen.values())  # wording varies
    assert action_keywords("squats") == ["squat"]
    with pytest.raises(ValueError, match="unknown action"):
        action_keywords("yoga")


def _plain(action: str, index: int) -> tuple:
    spec = sample_spec(21, index, (12, 12), action=action)
    lk = spec.look
    colours = [lk.skin, lk.hair, lk.shirt, lk.trousers, lk.shoes, lk.ball]
    candidates = [(128, 128, 128), (0, 255, 0), (255, 0, 255), (0, 255, 255), (255, 255, 0)]
    wall = max(
        candidates, key=lambda c: min(math.dist(c, o) for o in colours)
    )  # a colour the body lacks
    scene = replace(spec.scene, kind="flat", floor=None, floor_name=None, wall=wall)
    return replace(spec, scene=scene), background(scene)


@pytest.mark.parametrize("action", ACTIONS)
def test_visible_joints_lie_on_the_drawn_body(action: str) -> None:
    spec, bg = _plain(action, ACTIONS.index(action))
    h, w = bg.shape[:2]
    checked = 0
    for t in (0.0, 3.0, 7.0, 11.0):
        img, joints, visible, box = render_frame(spec, bg, t)
        diff = np.abs(img.astype(int) - bg.astype(int)).max(axis=2)
        for j in np.flatnonzero(visible):
            x, y = joints[j]
            assert 0 <= x < w and 0 <= y < h
            patch = diff[max(0, int(y) - 1) : int(y) + 2, max(0, int(x) - 1) : int(x) + 2]
            assert patch.max() > 25, (
                f"{action} t={t} joint {j} at ({x:.1f}, {y:.1f}) is on the background"
            )
            assert box[0] - 1 <= x <= box[2] + 1 and box[1] - 1 <= y <= box[3] + 1
            checked += 1
        # a joint outside the frame is never visible
        out = (joints[:, 0] < 0) | (joints[:, 0] >= w) | (joints[:, 1] < 0) | (joints[:, 1] >= h)
        assert not (visible & out).any()
    assert checked >= 12


def test_side_view_hides_the_far_arm() -> None:
    spec, bg = _plain("walking", 5)
    spec = replace(spec, motion=replace(spec.motion, yaw=math.radians(90), direction=0))
    _, _, visible, _ = render_frame(spec, bg, 0.0)
    # facing image-right: the right side is near the camera, the left shoulder is behind the torso
    assert visible[2] and not visible[1]


def _blur_pixels(period: float) -> int:
    spec, bg = _plain("jumping_jacks", 0)
    spec = replace(spec, motion=replace(spec.motion, period=period, phase0=0.0, asym=0.5, yaw=0.0),
                   shutter=1.0)  # fmt: skip
    t = period * 0.25  # arms at their fastest
    blurred, *_ = render_frame(spec, bg, t)
    sharp, *_ = render_frame(replace(spec, shutter=1e-6), bg, t)
    return int((np.abs(blurred.astype(int) - sharp.astype(int)).max(axis=2) > 20).sum())


def test_fast_limbs_blur_more_than_slow_ones() -> None:
    fast, slow = _blur_pixels(12.0), _blur_pixels(60.0)
    assert fast > 2 * slow and fast > 200


def test_cli_help_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert synth.main(["--help"]) == 0
    assert "--clips" in capsys.readouterr().out
    assert synth.main(["--out", str(tmp_path / "x"), "--clips", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2 synth: error:") and "--clips" in err and len(err.splitlines()) == 1
    assert synth.main(["--out", str(tmp_path / "x"), "--clips", "abc"]) == 2
    assert "invalid int value" in capsys.readouterr().err
    assert synth.main(["--out", str(tmp_path / "x"), "--frames", "9", "3"]) == 2
    assert "--frames" in capsys.readouterr().err


def test_refuses_to_overwrite_without_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "d"
    args = ["--out", str(out), "--clips", "1", "--frames", "2", "2", "--workers", "1"]
    assert synth.main(args) == 0
    assert synth.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert synth.main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["0001"]


def test_contact_sheet(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sheet.png"
    assert (
        contact_sheet.main(
            [
                "--data",
                str(data),
                "--out",
                str(out),
                "--clips",
                "2",
                "--frames",
                "3",
                "--cell",
                "64",
            ]
        )
        == 0
    )
    with Image.open(out) as im:
        assert im.size == (3 * 64, 2 * (64 + contact_sheet.LABEL_H))
        assert np.asarray(im).std() > 10
    capsys.readouterr()
    assert contact_sheet.main(["--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("m2 contact-sheet: error:")


def test_resume_grows_a_data_set_to_what_one_run_gives(data: Path, tmp_path: Path) -> None:
    """--resume keeps the clips already written and renders the rest; the result reads as
    one uninterrupted run with the final --clips (labels compared by value: .mat headers
    carry a time stamp)."""
    grown = tmp_path / "grown"
    generate(grown, clips=1, seed=11, workers=1, frames=FRAMES, progress=False)
    kept = (grown / "frames/0001/000001.jpg").stat().st_mtime_ns
    generate(grown, clips=3, seed=11, workers=2, frames=FRAMES, progress=False, resume=True)
    assert (grown / "frames/0001/000001.jpg").stat().st_mtime_ns == kept  # not re-rendered
    a, b = _files(data), _files(grown)
    assert a.keys() == b.keys()
    for k in [k for k in a if not k.endswith(".mat")]:
        assert a[k] == b[k], k
    for cid, fields in _labels(data).items():
        for field, value in fields.items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(_labels(grown)[cid][field]))
    with pytest.raises(ValueError, match="seed 11"):
        generate(grown, clips=4, seed=12, workers=1, frames=FRAMES, progress=False, resume=True)


def _children(pid: int) -> set[int]:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_stops_the_workers_too(tmp_path: Path) -> None:
    """`kill` on a running `m2 synth` ends it and its worker processes (nothing orphaned
    keeps rendering), and no half-written clip is left looking complete."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "synth", "--out", str(tmp_path / "s"),
         "--clips", "400", "--workers", "2", "--frames", "30", "40"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (tmp_path / "s" / "labels").is_dir() or not list(
        (tmp_path / "s" / "labels").glob("*.mat")
    ):
        assert proc.poll() is None and time.monotonic() < deadline, "synth did not start"
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert workers, "no worker processes seen"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    time.sleep(1.0)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()]
    assert not alive, f"workers {alive} outlived the command"
    assert len(list((tmp_path / "s" / "frames").glob("[0-9]*"))) < 400
    assert not (tmp_path / "s" / "synth.json").exists()


def test_switching_clips_are_labelled_ahead_of_their_motion_and_otherwise_unchanged() -> None:
    from training.synth.motion import pose_at
    from training.synth.scene import BLEND, LEAD

    switching = 0
    for i in range(40):
        spec = sample_spec(5, i, (70, 90), switch_share=1.0)
        assert replace(spec, switches=()) == sample_spec(5, i, (70, 90))
        if not spec.switches:
            assert spec.motion.action in ("bowling", "jumping") or spec.motion.direction
            continue
        switching += 1
        labels = [spec.action_at(t) for t in range(spec.nframes)]
        captions = synth.clip_captions(spec)
        assert all(action_from_caption(c) == a for c, a in zip(captions, labels, strict=True))
        first = spec.switches[0]
        before, after = spec.motion.action, first.motion.action
        assert before != after
        assert labels[first.start - LEAD - 1] == before and labels[first.start - LEAD] == after
        assert np.allclose(
            spec.points(first.start - 1), pose_at(spec.body, spec.motion, first.start - 1)
        )
        assert np.allclose(
            spec.points(first.start + BLEND), pose_at(spec.body, first.motion, first.start + BLEND)
        )
        # no joint jumps: a blend moves at most 0.2 body heights a frame (half of all
        # clips' own motion peaks above 0.1)
        pts = np.stack([spec.points(float(t)) for t in range(spec.nframes)])[:, :13]
        step = np.linalg.norm(np.diff(pts, axis=0), axis=-1).max(1)
        for s in spec.switches:
            assert step[s.start : s.start + BLEND].max() <= 0.2
    assert switching >= 15


def test_switch_share_is_written_and_checked_on_resume(tmp_path: Path) -> None:
    out = tmp_path / "s"
    summary = generate(out, clips=3, seed=2, workers=1, frames=(40, 40), progress=False,
                       switch_share=1.0)  # fmt: skip
    assert summary["switch_share"] == 1.0 and summary["switching_clips"] >= 1
    labels = _labels(out)
    for cid, lab in labels.items():
        spec = sample_spec(2, int(cid), (40, 40), switch_share=1.0)
        if spec.switches:
            assert [str(a).strip() for a in lab["frame_action"]] == [
                spec.action_at(t) for t in range(40)
            ]
            assert lab["action"] == spec.motion.action
        else:
            assert "frame_action" not in lab
    with pytest.raises(ValueError, match="switch share"):
        generate(out, clips=4, seed=2, workers=1, frames=(40, 40), progress=False, resume=True)
    with pytest.raises(ValueError, match="switch-share"):
        generate(tmp_path / "t", clips=1, seed=2, workers=1, progress=False, switch_share=1.5)
