"""Image tokenizer throughput: encode + decode frames/s at batch 1 and batch 32.

    python bench/bench_tokenizer.py [--tokenizer DIR] [--batch-sizes 1 32] [--seconds 10]

Times `encode` and `decode` (eval, no gradient) on random uint8 256x256 frames, after a
warm-up call, and prints frames/s for each and for the round trip. Speed depends only on
the architecture, so without `--tokenizer` it uses a freshly initialised default tokenizer.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from m2core.tokenizers.image import ImageTokenizer


def time_call(fn, seconds: float) -> float:
    """Mean seconds per call of `fn`, after one warm-up call, over at least `seconds`."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokenizer", help="exported tokenizer or checkpoint dir (default: untrained)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=float, default=10.0, help="time per measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON line per result")
    args = parser.parse_args()

    tok = ImageTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else ImageTokenizer()
    tok = tok.to(args.device).eval()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, "
        f"{tok.num_params() / 1e6:.2f}M params, vocab {tok.vocab_size}"
    )
    gen = torch.Generator().manual_seed(0)
    for bs in args.batch_sizes:
        images = torch.randint(0, 256, (bs, 256, 256, 3), dtype=torch.uint8, generator=gen)
        images = images.to(args.device)
        ids = tok.encode(images)

        def enc(images=images):
            tok.encode(images)
            sync()

        def dec(ids=ids):
            tok.decode(ids)
            sync()

        t_enc, t_dec = time_call(enc, args.seconds), time_call(dec, args.seconds)
        row = {
            "batch": bs,
            "encode_fps": bs / t_enc,
            "decode_fps": bs / t_dec,
            "round_trip_fps": bs / (t_enc + t_dec),
        }
        if args.json:
            print(json.dumps(row))
        else:
            print(
                f"batch {bs:3d}: encode {row['encode_fps']:7.1f} frames/s, decode "
                f"{row['decode_fps']:7.1f} frames/s, encode+decode {row['round_trip_fps']:7.1f} frames/s"
            )


if __name__ == "__main__":
    main()
