"""Benchmark of the M2 model (not a test): training-step throughput against the machine's
own matmul rate, chained-generation latency with the caption KV cache on and off, and the
cost of masking one sample.

    python bench/bench_model.py                      # this CPU: tiny + dim 256, fp32
    python bench/bench_model.py --device cuda        # base at batch 128, bf16 autocast
    python bench/bench_model.py --device cuda --compile --peak-tflops 989

Figures are best-of-N wall times (shared machines are noisy). "achieved" is the FLOPs a
FlopCounterMode counts for one training step (every matmul and attention product,
forward and backward) over the step's time; "MFU" uses the model's analytic
`flops_per_token()` over the peak: the measured dense matmul rate of this device in the
same dtype, or `--peak-tflops` when given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from m2core.generate import GenerationConfig, generate
from m2core.masking import MaskingConfig, collate, mask_sample, random_sample
from m2core.model import M2Config, M2Model

IMAGE_VOCAB, TEXT_VOCAB = 4096, 1000  # FSQ (8, 8, 8, 8); a compact caption vocabulary


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], device: str, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_rate(device: str, dtype: torch.dtype, repeats: int) -> float:
    """Dense matmul FLOP/s of this device (square, large enough to be compute-bound)."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_time(lambda: a @ b, device, repeats)


def make_batch(n: int, budget: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    cfg = MaskingConfig(budget, budget)
    samples = [random_sample(rng, IMAGE_VOCAB, TEXT_VOCAB, 32, caption_tokens=15) for _ in range(n)]
    return collate([mask_sample(s, cfg, rng) for s in samples])


def train_step_bench(
    cfg: M2Config, batch_size: int, device: str, repeats: int, amp: bool, compile_blocks: bool
) -> dict[str, float]:
    torch.manual_seed(0)
    model = M2Model(cfg).to(device)
    if compile_blocks:  # per block: the heads' data-dependent gathers stay eager
        for block in [*model.encoder, *model.decoder]:
            block.compile()
    opt = torch.optim.AdamW(model.optimizer_groups(0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
    batch = {k: v.to(device) for k, v in make_batch(batch_size, cfg.input_tokens).items()}
    autocast = torch.autocast(device, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def forward():
        with autocast:
            return model(batch, return_logits=False)[1]

    def step():
        opt.zero_grad(set_to_none=True)
        forward().backward()
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter:
        forward().backward()
    step_s = best_time(step, device, repeats, warmup=3 if compile_blocks else 2)
    fwd_s = best_time(forward, device, repeats)
    with torch.no_grad():
        mask_s = best_time(
            lambda: model.target_mask(batch["dec_mod"], batch["dec_valid"]), device, 20
        )
    tokens = batch_size * (cfg.input_tokens + cfg.target_tokens)
    return {
        "params_M": model.num_params() / 1e6,
        "body_params_M": model.num_params(body_only=True) / 1e6,
        "step_s": step_s,
        "forward_s": fwd_s,
        "decoder_mask_ms": mask_s * 1e3,
        "tokens_per_s": tokens / step_s,
        "counted_flops_per_step": counter.get_total_flops(),
        "analytic_flops_per_step": model.flops_per_token().per_sample * batch_size,
        "achieved_flops": counter.get_total_flops() / step_s,
        "model": model,
    }


def generation_bench(
    model: M2Model, device: str, batch_sizes: tuple[int, ...], repeats: int
) -> list[dict]:
    """Best-of-`repeats` latency of the whole chain, cache on and off measured in turns."""
    rows = []
    for B in batch_sizes:
        g = torch.Generator().manual_seed(B)
        rgb = torch.randint(0, IMAGE_VOCAB, (B, 256), generator=g).to(device)
        cfgs = {
            cache: GenerationConfig(maskgit_steps=8, caption_min_tokens=30, caption_max_tokens=30,
                                    kv_cache=cache, temperature=1.0, seed=0)
            for cache in (True, False)
        }  # fmt: skip
        generate(model, {"tok_rgb": rgb}, cfgs[True])  # warm-up
        best = {c: (float("inf"), {}) for c in cfgs}
        for _ in range(repeats):
            for cache, cfg in cfgs.items():
                _sync(device)
                t0 = time.perf_counter()
                r = generate(model, {"tok_rgb": rgb}, cfg)
                _sync(device)
                assert all(len(c) == 30 for c in r.captions)
                if (dt := time.perf_counter() - t0) < best[cache][0]:
                    best[cache] = (dt, r.timings)
        for cache, (total, stages) in best.items():
            row = {"batch": B, "kv_cache": cache, "total_s": total}
            rows.append(row | {f"{k}_s": v for k, v in stages.items()})
    return rows


def masking_bench(n: int = 2000) -> float:
    """Seconds per sample of mask_sample with the default config (one CPU core)."""
    rng = np.random.default_rng(0)
    samples = [random_sample(rng, IMAGE_VOCAB, TEXT_VOCAB, 32) for _ in range(200)]
    cfg = MaskingConfig()
    t0 = time.perf_counter()
    for i in range(n):
        mask_sample(samples[i % len(samples)], cfg, rng)
    return (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak for MFU (default: measured matmul rate)",
    )
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_model: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    dev, gpu = args.device, args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (10 if gpu else 3)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if gpu else torch.float32
    rates = [matmul_rate(dev, dtype, repeats)]
    configs = (
        {"base@128": (M2Config.from_preset("base", image_vocab=IMAGE_VOCAB, text_vocab=TEXT_VOCAB), 128)}
        if gpu
        else {
            "tiny@16": (M2Config.from_preset("tiny", image_vocab=IMAGE_VOCAB, text_vocab=TEXT_VOCAB), 16),
            "d256-4+4@16": (M2Config(preset="d256", dim=256, enc_layers=4, dec_layers=4, heads=4,
                                     image_vocab=IMAGE_VOCAB, text_vocab=TEXT_VOCAB), 16),
        }
    )  # fmt: skip
    models, train = {}, {}
    for name, (cfg, B) in configs.items():  # matmul rate re-measured between runs: keep the best
        train[name] = train_step_bench(cfg, B, dev, repeats, amp=gpu, compile_blocks=args.compile)
        models[name] = train[name].pop("model")
        rates.append(matmul_rate(dev, dtype, repeats))
    rate = max(rates)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else rate
    device_name = torch.cuda.get_device_name() if gpu else f"cpu, {torch.get_num_threads()} threads"
    out: dict = {"device": device_name, "dtype": str(dtype), "matmul_flops": rate,
                 "matmul_flops_runs": rates, "peak_flops": peak, "train": train}  # fmt: skip
    print(f"device {device_name}, {dtype}: dense matmul {rate / 1e9:.1f} GFLOP/s (best of "
          f"{[round(r / 1e9, 1) for r in rates]}); MFU peak {peak / 1e9:.1f} GFLOP/s")  # fmt: skip
    print(
        "\n(a) training step: forward + backward + AdamW, 128 input + 128 target tokens per sample"
    )
    for name, r in train.items():
        r["achieved_vs_matmul"] = r["achieved_flops"] / rate
        r["mfu"] = models[name].estimate_mfu(r["tokens_per_s"], peak)
        print(f"  {name:12s} {r['body_params_M']:.1f}M body / {r['params_M']:.1f}M all: step {r['step_s'] * 1e3:.0f} ms "
              f"(forward {r['forward_s'] * 1e3:.0f} ms), {r['tokens_per_s']:,.0f} tokens/s, "
              f"achieved {r['achieved_flops'] / 1e9:.1f} GFLOP/s = {r['achieved_vs_matmul']:.0%} of matmul, "
              f"MFU {r['mfu']:.1%}, decoder mask {r['decoder_mask_ms']:.2f} ms")  # fmt: skip

    gen_model = models["base@128" if gpu else "tiny@16"].eval()
    print("\n(b) chained generation, tiny" if not gpu else "\n(b) chained generation, base",
          "model: coords -> 30-token caption -> coords_next -> tok_rgb_next, 8 MaskGIT steps each")  # fmt: skip
    autocast = torch.autocast(dev, dtype=torch.bfloat16) if gpu else contextlib.nullcontext()
    with autocast:
        rows = generation_bench(gen_model, dev, (1, 8), max(2, repeats // 2))
    out["generate"] = rows
    for B in (1, 8):
        on, off = (
            next(r for r in rows if r["batch"] == B and r["kv_cache"] is c) for c in (True, False)
        )
        print(f"  batch {B}: total {on['total_s'] * 1e3:.0f} ms with cache, {off['total_s'] * 1e3:.0f} ms without; "
              f"caption stage {on['captions_s'] * 1e3:.0f} ms vs {off['captions_s'] * 1e3:.0f} ms "
              f"= {off['captions_s'] / on['captions_s']:.1f}x; stages (cached): "
              + ", ".join(f"{k[:-2]} {v * 1e3:.0f}" for k, v in on.items() if k.endswith("_s") and k != "total_s"))  # fmt: skip

    per_sample = masking_bench()
    out["masking_us_per_sample"] = per_sample * 1e6
    print(f"\n(c) masking: {per_sample * 1e6:.0f} us per sample (default alphas, one core)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
