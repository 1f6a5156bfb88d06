"""Record the small held-out evaluation that tests re-run against a bundled checkpoint.

    python scripts/reproduce_check.py --checkpoint checkpoints/m2-demo --work /tmp/repro

Renders `--clips` clips with a seed the checkpoint never trained on (`m2 synth`), prepares
them with the checkpoint's own tokenizers (`m2 prepare --tokenizer CKPT --all-to test`),
runs `m2 eval` on all of them and writes `CKPT/reproduce.json`: the recipe and the report.
`tests/test_demo_checkpoint.py` follows the same recipe and compares.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.data.prepare import PrepareOptions, prepare
from training.eval.evaluate import evaluate
from training.synth.synth import generate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("checkpoints/m2-demo"))
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (replaced)")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--seed", type=int, default=4242, help="synth seed (the demo used 0)")
    ap.add_argument("--frames", type=int, nargs=2, default=(40, 60))
    ap.add_argument("--samples", type=int, default=512)
    args = ap.parse_args(argv)
    try:
        generate(args.work / "synth", args.clips, seed=args.seed, workers=2,
                 frames=tuple(args.frames), overwrite=True, progress=False)  # fmt: skip
        prepare(PrepareOptions(data=args.work / "synth", tokenizer=args.checkpoint,
                               out=args.work / "prep", workers=2, all_to="test", device="cpu"))  # fmt: skip
        report = evaluate(args.checkpoint, args.work / "prep", args.work / "eval",
                          split="test", samples=args.samples, gifs=0)  # fmt: skip
    except (ValueError, OSError) as e:
        print(f"reproduce_check: error: {e}", file=sys.stderr)
        return 2
    spec = {"clips": args.clips, "seed": args.seed, "frames": list(args.frames),
            "samples": args.samples, "report": report}  # fmt: skip
    out = args.checkpoint / "reproduce.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(spec, indent=1) + "\n")
    tmp.replace(out)
    cn = report["coords_next"]
    print(
        f"wrote {out}: {report['samples']} samples, ADE {cn['ade']:.4f} "
        f"(zero velocity {cn['zero_velocity']['ade']:.4f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
