"""`m2 tokenize-image`: round-trip one image through the image tokenizer.

    m2 tokenize-image IMAGE --tokenizer DIR --out FILE

The image is letterboxed to 256x256 (longer side scaled, centred, black padding),
encoded to a 16x16 grid of ids and decoded again; FILE receives the 256x256
reconstruction (format from its suffix, PNG recommended) and the command prints the PSNR
against the letterboxed original. `--tokenizer` takes an exported tokenizer dir (what
`m2 train-tokenizer` writes) or a serving checkpoint dir (which holds `image_tokenizer/`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from m2core.geometry import letterbox, load_image
from m2core.tokenizers.image import ImageTokenizer, atomic_write, psnr


def round_trip(
    tokenizer: ImageTokenizer, image_path: str | Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(letterboxed frame, reconstruction, ids (16, 16)) of one image file."""
    frame, _ = letterbox(load_image(image_path))
    ids = tokenizer.encode(frame[None])
    recon = tokenizer.decode(ids)[0].cpu().numpy()
    return frame, recon, ids[0].cpu().numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="m2 tokenize-image",
        description="Letterbox IMAGE to 256x256, encode it to 16x16 ids, decode it and write "
        "the reconstruction; prints the PSNR against the letterboxed original.",
    )
    parser.add_argument("image", help="image file (JPEG, PNG, WebP, ...)")
    parser.add_argument(
        "--tokenizer", required=True, help="exported tokenizer dir or serving checkpoint dir"
    )
    parser.add_argument(
        "--out", required=True, help="where to write the 256x256 reconstruction (.png)"
    )
    parser.add_argument("--ids", help="also write the 16x16 ids as JSON here")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        suffix = out.suffix.lower()
        fmt = Image.registered_extensions().get(suffix)
        if fmt is None:
            raise ValueError(f"{out}: unknown image suffix {suffix!r} (use .png)")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"{out.parent}: output folder does not exist")
        tokenizer = ImageTokenizer.from_pretrained(args.tokenizer)
        frame, recon, ids = round_trip(tokenizer, args.image)
        atomic_write(out, lambda p: Image.fromarray(recon).save(p, format=fmt))
        if args.ids:
            text = json.dumps({"grid": list(ids.shape), "ids": ids.tolist()})
            atomic_write(Path(args.ids), lambda p: Path(p).write_text(text))
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"m2 tokenize-image: error: {exc}", file=sys.stderr)
        return 2
    value = float(psnr(recon, frame))
    print(
        f"PSNR {value:.2f} dB (256x256 letterboxed frame vs reconstruction, "
        f"{len(np.unique(ids))} distinct ids of {tokenizer.vocab_size}); wrote {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
