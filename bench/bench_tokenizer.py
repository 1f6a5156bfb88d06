"""Image tokenizer throughput: encode + decode frames/s at batch 1 and batch 32, for a
tokenizer beside today's bundled one, measured in one run with their calls interleaved.

    python bench/bench_tokenizer.py [--tokenizer DIR] [--baseline DIR] [--batch-sizes 1 32]
                                    [--seconds 10] [--json]

Times `encode` and `decode` (eval, no gradient) on random uint8 256x256 frames, after a
warm-up call, and prints frames/s for each and for the round trip, plus the ratio of the
round trip against the baseline (this machine is noisy: compare ratios, not seconds across
runs). Speed depends only on the architecture; without `--tokenizer` it measures an
untrained default tokenizer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from m2core.tokenizers.image import ImageTokenizer

REPO = Path(__file__).resolve().parents[1]


def time_calls(fns: dict[str, callable], seconds: float, rounds: int = 5) -> dict[str, float]:
    """Mean seconds per call of each fn, after one warm-up call each; the fns take turns in
    `rounds` slices of `seconds / rounds`, so a burst of load hits them alike."""
    for fn in fns.values():
        fn()
    spent = dict.fromkeys(fns, 0.0)
    calls = dict.fromkeys(fns, 0)
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            while calls[name] < 1 or time.perf_counter() - start < seconds / rounds:
                fn()
                calls[name] += 1
            spent[name] += time.perf_counter() - start
    return {name: spent[name] / calls[name] for name in fns}


def load(path: str | None) -> ImageTokenizer:
    return ImageTokenizer.from_pretrained(path) if path else ImageTokenizer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="exported tokenizer or checkpoint dir to measure")
    parser.add_argument(
        "--baseline",
        default=str(REPO / "checkpoints" / "m2-demo"),
        help="tokenizer to measure beside it (default: the bundled demo's)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=float, default=10.0, help="time per measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON line per result")
    args = parser.parse_args()

    toks = {"tokenizer": load(args.tokenizer), "baseline": load(args.baseline)}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}")
    for name, tok in toks.items():
        tok.to(args.device).eval()
        print(
            f"{name}: {tok.num_params() / 1e6:.2f}M params, levels {list(tok.config.levels)} "
            f"(vocab {tok.vocab_size})"
        )
    gen = torch.Generator().manual_seed(0)
    for bs in args.batch_sizes:
        images = torch.randint(0, 256, (bs, 256, 256, 3), dtype=torch.uint8, generator=gen)
        images = images.to(args.device)
        fns = {}
        for name, tok in toks.items():
            ids = tok.encode(images)
            fns[f"{name}.encode"] = lambda tok=tok, images=images: (tok.encode(images), sync())
            fns[f"{name}.decode"] = lambda tok=tok, ids=ids: (tok.decode(ids), sync())
        secs = time_calls(fns, args.seconds)
        rows = {}
        for name in toks:
            t_enc, t_dec = secs[f"{name}.encode"], secs[f"{name}.decode"]
            rows[name] = {
                "batch": bs,
                "tokenizer": name,
                "encode_fps": bs / t_enc,
                "decode_fps": bs / t_dec,
                "round_trip_fps": bs / (t_enc + t_dec),
            }
        ratio = rows["baseline"]["round_trip_fps"] / rows["tokenizer"]["round_trip_fps"]
        rows["tokenizer"]["time_vs_baseline"] = ratio
        for row in rows.values():
            if args.json:
                print(json.dumps(row))
            else:
                print(
                    f"batch {bs:3d} {row['tokenizer']:>9}: encode {row['encode_fps']:7.1f} "
                    f"frames/s, decode {row['decode_fps']:7.1f} frames/s, encode+decode "
                    f"{row['round_trip_fps']:7.1f} frames/s"
                    + (f" ({ratio:.2f}x the baseline's time)" if row is rows["tokenizer"] else "")
                )


if __name__ == "__main__":
    main()
