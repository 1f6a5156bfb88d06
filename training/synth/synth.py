"""`m2 synth`: render synthetic clips of a person moving, in the Penn Action layout.

    m2 synth --out DIR --clips N --seed S [--workers W] [--frames MIN MAX] [--resume]
             [--switch-share P]

writes `DIR/frames/NNNN/NNNNNN.jpg`, `DIR/labels/NNNN.mat` (Penn Action fields: x, y,
visibility, action, pose, bbox, dimensions, nframes, train), `DIR/captions.json` (one
caption per frame) and `DIR/synth.json` (generator version, seed, counts). Each clip is
drawn from `(seed, clip index)` alone, so the output does not depend on `--workers`, and
`--resume` finishes an interrupted run or grows a data set (`--clips 1600` over an existing
400): clips already written are kept, the rest rendered, and the result is the same as one
uninterrupted run with the final `--clips`.

Label conventions: x, y are continuous pixel coordinates of the written frame (the image
spans [0, W] x [0, H]; pixel column k covers [k, k + 1)). Unlike Penn Action, invisible
joints keep their true coordinates: joints hidden behind the body and joints outside
the frame (negative or beyond W/H) are marked not visible but still located. `pose` is
the way the person faces in the image (front / back / left / right). `bbox` (x1 y1 x2
y2) bounds the drawn body, clipped to the frame. A clip that switches action
(`--switch-share`, `training.synth.scene`) also has `frame_action`, one label per frame
(the action the person is about to do); `action` is its first.

The figure, its motion and the motion blur are documented in `training.synth.motion`
and `training.synth.render`; the captions in `training.synth.text`. `ACTIONS` lists the
action labels and `action_keywords(action)` the words that name an action in a caption.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

from training.synth.motion import ACTIONS
from training.synth.render import background, render_frame
from training.synth.scene import LEAD, ClipSpec, sample_spec
from training.synth.text import action_from_caption, action_keywords, caption

__all__ = ["ACTIONS", "RenderedClip", "action_from_caption", "action_keywords", "generate",
           "main", "render_clip", "sample_spec", "write_clip"]  # fmt: skip

SYNTH_VERSION = "1"
JPEG_QUALITY = 90
MAX_CLIPS = 9999  # four-digit clip ids, as Penn Action


@dataclass
class RenderedClip:
    """One rendered clip in memory: frames plus Penn-Action-style labels."""

    spec: ClipSpec
    frames: list[np.ndarray]  # (H, W, 3) uint8 each
    x: np.ndarray  # (n, 13) float64 pixels
    y: np.ndarray
    visibility: np.ndarray  # (n, 13) bool
    bbox: np.ndarray  # (n, 4) float64: x1 y1 x2 y2
    captions: list[str]

    @property
    def clip_id(self) -> str:
        return f"{self.spec.index:04d}"


def render_clip(spec: ClipSpec) -> RenderedClip:
    """Render every frame of a clip."""
    bg = background(spec.scene)
    n = spec.nframes
    frames, x, y = [], np.zeros((n, 13)), np.zeros((n, 13))
    vis, bbox = np.zeros((n, 13), bool), np.zeros((n, 4))
    for i in range(n):
        img, joints, vis[i], bbox[i] = render_frame(spec, bg, float(i))
        frames.append(img)
        x[i], y[i] = joints[:, 0], joints[:, 1]
    return RenderedClip(spec, frames, x, y, vis, bbox, clip_captions(spec))


def clip_captions(spec: ClipSpec) -> list[str]:
    """One caption per frame: they follow the motion's phase and name the frame's label
    (ahead of a switch, the coming action, without a clause on a phase not yet begun)."""
    out = []
    for i in range(spec.nframes):
        motion, style = spec.segment(i + LEAD)
        if motion is not spec.segment(i)[0]:
            style = replace(style, state=False)
        out.append(caption(style, motion.action, motion.phase(float(i))))
    return out


def write_clip(root: Path, clip: RenderedClip) -> None:
    """Write a clip's frames and label file; each appears complete or not at all."""
    cid, spec = clip.clip_id, clip.spec
    final = root / "frames" / cid
    tmp = root / "frames" / f".tmp-{cid}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, frame in enumerate(clip.frames):
        Image.fromarray(frame).save(tmp / f"{i + 1:06d}.jpg", quality=JPEG_QUALITY)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    h, w = clip.frames[0].shape[:2]
    label = {
        "x": clip.x, "y": clip.y, "visibility": clip.visibility,
        "action": spec.motion.action, "pose": spec.pose, "bbox": clip.bbox,
        "dimensions": np.array([h, w, spec.nframes], np.float64),
        "nframes": float(spec.nframes), "train": 1.0 if spec.train else -1.0,
    }  # fmt: skip
    if spec.switches:
        label["frame_action"] = np.array([spec.action_at(i) for i in range(spec.nframes)])
    labels = root / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    tmp_mat = labels / f".tmp-{cid}-{os.getpid()}.mat"
    scipy.io.savemat(tmp_mat, label, do_compression=True)
    os.replace(tmp_mat, labels / f"{cid}.mat")


def _job(root: str, seed: int, index: int, frames: tuple[int, int], share: float) -> dict:
    clip = render_clip(sample_spec(seed, index, frames, switch_share=share))
    write_clip(Path(root), clip)
    return _summary(clip.spec, clip.captions)


def _summary(spec: ClipSpec, captions: list[str]) -> dict:
    """What synth.json and captions.json need of one clip."""
    return {"id": f"{spec.index:04d}", "captions": captions, "action": spec.motion.action,
            "train": spec.train, "nframes": spec.nframes, "switches": len(spec.switches)}  # fmt: skip


def _known(root: str, seed: int, index: int, frames: tuple[int, int], share: float) -> dict | None:
    """The `_job` result of a clip already on disk (its spec is redrawn, not re-rendered),
    or None when its label file or frames are missing or incomplete."""
    spec = sample_spec(seed, index, frames, switch_share=share)
    cid = f"{index:04d}"
    folder = Path(root) / "frames" / cid
    if (
        not (Path(root) / "labels" / f"{cid}.mat").is_file()
        or not (folder / f"{spec.nframes:06d}.jpg").is_file()
    ):
        return None
    return _summary(spec, clip_captions(spec))


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def generate(out: str | Path, clips: int, seed: int = 0, workers: int | None = None,
             frames: tuple[int, int] = (60, 120), overwrite: bool = False,
             progress: bool = True, resume: bool = False, switch_share: float = 0.0) -> dict:  # fmt: skip
    """Render clips 1..`clips` into `out`; returns what synth.json records. With `resume`,
    clips of an earlier run with the same seed, frame range and switch share are kept."""
    if overwrite and resume:
        raise ValueError("--overwrite and --resume contradict each other; pass one")
    if not 1 <= clips <= MAX_CLIPS:
        raise ValueError(f"--clips must be between 1 and {MAX_CLIPS}, got {clips}")
    if not 1 <= frames[0] <= frames[1]:
        raise ValueError(f"--frames must satisfy 1 <= MIN <= MAX, got {frames[0]} {frames[1]}")
    if not 0.0 <= switch_share <= 1.0:
        raise ValueError(f"--switch-share must be in [0, 1], got {switch_share}")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {root} exists and is not a directory")
    existing = [
        p for p in ("frames", "labels", "captions.json", "synth.json") if (root / p).exists()
    ]
    if existing and not (overwrite or resume):
        raise ValueError(
            f"--out {root} already holds {', '.join(existing)}; pass --overwrite to replace it "
            "or --resume to keep its clips and render the missing ones"
        )
    if resume and (root / "synth.json").is_file():
        old = json.loads((root / "synth.json").read_text())
        was = (old.get("seed"), list(old.get("frames_range", [])), old.get("switch_share", 0.0))
        if was != (seed, list(frames), switch_share):
            raise ValueError(
                f"--resume: {root} was made with seed {was[0]}, frames {was[1]} and switch "
                f"share {was[2]}, not seed {seed}, frames {list(frames)} and switch share "
                f"{switch_share}"
            )
    for name in existing if overwrite else ():
        target = root / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    (root / "frames").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    workers = max(1, workers or os.cpu_count() or 1)
    results: list[dict] = []
    todo = list(range(1, clips + 1))
    if resume:
        known = [_known(str(root), seed, i, frames, switch_share) for i in todo]
        results = [r for r in known if r is not None]
        todo = [i for i, r in zip(todo, known, strict=True) if r is None]
    bar = tqdm(total=clips, initial=clips - len(todo), desc="synth", unit="clip",
               disable=not progress)  # fmt: skip
    if workers == 1:
        for i in todo:
            results.append(_job(str(root), seed, i, frames, switch_share))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_job, str(root), seed, i, frames, switch_share) for i in todo]
            try:
                for fut in as_completed(futures):
                    results.append(fut.result())
                    bar.update()
            except BaseException:  # Ctrl-C / SIGTERM: drop the queue, let workers finish
                for fut in futures:
                    fut.cancel()
                raise
    bar.close()
    results.sort(key=lambda r: r["id"])
    _write_json(root / "captions.json", {r["id"]: r["captions"] for r in results})
    summary = {
        "generator": "m2 synth", "version": SYNTH_VERSION, "seed": seed, "clips": clips,
        "frames_range": list(frames), "frames": sum(r["nframes"] for r in results),
        "train_clips": sum(r["train"] for r in results),
        "test_clips": sum(not r["train"] for r in results),
        "actions": dict(sorted(Counter(r["action"] for r in results).items())),
        "switch_share": switch_share,
        "switching_clips": sum(r.get("switches", 0) > 0 for r in results),
    }  # fmt: skip
    _write_json(root / "synth.json", summary)
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m2 synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (Penn Action layout)")
    p.add_argument("--clips", type=int, default=200, help="number of clips (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    p.add_argument("--frames", type=int, nargs=2, default=(60, 120), metavar=("MIN", "MAX"),
                   help="clip length range in frames, inclusive (default 60 120)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing data set in --out")
    p.add_argument("--resume", action="store_true",
                   help="keep the clips already in --out (same seed and frames) and render the "
                   "rest: finishes an interrupted run or grows a data set")  # fmt: skip
    p.add_argument("--switch-share", type=float, default=0.0, metavar="P",
                   help="share of clips that change action every 25-45 frames, labelled "
                   "ahead of the motion (default 0)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage + one error line
        return int(e.code or 0)
    if args.workers is not None and args.workers < 1:
        print(f"m2 synth: error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        summary = generate(args.out, args.clips, args.seed, args.workers, tuple(args.frames),
                           overwrite=args.overwrite, resume=args.resume,
                           switch_share=args.switch_share)  # fmt: skip
    except (ValueError, OSError) as e:
        print(f"m2 synth: error: {e}", file=sys.stderr)
        return 2
    took = time.perf_counter() - start
    print(
        f"wrote {summary['clips']} clips ({summary['frames']} frames) to {args.out} in {took:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
