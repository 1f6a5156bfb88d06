"""`m2 calibrate-domain`: store a checkpoint's in-domain statistics (m2core/in_domain.py).

    m2 calibrate-domain --checkpoint DIR --data DIR [--frames 768]

It reads held-out frames of --data (the clips its labels mark as test, else the last
15%) the way `/predict` does (letterbox, tokenize, read the skeleton), fits both views,
and writes DIR/in_domain.safetensors. Use the data the checkpoint was trained on; the server
then warns `out_of_domain` for frames unlike it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from m2core.checkpoint import load_checkpoint
from m2core.in_domain import DomainCheck, encode_with_features, feature_count, skeleton_features

HELD_OUT = 0.15  # share of clips held out when the labels mark no test clips


@torch.no_grad()
def read_frames(bundle, frames: torch.Tensor, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """uint8 letterboxed frames (N, 256, 256, 3) -> (image features (N, F), read skeletons
    (N, 13, 3) in frame units), as the server computes them."""
    from m2core.chain import generate as chain_generate
    from m2core.generate import GenerationConfig, generate

    gen = chain_generate if hasattr(bundle.model, "adapters") else generate
    feats, joints = [], []
    for i in tqdm(range(0, len(frames), batch), desc="reading frames", leave=False):
        ids, f = encode_with_features(bundle.image_tokenizer, frames[i : i + batch])
        n = len(ids)
        # the server's default temperature (0); only the skeleton now is needed
        cfg = GenerationConfig(steps=0, temperature=0.0, caption_max_tokens=1, seed=[0] * n)
        res = gen(bundle.model, {"tok_rgb": ids.reshape(n, -1)}, cfg)
        feats.append(f)
        joints += [bundle.pose_tokenizer.decode(r, strict=False) for r in res.coords.cpu().numpy()]
    return np.concatenate(feats), np.stack(joints)


def held_out_frames(data: Path, n: int) -> torch.Tensor:
    from training.tokenizer.data import frame_refs, load_frames, split_clips, spread

    _, held = split_clips(data, HELD_OUT)
    return load_frames(spread(frame_refs(held), n), "held-out frames")


def calibrate(checkpoint: Path, data: Path, frames: int = 2048) -> DomainCheck:
    bundle = load_checkpoint(checkpoint)
    held = held_out_frames(data, frames)
    need = 8 * feature_count(bundle.image_tokenizer)
    if len(held) < need:
        raise ValueError(f"{data}: {len(held)} held-out frames, need at least {need}")
    images, joints = read_frames(bundle, held)  # in clip order
    feats = np.concatenate([images, skeleton_features(joints)], 1)
    return DomainCheck.fit(feats, f"{len(images)} held-out frames of {data}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="m2 calibrate-domain",
        description="Store a checkpoint's in-domain statistics, from held-out frames of its "
        "training data, so the server warns out_of_domain for frames unlike them.",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="serving checkpoint folder")
    p.add_argument(
        "--data", required=True, type=Path, help="Penn-Action-layout folder it was trained on"
    )
    p.add_argument(
        "--frames", type=int, default=2048, help="held-out frames to read (default 2048)"
    )
    args = p.parse_args(argv)
    if args.frames < 128:
        p.error("--frames must be at least 128")
    try:
        check = calibrate(args.checkpoint, args.data, args.frames)
        path = check.save(args.checkpoint)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"m2 calibrate-domain: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {path}: threshold {check.threshold:.2f} (the {check.quantile} quantile of "
        f"held-out distances to the {check.k} nearest of {len(check.bank)} frames; "
        f"{check.frames} frames read)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
