"""Train the image tokenizer (FSQ autoencoder) on the frames of a Penn-Action-layout folder.

    m2 train-tokenizer --data DIR --out DIR [--config configs/tokenizer.yaml] [key=value ...]
    accelerate launch training/tokenizer/train.py --data DIR --out DIR ...   (same script)

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
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

import torch
import yaml
from accelerate import Accelerator
from tqdm import tqdm

from m2core.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, atomic_write
from training.tokenizer import data
from training.tokenizer.state import Budget, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerTrainConfig:
    """Everything a run needs besides --data and --out. configs/tokenizer.yaml sets the same."""

    # model (ImageTokenizerConfig)
    levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)
    channels: tuple[int, ...] = (32, 64, 128, 128)
    res_blocks: int = 2
    # optimisation
    steps: int = 20000  # time_budget cuts it to what fits
    batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 200
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    crop: int = 128  # random square crops (multiple of 16); convolutions see full frames later
    # loss weights
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    edge_weight: float = 0.5
    limb_weight: float = 4.0  # extra loss weight on limb-band pixels (1 + limb_weight there)
    # data
    val_fraction: float = 0.15  # held-out share of clips when the labels mark no test clips
    max_train_frames: int = 8000  # evenly spaced over the training clips
    val_frames: int = 512  # held-out frames for the final metrics
    eval_frames: int = 64  # held-out frames for the periodic PSNR
    # bookkeeping
    eval_every: int = 1000
    checkpoint_every: int = 500
    time_budget: float = 45.0  # minutes; > 0 fits the step count (and its schedule) to it
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "crop", "eval_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError(f"lr must be > 0 and min_lr >= 0, got {self.lr}, {self.min_lr}")
        if self.limb_weight < 0 or self.time_budget < 0:
            raise ValueError(
                f"limb_weight and time_budget must be >= 0, got {self.limb_weight}, "
                f"{self.time_budget}"
            )
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        down = self.model_config().downsample
        if self.crop % down or self.crop > self.model_config().image_size:
            raise ValueError(f"crop must be a multiple of {down} and at most 256, got {self.crop}")

    def model_config(self) -> ImageTokenizerConfig:
        return ImageTokenizerConfig(self.levels, self.channels, self.res_blocks)


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
    recon: torch.Tensor,
    target: torch.Tensor,
    cfg: TokenizerTrainConfig,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """L1 + MSE on pixels + L1 on horizontal/vertical differences (keeps edges sharp), each a
    mean over pixels weighted by `weight` (B, 1, H, W) when given (the limb band's)."""

    def mean(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        return x.mean() if w is None else (x * w).mean() / w.mean()

    diff = recon - target
    loss = cfg.l1_weight * mean(diff.abs(), weight) + cfg.mse_weight * mean(diff.square(), weight)
    if cfg.edge_weight:
        dx = diff[..., :, 1:] - diff[..., :, :-1]  # = grad(recon) - grad(target)
        dy = diff[..., 1:, :] - diff[..., :-1, :]
        wx = None if weight is None else weight[..., :, 1:]
        wy = None if weight is None else weight[..., 1:, :]
        loss = loss + cfg.edge_weight * (mean(dx.abs(), wx) + mean(dy.abs(), wy))
    return loss


def lr_at(step: int, cfg: TokenizerTrainConfig, total: int | None = None) -> float:
    """Linear warm-up, then cosine from lr to min_lr over `total` steps (cfg.steps)."""
    total = cfg.steps if total is None else total
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def sample_batch(
    frames: torch.Tensor,
    cfg: TokenizerTrainConfig,
    gen: torch.Generator,
    bands: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random crops (with random horizontal flips) -> float (B, 3, crop, crop) in [-1, 1],
    and with `bands` their pixel weights (B, 1, crop, crop): 1 + limb_weight on the band."""
    n, size = len(frames), frames.shape[1]
    idx = torch.randint(n, (cfg.batch_size,), generator=gen)
    ys = torch.randint(size - cfg.crop + 1, (cfg.batch_size,), generator=gen)
    xs = torch.randint(size - cfg.crop + 1, (cfg.batch_size,), generator=gen)
    flips = torch.rand(cfg.batch_size, generator=gen) < 0.5
    crops, masks = [], []
    for i, y, x, f in zip(idx.tolist(), ys.tolist(), xs.tolist(), flips.tolist(), strict=True):
        crop = frames[i, y : y + cfg.crop, x : x + cfg.crop]
        crops.append(crop.flip(1) if f else crop)
        if bands is not None:
            mask = bands[i, y : y + cfg.crop, x : x + cfg.crop]
            masks.append(mask.flip(1) if f else mask)
    batch = torch.stack(crops).permute(0, 3, 1, 2).float()
    batch = batch.div_(127.5).sub_(1.0).contiguous(memory_format=torch.channels_last)
    if bands is None:
        return batch, None
    weight = 1.0 + cfg.limb_weight * torch.stack(masks).unsqueeze(1).float()
    return batch, weight


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
    start, total = load_checkpoint(out, model, optimizer, gen, cfg)
    total = total or cfg.steps
    if start:
        log.info("resuming from step %d of %d", start, total)

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
    if cfg.limb_weight:  # the band is only drawn when the loss weights it
        frames, bands = data.load_frames(train_refs, "training frames", bands=True)
    else:
        frames, bands = data.load_frames(train_refs, "training frames"), None
    val, val_bands = (
        data.load_frames(val_refs, "held-out frames", bands=True) if main else (None, None)
    )
    sub = data.spread_index(len(val), cfg.eval_frames) if main else []
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    log.info("tokenizer: %.2fM parameters, vocab %d", raw.num_params() / 1e6, raw.vocab_size)

    history: list[dict[str, float]] = []
    started = time.perf_counter()
    budget = Budget(cfg, accelerator) if cfg.time_budget and start == 0 else None
    bar = tqdm(initial=start, total=total, disable=not main, desc="tokenizer", dynamic_ncols=True)
    step = start
    while step < total:
        # 1. learning rate for this step
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, total)
        # 2. forward / backward / step
        model.train()
        batch, weight = sample_batch(frames, cfg, gen, bands)
        batch = batch.to(accelerator.device)
        weight = None if weight is None else weight.to(accelerator.device)
        recon, _ = model(batch)
        loss = recon_loss(recon, batch, cfg, weight)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.clip_grad:
            accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        step += 1
        bar.update()
        # 3. time_budget: once steps/s is known, the schedule's length fits the minutes
        if budget is not None and (fitted := budget.fit(step)) is not None:
            total, budget = min(total, fitted), None
            bar.total = total
            log.info("time_budget %.1f min: %d steps", cfg.time_budget, total)
        # 4. periodic held-out PSNR and checkpoint
        postfix = {"loss": f"{loss.item():.4f}"}
        if main and (step % cfg.eval_every == 0 or step == total):
            t0 = time.perf_counter()
            metrics = data.evaluate(raw, val[sub], baselines=False, bands=val_bands[sub])
            if budget is not None:
                budget.skip(time.perf_counter() - t0)
            history.append(
                {"step": step, "loss": loss.item(), "psnr": metrics["psnr"],
                 "psnr_limb_band": metrics["psnr_limb_band"]}
            )  # fmt: skip
            postfix["val_psnr"] = f"{metrics['psnr']:.2f}"
            log.info(
                "step %d: loss %.4f, held-out PSNR %.2f dB (limb band %.2f dB)",
                step, loss.item(), metrics["psnr"], metrics["psnr_limb_band"],
            )  # fmt: skip
        bar.set_postfix(postfix, refresh=False)
        if step % cfg.checkpoint_every == 0 or step == total:
            accelerator.wait_for_everyone()
            if main:
                save_checkpoint(out, step, raw, optimizer, gen, cfg, total)
    bar.close()
    train_seconds = time.perf_counter() - started

    # 4. export and final metrics on all held-out frames
    accelerator.wait_for_everyone()
    result: dict[str, Any] = {}
    if main:
        raw.eval()
        raw.save_pretrained(out)
        result = {
            "held_out": data.evaluate(raw, val, bands=val_bands),
            "held_out_clips": len(val_clips),
            "train_clips": len(train_clips),
            "train_frames": len(train_refs),
            "steps": total,
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
