"""Benchmark (not a test): two checkpoints, each with the code that reads it, side by side
in one run: `generate` latency for one frame (steps=1) at batch 1 and 16, and training
throughput (tokens/s of one training step at the tiny preset on random batches).

    git worktree add /tmp/m2-old 5df8903      # the code of the checkpoint to compare with
    python bench/bench_formats.py --old-tree /tmp/m2-old --old checkpoints/m2-demo \\
        --new runs/m2-tiny/final --frames data/prepared

Each side runs in its own process with its tree first on sys.path; rounds alternate
old / new (shared machines are noisy) and each figure is the best of its rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[4]))
from m2core.checkpoint import load_checkpoint
from m2core.generate import GenerationConfig
from m2core.masking import MaskingConfig, collate, mask_sample, random_sample
bundle = load_checkpoint(sys.argv[1]); model = bundle.model
if hasattr(model, "adapters"):
    from m2core.chain import generate
else:
    from m2core.generate import generate
tok = bundle.image_tokenizer
frames = np.load(sys.argv[2])  # (16, 256, 256, 3) uint8
rgb = tok.encode(torch.from_numpy(frames)).reshape(len(frames), -1)
reps = int(sys.argv[3])
out = {}
for b in (1, 16):
    cfg = GenerationConfig(steps=1, temperature=0.0, seed=0)
    generate(model, {"tok_rgb": rgb[:b]}, cfg)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); generate(model, {"tok_rgb": rgb[:b]}, cfg); ts.append(time.perf_counter() - t0)
    out[f"generate_b{b}_s"] = min(ts)
# training step at the checkpoint's own config, batch 16, on random well-formed samples
rng = np.random.default_rng(0)
cfg = model.config
vocab = cfg.image_vocab
mc = MaskingConfig(328, 128)
samples = []
for i in range(16):
    s = random_sample(rng, vocab, cfg.text_vocab, cfg.caption_len)
    s["action"] = np.array(i % 10)
    samples.append(mask_sample(s, mc, rng))
batch = collate(samples)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
def step():
    _, loss = model(batch); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
step(); step()
ts = []
for _ in range(reps):
    t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
out["train_tokens_per_s"] = 16 * 456 / min(ts)
print("RESULT " + json.dumps(out))
"""


def run_side(tree: Path, ckpt: Path, frames: Path, reps: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-c", WORKER, str(ckpt), str(frames), str(reps), str(threads)]
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{tree}: worker failed:\n{proc.stderr[-3000:]}")


def test_frames(data: Path, out: Path) -> Path:
    """16 frames spread over the prepared data's source clips (any split: only timing reads
    them), decoded from their JPEGs."""
    import numpy as np
    from PIL import Image

    meta = json.loads((data / "meta.json").read_text())
    src = (
        Path(eval(meta["source"])["path"])
        if isinstance(meta["source"], str)
        else Path(meta["source"]["path"])
    )
    files = sorted((src / "frames").glob("*/*.jpg"))[
        :: max(1, len(list((src / "frames").glob("*/*.jpg"))) // 16)
    ][:16]
    arr = np.stack([np.asarray(Image.open(f).convert("RGB").resize((256, 256))) for f in files])
    np.save(out, arr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=Path, required=True)
    p.add_argument("--new", type=Path, required=True)
    p.add_argument("--old-tree", type=Path, default=Path.cwd())
    p.add_argument("--new-tree", type=Path, default=Path.cwd())
    p.add_argument(
        "--frames", type=Path, required=True, help="a prepared data dir (its source frames)"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    frames = test_frames(a.frames, Path("/tmp") / f"m2-bench-frames-{os.getpid()}.npy")
    best: dict[str, dict[str, float]] = {"old": {}, "new": {}}
    t0 = time.time()
    for r in range(a.rounds):
        for side, tree, ckpt in (("old", a.old_tree, a.old), ("new", a.new_tree, a.new)):
            got = run_side(tree.resolve(), ckpt.resolve(), frames, a.reps, a.threads)
            for k, v in got.items():
                keep = max if k.endswith("per_s") else min
                best[side][k] = keep(best[side].get(k, v), v)
            print(f"round {r + 1} {side}: {got}", flush=True)
    ratios = {k: best["new"][k] / best["old"][k] for k in best["old"]}
    print(
        json.dumps(
            {"best": best, "new_over_old": ratios, "seconds": round(time.time() - t0)}, indent=1
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
