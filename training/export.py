"""The end of a training run: the serving checkpoint (DESIGN section 8) and GPU peak FLOP/s.

`export_serving_checkpoint` writes model + image tokenizer + text tokenizer + MODEL_CARD.md
through `m2core.checkpoint.save_checkpoint`, which assembles a temporary sibling directory
and swaps it in, so `output_dir/final/` is either the previous export or the new one.

`m2 export` does the same from a training checkpoint, for a run that stopped early or was
trained where the tokenizers could not be packed (weights stored in any float dtype):

    m2 export --from runs/m2-tiny/checkpoints/step-00001429 --data data/prepared --out DIR

With `--best METRIC`, `--from` is a run directory and the export is the kept checkpoint
whose step logged the lowest METRIC (early stopping on validation, e.g. val/ce_coords_next):

    m2 export --from runs/m2-tiny-ft --best val/ce_coords_next --out DIR
"""

from __future__ import annotations

import argparse
import json
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
- Command: `{run.get("command") or (" ".join(["accelerate launch training/train.py", *sys.argv[1:]]) if sys.argv[1:] else "train(config)")}`
- Steps: {run.get("steps")}, tokens: {run.get("tokens"):,}, processes: {run.get("processes") or "n/a"}
- Final training loss: {f"{loss:.4f}" if loss is not None else "n/a"}; throughput {f"{run['tokens_per_s']:,.0f} tokens/s" if run.get("tokens_per_s") else "n/a"}

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
    card = model_card(cfg, meta, val, run)
    found = calibrate(model, cfg, meta)
    if found:
        from m2core.adapters.image import COPY

        extra["calibration"] = {"copy_margin": found}
        margin = found["copy_margin"]
        said = (
            "copying (no margin beat it by more than noise)"
            if margin >= COPY
            else f"{margin:g} nats"
        )
        card += (
            f"\n## Calibrated at export\n- Copy margin: {said} "
            f"(training/calibrate.py): on {found['tokens']:,} validation tokens, from the frame "
            f"alone, {found['accuracy']:.4f} of the next key frame's tokens right against "
            f"{found['copying']:.4f} for copying the frame; {found['changed']:.2%} changed.\n"
        )
    # save_checkpoint builds the directory beside `final` and swaps it in (atomic).
    return save_checkpoint(final, model, image_tokenizer=image_tok, text_tokenizer=text_tok,
                           extra=extra, model_card=card)  # fmt: skip


def calibrate(model: torch.nn.Module, cfg: Any, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The format-2 copy margin, picked on the validation split (None without one)."""
    from m2core.model_v2 import M2ModelV2
    from training.calibrate import calibrate_copy_margin
    from training.data.shards import Shards

    if not isinstance(model, M2ModelV2) or not meta["counts"].get("val", {}).get("samples"):
        return None
    return calibrate_copy_margin(model, Shards(cfg.data_dir, "val", meta))


def export_training_checkpoint(path: Path, out: Path, data_dir: Path | None = None) -> Path:
    """A training checkpoint (`state.json` + `model.safetensors`) -> serving checkpoint."""
    from safetensors.torch import load_file

    from m2core.model import M2Model
    from m2core.model_v2 import M2ConfigV2, M2ModelV2
    from training.builders import model_config
    from training.config import make_config
    from training.data.shards import load_meta
    from training.train_state import STATE_FILE

    state_file = path / STATE_FILE
    if not state_file.is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{path}: not a training checkpoint (needs {STATE_FILE} and model.safetensors)"
        )
    state = json.loads(state_file.read_text())
    config = dict(state["config"])
    if data_dir is not None:
        config["data_dir"] = str(data_dir)
    cfg = make_config(config)
    meta = load_meta(cfg.data_dir)
    mcfg = model_config(cfg, meta)
    model = M2ModelV2(mcfg) if isinstance(mcfg, M2ConfigV2) else M2Model(mcfg)
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)  # casts to fp32
    history = state.get("metrics", {})
    last = history[max(history, key=int)] if history else {}
    val = {k.removeprefix("val/"): v for k, v in last.items() if k.startswith("val/")}
    run = {"train_loss": None, "steps": state["step"], "tokens": state.get("tokens"), "processes": None,
           "command": f"m2 export --from {path}", "exported_from": str(path)}  # fmt: skip
    return export_serving_checkpoint(out, model, cfg, meta, val, run)


def best_checkpoint(run: Path, metric: str) -> tuple[Path, float]:
    """The kept checkpoint of `run` whose step logged the lowest `metric` in
    logs/metrics.jsonl -> (its directory, the value)."""
    from training.train_state import checkpoint_name, list_checkpoints

    log_file = run / "logs" / "metrics.jsonl"
    if not log_file.is_file():
        raise FileNotFoundError(f"{run}: no logs/metrics.jsonl (--best needs a run directory)")
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    kept = {c.name: c for c in list_checkpoints(run / "checkpoints")}
    found = [(float(r[metric]), kept[checkpoint_name(int(r["step"]))])
             for r in rows if metric in r and checkpoint_name(int(r["step"])) in kept]  # fmt: skip
    if not found:
        known = sorted({k for r in rows for k in r})
        raise ValueError(
            f"{run}: no kept checkpoint has {metric!r} logged at its step; logged keys: {known}"
        )
    value, path = min(found, key=lambda f: f[0])
    return path, value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="m2 export", description="Serving checkpoint from a training checkpoint."
    )
    p.add_argument("--from", dest="src", required=True, type=Path, help="checkpoints/step-N dir")
    p.add_argument("--out", required=True, type=Path, help="serving checkpoint dir to write")
    p.add_argument("--data", type=Path, default=None, help="prepared data dir (default: the run's)")
    p.add_argument("--best", metavar="METRIC", default=None,
                   help="--from is a run dir: export its kept checkpoint with the lowest METRIC")  # fmt: skip
    args = p.parse_args(argv)
    try:
        if args.best:
            args.src, value = best_checkpoint(args.src, args.best)
            print(f"{args.best} is lowest at {args.src.name} ({value:.4f})")
        final = export_training_checkpoint(args.src, args.out, args.data)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        print(f"m2 export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.src} -> {final}")
    return 0
