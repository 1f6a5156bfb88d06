"""Train the image tokenizer (FSQ autoencoder) on the frames of a Penn-Action-layout folder.

    m2 train-tokenizer --data DIR --out DIR [--config configs/tokenizer.yaml] [key=value ...]
    accelerate launch training/train_tokenizer.py --data DIR --out DIR ...   (same script)

The loop, step by step: set the learning rate (linear warm-up, cosine decay) -> sample a
batch of random crops from the training frames -> reconstruct -> loss (L1 + MSE + an
edge term on image gradients) -> backward, clip, step -> every `eval_every` steps the
held-out PSNR -> every `checkpoint_every` steps an atomic checkpoint. A run restarted
with the same `--out` resumes from its last checkpoint. At the end it exports
`OUT/config.json` + `OUT/model.safetensors` (what `ImageTokenizer.from_pretrained` and
the serving checkpoint take) and writes `OUT/metrics.json`: held-out PSNR beside the
block-mean and nearest baselines, codebook usage and training time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from m2core.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, atomic_write
from training import tokenizer_data as data

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # OUT/checkpoints/step-000500/, OUT/checkpoints/latest.json


@dataclass(frozen=True)
class TokenizerTrainConfig:
    """Everything a run needs besides --data and --out. configs/tokenizer.yaml sets the same."""

    # model (ImageTokenizerConfig)
    levels: tuple[int, ...] = (8, 8, 8, 8)
    channels: tuple[int, ...] = (32, 64, 128, 128)
    res_blocks: int = 2
    # optimisation
    steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    crop: int = 128  # random square crops (multiple of 16); convolutions see full frames later
    # loss weights
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    edge_weight: float = 0.5
    # data
    val_fraction: float = 0.15  # held-out share of clips when the labels mark no test clips
    max_train_frames: int = 4000  # evenly spaced over the training clips
    val_frames: int = 512  # held-out frames for the final metrics
    eval_frames: int = 64  # held-out frames for the periodic PSNR
    # bookkeeping
    eval_every: int = 250
    checkpoint_every: int = 250
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "crop", "eval_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError(f"lr must be > 0 and min_lr >= 0, got {self.lr}, {self.min_lr}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        down = self.model_config().downsample
        if self.crop % down or self.crop > self.model_config().image_size:
            raise ValueError(f"crop must be a multiple of {down} and at most 256, got {self.crop}")

    def model_config(self) -> ImageTokenizerConfig:
        return ImageTokenizerConfig(self.levels, self.channels, self.res_blocks)


MODEL_KEYS = ("levels", "channels", "res_blocks")


# --- Config loading: YAML defaults, key=value overrides, unknown keys name themselves --------


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple = ()
) -> TokenizerTrainConfig:
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: cannot read config ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of key: value")
        for key, value in loaded.items():
            values[_check_key(key, str(path))] = value
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        values[_check_key(key.strip(), "overrides")] = yaml.safe_load(raw)
    hints = get_type_hints(TokenizerTrainConfig)
    typed = {key: _coerce(key, value, hints[key]) for key, value in values.items()}
    try:
        return TokenizerTrainConfig(**typed)
    except ValueError as exc:
        raise ValueError(f"bad tokenizer config: {exc}") from exc


def _check_key(key: str, source: str) -> str:
    names = [f.name for f in fields(TokenizerTrainConfig)]
    if key not in names:
        raise ValueError(f"unknown config key {key!r} in {source} (known: {', '.join(names)})")
    return key


def _coerce(key: str, value: Any, hint: Any) -> Any:
    name = {int: "an integer", float: "a number"}.get(hint, "a list of integers")
    bad = ValueError(f"config key {key!r} expects {name}, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    # tuple[int, ...]
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise bad
    return tuple(value)


# --- Loss and schedule ----------------------------------------------------------------------


def recon_loss(
    recon: torch.Tensor, target: torch.Tensor, cfg: TokenizerTrainConfig
) -> torch.Tensor:
    """L1 + MSE on pixels + L1 on horizontal/vertical differences (keeps edges sharp)."""
    diff = recon - target
    loss = cfg.l1_weight * diff.abs().mean() + cfg.mse_weight * diff.square().mean()
    if cfg.edge_weight:
        dx = diff[..., :, 1:] - diff[..., :, :-1]  # = grad(recon) - grad(target)
        dy = diff[..., 1:, :] - diff[..., :-1, :]
        loss = loss + cfg.edge_weight * (dx.abs().mean() + dy.abs().mean())
    return loss


def lr_at(step: int, cfg: TokenizerTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def sample_batch(
    frames: torch.Tensor, cfg: TokenizerTrainConfig, gen: torch.Generator
) -> torch.Tensor:
    """Random crops (with random horizontal flips) -> float (B, 3, crop, crop) in [-1, 1]."""
    n, size = len(frames), frames.shape[1]
    idx = torch.randint(n, (cfg.batch_size,), generator=gen)
    ys = torch.randint(size - cfg.crop + 1, (cfg.batch_size,), generator=gen)
    xs = torch.randint(size - cfg.crop + 1, (cfg.batch_size,), generator=gen)
    flips = torch.rand(cfg.batch_size, generator=gen) < 0.5
    crops = []
    for i, y, x, f in zip(idx.tolist(), ys.tolist(), xs.tolist(), flips.tolist(), strict=True):
        crop = frames[i, y : y + cfg.crop, x : x + cfg.crop]
        crops.append(crop.flip(1) if f else crop)
    batch = torch.stack(crops).permute(0, 3, 1, 2).float()
    return batch.div_(127.5).sub_(1.0).contiguous(memory_format=torch.channels_last)


# --- Checkpoints (safetensors + JSON, atomic by directory rename) ----------------------------


def save_checkpoint(out: Path, step: int, model, optimizer, gen: torch.Generator, cfg) -> Path:
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        str(tmp / "model.safetensors"),
    )
    opt = optimizer.state_dict()
    tensors = {
        f"{i}.{k}": v.detach().cpu().contiguous()
        for i, s in opt["state"].items()
        for k, v in s.items()
    }
    tensors["rng"] = gen.get_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"step": step, "config": asdict(cfg), "param_groups": opt["param_groups"]}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    atomic_write(
        root / "latest.json", lambda p: Path(p).write_text(json.dumps({"dir": final.name}))
    )
    for old in root.glob("step-*"):  # keep only the latest
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out: Path, model, optimizer, gen: torch.Generator, cfg) -> int:
    """Restore the latest checkpoint under `out`; returns the step to continue from (0 if none)."""
    pointer = out / CHECKPOINTS / "latest.json"
    if not pointer.is_file():
        return 0
    try:
        ckpt = out / CHECKPOINTS / json.loads(pointer.read_text())["dir"]
        meta = json.loads((ckpt / "state.json").read_text())
        weights = load_file(str(ckpt / "model.safetensors"))
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
    except Exception as exc:  # missing or damaged files: json, OS and safetensors errors
        raise ValueError(f"{pointer.parent}: cannot resume from the checkpoint ({exc})") from exc
    saved = meta["config"]
    for key in MODEL_KEYS:
        if json.loads(json.dumps(getattr(cfg, key))) != saved[key]:
            raise ValueError(
                f"{ckpt}: checkpoint has {key}={saved[key]}, config asks {getattr(cfg, key)}; "
                "use a new --out or the same model settings"
            )
    model.load_state_dict(weights, strict=True)
    gen.set_state(tensors.pop("rng"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        i, key = name.split(".", 1)
        state.setdefault(int(i), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"])


# --- Training -------------------------------------------------------------------------------


def train(data_dir: str | Path, out: str | Path, cfg: TokenizerTrainConfig) -> dict[str, Any]:
    """Train (or resume), export to `out`, and return the final held-out metrics."""
    data_dir, out = Path(data_dir), Path(out)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such data directory")
    accelerator = Accelerator()
    main = accelerator.is_main_process
    torch.manual_seed(cfg.seed)

    model = ImageTokenizer(cfg.model_config())
    decay = [p for p in model.parameters() if p.ndim > 1]
    other = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": other, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.99),
    )
    gen = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    start = load_checkpoint(out, model, optimizer, gen, cfg)
    if start:
        log.info("resuming from step %d", start)

    train_clips, val_clips = data.split_clips(data_dir, cfg.val_fraction)
    train_refs = data.spread(data.frame_refs(train_clips), cfg.max_train_frames)
    val_refs = data.spread(data.frame_refs(val_clips), cfg.val_frames)
    log.info(
        "%d training clips (%d frames used), %d held-out clips (%d frames)",
        len(train_clips),
        len(train_refs),
        len(val_clips),
        len(val_refs),
    )
    frames = data.load_frames(train_refs, "training frames")
    val = data.load_frames(val_refs, "held-out frames") if main else None
    eval_subset = val[data.spread_index(len(val), cfg.eval_frames)] if main else None
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    log.info("tokenizer: %.2fM parameters, vocab %d", raw.num_params() / 1e6, raw.vocab_size)

    history: list[dict[str, float]] = []
    started = time.perf_counter()
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        disable=not main,
        desc="tokenizer",
        dynamic_ncols=True,
    )
    for step in bar:
        # 1. learning rate for this step
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        # 2. forward / backward / step
        model.train()
        batch = sample_batch(frames, cfg, gen).to(accelerator.device)
        recon, _ = model(batch)
        loss = recon_loss(recon, batch, cfg)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.clip_grad:
            accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        done = step + 1
        # 3. periodic held-out PSNR and checkpoint
        postfix = {"loss": f"{loss.item():.4f}"}
        if main and (done % cfg.eval_every == 0 or done == cfg.steps):
            metrics = data.evaluate(raw, eval_subset, baselines=False)
            history.append({"step": done, "loss": loss.item(), "psnr": metrics["psnr"]})
            postfix["val_psnr"] = f"{metrics['psnr']:.2f}"
            log.info(
                "step %d: loss %.4f, held-out PSNR %.2f dB", done, loss.item(), metrics["psnr"]
            )
        bar.set_postfix(postfix, refresh=False)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            accelerator.wait_for_everyone()
            if main:
                save_checkpoint(out, done, raw, optimizer, gen, cfg)
    bar.close()
    train_seconds = time.perf_counter() - started

    # 4. export and final metrics on all held-out frames
    accelerator.wait_for_everyone()
    result: dict[str, Any] = {}
    if main:
        raw.eval()
        raw.save_pretrained(out)
        result = {
            "held_out": data.evaluate(raw, val),
            "held_out_clips": len(val_clips),
            "train_clips": len(train_clips),
            "train_frames": len(train_refs),
            "steps": cfg.steps,
            "resumed_from": start,
            "train_seconds_this_run": round(train_seconds, 1),
            "device": str(accelerator.device),
            "processes": accelerator.num_processes,
            "history": history,
            "config": asdict(cfg),
        }
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(out / "metrics.json", lambda p: Path(p).write_text(text))
    return result


# --- CLI ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="m2 train-tokenizer",
        description="Train the FSQ image tokenizer on a Penn-Action-layout folder; resumes from "
        "OUT's last checkpoint and exports OUT/config.json + OUT/model.safetensors.",
    )
    parser.add_argument(
        "--data", required=True, help="Penn-Action-layout folder (frames/, labels/)"
    )
    parser.add_argument("--out", required=True, help="output folder (checkpoints, export, metrics)")
    parser.add_argument(
        "--config", help="YAML config (default: built-in, same as configs/tokenizer.yaml)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(args.data, args.out, cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"m2 train-tokenizer: error: {exc}", file=sys.stderr)
        return 2
    if result:
        h = result["held_out"]
        print(
            f"held-out PSNR {h['psnr']:.2f} dB (block mean {h['psnr_block_mean']:.2f}, "
            f"nearest {h['psnr_nearest']:.2f}) on {h['frames']} frames; codebook usage "
            f"{h['codebook_usage']:.1%} ({h['ids_used']}/{h['vocab_size']}); "
            f"trained {result['train_seconds_this_run']:.0f} s; export in {args.out}"
        )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
