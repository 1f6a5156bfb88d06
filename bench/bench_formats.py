"""Benchmark (not a test): two checkpoints, each with the code that reads it, side by side
in one run: `generate` latency for one frame (steps=1) at batch 1 and 16, and training
throughput (tokens/s of one training step at the tiny preset on random batches).

    git worktree add /tmp/m2-old 5df8903      # the code of the checkpoint to compare with
    python bench/bench_formats.py --old-tree /tmp/m2-old --old checkpoints/m2-demo \\
        --new runs/m2-tiny/final --frames data/prepared

Each side is a live worker process with its own tree first on sys.path. The parent asks
them for one call at a time, old and new in turn (which goes first alternates), so a
change in the machine's load hits both halves of a pair alike. Per task it reports each
side's best time, and the median and range of the pairs' new/old ratios.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import json, sys, time
import numpy as np, torch
import os
if os.path.exists("m2core/denormals.py"):  # the tree's own (an editable install would serve
    from m2core.denormals import flush_denormals  # another tree's): as train() does, first
    flush_denormals()
torch.set_num_threads(int(sys.argv[3]))
from m2core.checkpoint import load_checkpoint
from m2core.generate import GenerationConfig
from m2core.masking import MaskingConfig, collate, mask_sample, random_sample
bundle = load_checkpoint(sys.argv[1]); model = bundle.model
if hasattr(model, "adapters"):
    from m2core.chain import generate
else:
    from m2core.generate import generate
frames = np.load(sys.argv[2])  # (16, 256, 256, 3) uint8
rgb = bundle.image_tokenizer.encode(torch.from_numpy(frames)).reshape(len(frames), -1)
gen_cfg = GenerationConfig(steps=1, temperature=0.0, seed=0)
# a training step at the checkpoint's own config, batch 16, on random well-formed samples
rng = np.random.default_rng(0)
cfg = model.config
samples = []
for i in range(16):
    s = random_sample(rng, cfg.image_vocab, cfg.text_vocab, cfg.caption_len)
    s["action"] = np.array(i % 10)
    samples.append(mask_sample(s, MaskingConfig(328, 128), rng))
batch = collate(samples)
import copy
trained = copy.deepcopy(model).train()  # the generating model's weights (and captions) stay
opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-4)
def train_step():
    _, loss = trained(batch); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
tasks = {"generate_b1": lambda: generate(model, {"tok_rgb": rgb[:1]}, gen_cfg),
         "generate_b16": lambda: generate(model, {"tok_rgb": rgb[:16]}, gen_cfg),
         "train_step": train_step}
model.eval()
for f in tasks.values():  # warm-up
    f()
print("READY", flush=True)
for line in sys.stdin:  # one task name a line -> its seconds
    f = tasks[line.strip()]
    t0 = time.perf_counter(); f(); print(time.perf_counter() - t0, flush=True)
"""
TRAIN_TOKENS = 16 * 456  # one training step's tokens (batch 16, 328 in + 128 out)


class Side:
    """A worker process holding one checkpoint, loaded with its own tree's code."""

    def __init__(self, tree: Path, ckpt: Path, frames: Path, threads: int):
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-c", WORKER, str(ckpt), str(frames), str(threads)]
        self.tree = tree
        self.proc = subprocess.Popen(cmd, env=env, cwd=tree, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        if self.proc.stdout.readline().strip() != "READY":
            raise RuntimeError(f"{tree}: worker failed:\n{self.proc.stderr.read()[-3000:]}")

    def time(self, task: str) -> float:
        self.proc.stdin.write(task + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.tree}: worker died:\n{self.proc.stderr.read()[-3000:]}")
        return float(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def test_frames(data: Path, out: Path) -> Path:
    """16 frames spread over the prepared data's source clips (any split: only timing reads
    them), decoded from their JPEGs."""
    import numpy as np
    from PIL import Image

    meta = json.loads((data / "meta.json").read_text())
    src = (
        Path(ast.literal_eval(meta["source"])["path"])
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
    p.add_argument("--pairs", type=int, default=20, help="old/new pairs per task (b16: a quarter)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    frames = test_frames(a.frames, Path("/tmp") / f"m2-bench-frames-{os.getpid()}.npy")
    t0 = time.time()
    old = Side(a.old_tree.resolve(), a.old.resolve(), frames, a.threads)
    new = Side(a.new_tree.resolve(), a.new.resolve(), frames, a.threads)
    report: dict[str, dict] = {}
    try:
        for task, pairs in (("generate_b1", a.pairs), ("generate_b16", max(3, a.pairs // 4)),
                            ("train_step", a.pairs)):  # fmt: skip
            times: dict[str, list[float]] = {"old": [], "new": []}
            for i in range(pairs):  # alternate which side goes first
                for side in ("old", "new") if i % 2 == 0 else ("new", "old"):
                    times[side].append((old if side == "old" else new).time(task))
            ratios = sorted(n / o for o, n in zip(times["old"], times["new"], strict=True))
            report[task] = {
                "old_best_s": min(times["old"]), "new_best_s": min(times["new"]),
                "ratio_median": statistics.median(ratios), "ratio_of_bests": min(times["new"]) / min(times["old"]),
                "ratio_range": [ratios[0], ratios[-1]], "pairs": pairs,
            }  # fmt: skip
            if task == "train_step":
                report[task]["tokens_per_s"] = {k: TRAIN_TOKENS / min(v) for k, v in times.items()}
            print(f"{task}: {json.dumps(report[task])}", flush=True)
    finally:
        old.close()
        new.close()
    print(json.dumps({"report": report, "seconds": round(time.time() - t0)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
