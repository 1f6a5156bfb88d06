"""The end of a training run: the serving checkpoint (DESIGN section 8) and GPU peak FLOP/s.

`export_serving_checkpoint` writes model + image tokenizer + text tokenizer + MODEL_CARD.md
through `m2core.checkpoint.save_checkpoint`, which assembles a temporary sibling directory
and swaps it in, so `output_dir/final/` is either the previous export or the new one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import yaml

# Dense peak FLOP/s per GPU (vendor datasheets, SXM parts): {name fragment: {dtype: peak}}.
# "fp32" is the non-tensor-core rate; "tf32" applies when tf32=true lets matmuls use it.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12},
}


def peak_flops(device: torch.device, dtype: str, tf32: bool = False) -> float | None:
    """Datasheet peak of the current GPU for `dtype`, or None (CPU / unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = "tf32" if dtype == "fp32" and tf32 else dtype
    for fragment, table in PEAK_FLOPS.items():
        if fragment in name:
            return table[key]
    return None


def model_card(cfg: Any, meta: dict[str, Any], val: dict[str, float], run: dict[str, Any]) -> str:
    counts = meta.get("counts", {})
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in val.items()) or "| (no validation split) | |"
    splits = ", ".join(
        f"{s}: {c.get('samples', 0)} samples / {c.get('clips', 0)} clips" for s, c in counts.items()
    )
    source = meta.get("source", {})
    loss = run.get("train_loss")
    return f"""# M2 model card

A 4M-style multimodal encoder-decoder that forecasts a person's next six skeletons, a
caption and the next key frame's image tokens from one video frame.

## Training
- Command: `{" ".join(["accelerate launch training/train.py", *sys.argv[1:]]) if sys.argv[1:] else "train(config)"}`
- Steps: {run.get("steps")}, tokens: {run.get("tokens"):,}, processes: {run.get("processes")}
- Final training loss: {f"{loss:.4f}" if loss is not None else "n/a"}; throughput {run.get("tokens_per_s", 0):,.0f} tokens/s

## Data
- Source: {source.get("kind", "?")} at `{source.get("path", "?")}`
- Splits (by clip): {splits}
- Key-frame stride {meta.get("stride")}, captions from {meta.get("captions_from", meta.get("captioner", "?"))}
- Image vocabulary {meta.get("image_vocab")}, caption vocabulary {meta.get("text_vocab")} ({meta.get("caption_vocab", "compact")}), caption length {meta.get("caption_len")}
- Tokenizer hashes: image `{meta.get("tokenizers", {}).get("image_sha256", "?")[:16]}`, text `{meta.get("tokenizers", {}).get("text_sha256", "?")[:16]}`

## Validation cross-entropy (masked, per modality)
| modality | CE |
|---|---|
{rows}

Full evaluation (PCK, ADE/FDE against baselines, BLEU): `m2 eval --checkpoint DIR --data DIR --out DIR`.

## Config
```yaml
{yaml.safe_dump(cfg.to_dict(), sort_keys=False).strip()}
```
"""


def export_serving_checkpoint(
    final: Path,
    model: torch.nn.Module,
    cfg: Any,
    meta: dict[str, Any],
    val: dict[str, float],
    run: dict[str, Any],
) -> Path:
    """Write `final/` (model, tokenizers from the prepared data dir, model card) atomically."""
    from m2core.checkpoint import save_checkpoint
    from m2core.tokenizers.image import ImageTokenizer
    from m2core.tokenizers.text import TextTokenizer

    data = Path(cfg.data_dir)
    image_tok = ImageTokenizer.from_pretrained(data / "image_tokenizer")
    text_tok = TextTokenizer.load(data)
    extra = {"training": {"config": cfg.to_dict(), "run": run, "val_ce": val},
             "data": {k: meta.get(k) for k in ("source", "counts", "stride", "future_offsets", "captions_from", "actions", "tokenizers")}}  # fmt: skip
    # save_checkpoint builds the directory beside `final` and swaps it in (atomic).
    return save_checkpoint(final, model, image_tokenizer=image_tok, text_tokenizer=text_tok,
                           extra=extra, model_card=model_card(cfg, meta, val, run))  # fmt: skip
