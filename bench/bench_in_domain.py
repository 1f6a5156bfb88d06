"""The out_of_domain warning, measured: the domain score of frames from synthetic clips no
training run saw, beside frames unlike them (tests/ood_corpus.py: scikit-image's photos,
blank, solid, noise, a screenshot, a gradient).

    m2 synth --out /tmp/fresh --clips 24 --seed 9001
    python bench/bench_in_domain.py --checkpoint checkpoints/m2-demo --fresh /tmp/fresh

Needs the dev extras (scikit-image). Prints each set's score quantiles, the share over 1
(warned), and every corpus image's score.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ood_corpus import corpus

from m2core.checkpoint import load_checkpoint
from m2core.geometry import letterbox
from m2core.in_domain import DomainCheck, skeleton_features
from training.eval.domain import read_frames
from training.tokenizer.data import frame_refs, iter_clips, load_frames, spread


def scores(bundle, check: DomainCheck, frames: torch.Tensor) -> np.ndarray:
    images, joints = read_frames(bundle, frames)
    return check.score(images, skeleton_features(joints))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--fresh", type=Path, required=True, help="synthetic clips no run trained on")
    p.add_argument("--frames", type=int, default=512)
    args = p.parse_args()
    check = DomainCheck.load(args.checkpoint)
    if check is None:
        sys.exit(f"{args.checkpoint} has no in_domain.safetensors (m2 calibrate-domain)")
    bundle = load_checkpoint(args.checkpoint)
    fresh = scores(
        bundle, check, load_frames(spread(frame_refs(list(iter_clips(args.fresh))), args.frames))
    )
    names, images = zip(*corpus(), strict=True)
    ood = scores(bundle, check, torch.from_numpy(np.stack([letterbox(im)[0] for im in images])))
    q = (0.5, 0.9, 0.95, 0.99)
    for label, s in (
        (f"fresh synthetic ({len(fresh)} frames)", fresh),
        (f"OOD corpus ({len(ood)})", ood),
    ):
        qs = ", ".join(
            f"q{int(100 * k)} {v:.2f}" for k, v in zip(q, np.quantile(s, q), strict=True)
        )
        print(f"{label}: warned {np.mean(s > 1):.1%}; min {s.min():.2f}, {qs}, max {s.max():.2f}")
    for n, s in sorted(zip(names, ood, strict=True), key=lambda t: t[1]):
        print(f"  {n:24s} {s:7.2f}  {'out_of_domain' if s > 1 else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
