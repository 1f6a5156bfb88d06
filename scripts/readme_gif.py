"""Make README's picture: the service's own GIF for a held-out synthetic frame.

    python scripts/readme_gif.py --checkpoint checkpoints/m2-demo --out docs/rollout.gif

Renders a clip with a seed the demo never trained on, posts one of its frames to the real
app (in-process, the same code `m2 serve` runs), and saves `GET /rollout.gif` (with the
decoded next key frame beside it).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image
from starlette.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from training.synth.synth import render_clip, sample_spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("checkpoints/m2-demo"))
    ap.add_argument("--out", type=Path, default=Path("docs/rollout.gif"))
    ap.add_argument("--seed", type=int, default=90210, help="synth seed (the demo used 0)")
    ap.add_argument("--action", default="jumping_jacks")
    ap.add_argument("--frame", type=int, default=20)
    args = ap.parse_args(argv)

    clip = render_clip(sample_spec(args.seed, 0, frames=(40, 40), action=args.action))
    buf = io.BytesIO()
    Image.fromarray(clip.frames[args.frame]).save(buf, format="PNG")
    settings = Settings(checkpoint=args.checkpoint, device="cpu", warmup=False)
    with TestClient(create_app(settings)) as client:
        r = client.post(
            "/predict",
            files={"frame": ("frame.png", buf.getvalue(), "image/png")},
            data={"seed": "0", "temperature": "0"},
        )
        if r.status_code != 200:
            print(
                f"readme_gif: error: /predict answered {r.status_code}: {r.text}", file=sys.stderr
            )
            return 2
        body = r.json()
        gif = client.get(f"/rollout.gif?id={body['id']}&side_by_side=true")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(gif.content)
    print(f"wrote {args.out} ({len(gif.content) / 1e3:.0f} kB): caption {body['caption']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
