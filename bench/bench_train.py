"""Training throughput: tokens/s, data-loader wait share, MFU (GPU), per dtype.

    python bench/bench_train.py                                   # m2-base, bf16 + fp32, 2 min each
    python bench/bench_train.py --config configs/m2-tiny.yaml --dtypes fp32 --seconds 60 --data DIR

Runs the real training step of training/train.py (same model, masking, DataLoader,
AdamW, clipping, autocast) for `--seconds` per dtype after `--warmup` steps, on
`--data` (a folder from `m2 prepare`) or, by default, on random token shards of the
right shapes written to a temporary folder (throughput does not depend on the ids).
Prints a table and the projected wall time of the config's full token budget per GPU
count, assuming linear data-parallel scaling (an upper bound: it ignores gradient
all-reduce time). `--out FILE` also writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.builders import (  # noqa: E402
    masking_config,
    model_config,
    param_groups,
)
from training.config import load_config  # noqa: E402
from training.data.shards import MaskedDataset, Shards, StepSampler, load_meta  # noqa: E402
from training.export import peak_flops  # noqa: E402
from training.plan import format_duration, make_plan  # noqa: E402


def random_shards(
    root: Path, n: int = 2048, image_vocab: int = 4096, caption_len: int = 32
) -> Path:
    """A prepared-format folder of random ids (captions: bos, 10-30 tokens, eos, pad)."""
    from m2core.modalities import POSE_BINS

    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True, exist_ok=True)
    pose = rng.integers(0, POSE_BINS, (n, 7 * 39))
    pose[:, 2::3] = POSE_BINS + 1
    caps = np.zeros((n, caption_len), np.int64)
    for i, k in enumerate(rng.integers(10, caption_len - 1, n)):
        caps[i, 0], caps[i, 1 : k + 1], caps[i, k + 1] = 1, rng.integers(3, 1000, k), 2
    arrays = {"tok_rgb": rng.integers(0, image_vocab, (n, 256)), "tok_rgb_next": rng.integers(0, image_vocab, (n, 256)),
              "coords": pose[:, :39], "coords_next": pose[:, 39:], "coords_prev": pose[:, :39], "captions": caps,
              "bbox": np.tile([0.2, 0.1, 0.8, 0.9], (n, 1)).astype(np.float32), "clip": np.arange(n) // 10,
              "frame": np.zeros(n, np.int32), "action": np.zeros(n, np.int16)}  # fmt: skip
    for k, v in arrays.items():
        np.save(root / "train" / f"{k}.npy", v.astype(np.uint16) if v.dtype == np.int64 else v)
    meta = {"counts": {"train": {"samples": n, "clips": n // 10}}, "image_vocab": image_vocab,
            "text_vocab": 50260, "caption_len": caption_len}  # fmt: skip
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def bench(cfg, data: Path, seconds: float, warmup: int) -> dict:
    from accelerate import Accelerator

    from m2core.masking import collate, mask_sample
    from m2core.model import M2Model

    meta = load_meta(data)
    acc = Accelerator(
        cpu=cfg.cpu, mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.dtype]
    )
    mcfg = model_config(cfg, meta)
    torch.manual_seed(0)
    model = M2Model(mcfg).to(acc.device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                            fused=acc.device.type == "cuda")  # fmt: skip
    model, opt = acc.prepare(model, opt)
    mask_cfg = masking_config(cfg)
    plan = make_plan(cfg, acc.num_processes)
    data_set = MaskedDataset(
        Shards(data, "train", meta), lambda s, g: mask_sample(s, mask_cfg, g), cfg.seed
    )
    sampler = StepSampler(
        cfg.batch_size, acc.num_processes, acc.process_index, cfg.grad_accum, 0, 10**9
    )
    loader = torch.utils.data.DataLoader(data_set, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                                         pin_memory=acc.device.type == "cuda",
                                         prefetch_factor=4 if cfg.num_workers else None)  # fmt: skip
    it = iter(loader)
    sync = torch.cuda.synchronize if acc.device.type == "cuda" else (lambda: None)
    steps = wait = 0.0
    t_start = cpu_start = None
    while True:
        if steps == warmup:
            sync()
            t_start, wait, cpu_start = time.perf_counter(), 0.0, time.process_time()
        for _ in range(cfg.grad_accum):
            t0 = time.perf_counter()
            batch = {k: v.to(acc.device, non_blocking=True) for k, v in next(it).items()}
            wait += time.perf_counter() - t0
            with acc.autocast():
                _, loss = model(batch)
            acc.backward(loss / cfg.grad_accum)
        acc.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        if t_start is not None and steps > warmup and steps % 5 == 0:
            sync()
            if time.perf_counter() - t_start >= seconds:
                break
    sync()
    elapsed = time.perf_counter() - t_start
    cpu_s = time.process_time() - cpu_start  # all threads: on a shared box, what we really got
    measured = steps - warmup
    tps = measured * plan.tokens_per_step / elapsed
    peak = cfg.peak_flops or peak_flops(acc.device, cfg.dtype, cfg.tf32)
    m = acc.unwrap_model(model)
    return {
        "dtype": cfg.dtype, "device": torch.cuda.get_device_name() if acc.device.type == "cuda" else "cpu",
        "params_m": m.num_params() / 1e6, "tokens_per_step": plan.tokens_per_step, "steps": int(measured),
        "seconds": elapsed, "step_s": elapsed / measured, "tokens_per_s": tps, "data_wait_share": wait / elapsed,
        "mfu": m.estimate_mfu(tps / acc.num_processes, peak) if peak else None, "peak_flops": peak,
        "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if acc.device.type == "cuda" else None,
        "loss": float(loss.detach()), "cpu_seconds": cpu_s,
        "tokens_per_cpu_s": measured * plan.tokens_per_step / cpu_s if cpu_s else None,
    }  # fmt: skip


def _one(argv: list[str]) -> int:
    """Child process: bench one dtype (accelerate's state is fixed once per process)."""
    config, data, seconds, warmup, *overrides = argv
    cfg = load_config(config, overrides)
    if not torch.cuda.is_available() and not cfg.cpu:
        cfg = load_config(config, [*overrides, "cpu=true"])
    print("RESULT " + json.dumps(bench(cfg, Path(data), float(seconds), int(warmup))), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--one"]:
        return _one(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "m2-base.yaml"))
    p.add_argument(
        "--dtypes", nargs="+", default=["bf16", "fp32"], choices=["fp32", "bf16", "fp16"]
    )
    p.add_argument("--seconds", type=float, default=120.0, help="measured time per dtype")
    p.add_argument("--warmup", type=int, default=5, help="steps before timing starts")
    p.add_argument("--data", type=Path, help="prepared folder (default: random shards)")
    p.add_argument("--gpus", default="1,2,4,8", help="GPU counts to project, comma-separated")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    gpus = [int(g) for g in a.gpus.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data or random_shards(Path(tmp) / "shards")
        for dtype in a.dtypes:
            cmd = [sys.executable, __file__, "--one", a.config, str(data), str(a.seconds), str(a.warmup),
                   *a.overrides, f"dtype={dtype}", f"data_dir={data}"]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{dtype}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            r = json.loads(lines[-1][len("RESULT ") :])
            results.append(r)
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            print(f"{r['device']} {dtype}: {r['tokens_per_s']:,.0f} tokens/s ({r['step_s']:.3f} s/step of "
                  f"{r['tokens_per_step']:,} tokens, {r['steps']} steps), data wait {r['data_wait_share']:.1%}, "
                  f"MFU {mfu}, {r['tokens_per_cpu_s']:,.0f} tokens per CPU-second"
                  + (f", peak memory {r['max_memory_gb']:.1f} GiB" if r["max_memory_gb"] else ""),
                  flush=True)  # fmt: skip
    total = load_config(a.config, a.overrides).total_tokens * 1e6
    print(f"\nprojected wall time for {total / 1e9:g}B tokens (linear scaling assumed):")
    print("| dtype | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in gpus) + " |")
    print("|---" * (len(gpus) + 1) + "|")
    for r in results:
        cells = [format_duration(total / (r["tokens_per_s"] * g)) for g in gpus]
        print(f"| {r['dtype']} | " + " | ".join(cells) + " |")
    if a.out:
        a.out.write_text(json.dumps({"config": a.config, "results": results}, indent=1))
    return 0 if len(results) == len(a.dtypes) else 1


if __name__ == "__main__":
    sys.exit(main())
