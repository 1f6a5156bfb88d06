"""Copy a serving checkpoint with its weights stored in half precision (for the bundle).

    python scripts/pack_checkpoint.py runs/m2-tiny/final checkpoints/m2-demo --dtype float16

Loads with the strict checks of `m2core.checkpoint`, writes atomically, and reports the
largest difference between the original and the packed model on a masked batch (logits;
for a format-2 model, decoder states).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from m2core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from m2core.masking import MaskingConfig, collate, mask_sample, random_sample


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    args = ap.parse_args(argv)
    try:
        src = load_checkpoint(args.src)
        card = (
            (args.src / "MODEL_CARD.md").read_text()
            if (args.src / "MODEL_CARD.md").is_file()
            else None
        )
        save_checkpoint(
            args.dst, src.model, src.image_tokenizer, src.text_tokenizer,
            extra=src.config.get("extra"), model_card=card, storage_dtype=args.dtype,
        )  # fmt: skip
        dst = load_checkpoint(args.dst)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"pack_checkpoint: error: {e}", file=sys.stderr)
        return 2
    cfg = src.model.config
    rng = np.random.default_rng(0)
    samples = [
        {**random_sample(rng, cfg.image_vocab, cfg.text_vocab, cfg.caption_len),
         "action": np.int64(rng.integers(getattr(cfg, "action_classes", 0) or 1))}
        for _ in range(8)
    ]  # fmt: skip
    batch = collate([mask_sample(s, MaskingConfig(cfg.input_tokens, cfg.target_tokens), rng)
                     for s in samples])  # fmt: skip
    with torch.no_grad():
        if hasattr(src.model, "adapters"):  # format 2: its forward gives losses, not logits
            a, b = {"state": src.model.hidden(batch)[0]}, {"state": dst.model.hidden(batch)[0]}
        else:
            a, b = src.model(batch)[0], dst.model(batch)[0]
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    size = sum(p.stat().st_size for p in args.dst.rglob("*") if p.is_file())
    print(
        f"packed {args.src} -> {args.dst} ({args.dtype}): {size / 1e6:.1f} MB, max diff {diff:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
