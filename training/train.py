"""Train M2 on prepared token shards, with accelerate (one CPU, one GPU, many GPUs).

    accelerate launch training/train.py --config configs/m2-base.yaml [key=value ...]
    m2 train --config configs/m2-tiny.yaml [key=value ...]
    from training.train import train; train("configs/m2-tiny.yaml", ["total_tokens=1"])

One step, as nanoGPT lays it out: set the lr (a function of tokens) -> micro-steps
(forward, backward; gradients synchronised on the last) -> clip -> optimizer step ->
log (loss per modality, tokens/s, data wait, MFU on GPU) -> evaluate / checkpoint at
their token intervals. The samples of step k are fixed by (seed, k) (training/data/shards.py),
so a resumed run (`resume=auto`) continues exactly as if it had not stopped, and 1 process
x 2 accumulation steps matches 2 processes. At the end the serving checkpoint goes to
`output_dir/final/` (model + both tokenizers + MODEL_CARD.md).

Layout of `output_dir`: `checkpoints/step-XXXXXXXX/` (training state, newest `keep`),
`logs/metrics.csv|jsonl` (+ TensorBoard when installed), `final/`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from m2core.denormals import flush_denormals
from m2core.masking import collate, mask_sample
from m2core.model_v2 import M2ConfigV2
from training import train_state as ts
from training.builders import (
    ShortBatch,
    build_model,
    masking_config,
    model_config,
    param_groups,
    short_batch,
)
from training.config import TrainConfig, make_config
from training.data.shards import MaskedDataset, Shards, StepSampler, load_meta
from training.export import export_serving_checkpoint, peak_flops
from training.losses import accumulate, modality_ce, to_device
from training.monitor import Window, evaluate, log_window
from training.plan import (
    Plan,
    calibrate,
    format_duration,
    lr_at,
    make_plan,
    refit,
    with_total_steps,
)
from training.trackers import available_trackers

log = logging.getLogger("training.train")
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None  # None when the run stopped early (stop_after_steps)
    step: int
    tokens: int
    losses: list[float] = field(default_factory=list)  # per step of this call
    val: dict[str, float] = field(default_factory=dict)  # last validation CE per modality
    tokens_per_s: float = 0.0
    data_wait_share: float = 0.0
    finished: bool = False  # the token budget is spent (final_dir is None only with export=false)


@dataclass
class _Run:
    """What the named steps of `train()` share: the config and its plan, the accelerator,
    the model and optimizer, the data, and the progress so far."""

    cfg: TrainConfig
    plan: Plan
    acc: Accelerator
    model: nn.Module
    optimizer: Any
    meta: dict[str, Any]
    train_shards: Shards
    val_shards: Shards | None
    t_start: float  # time_budget counts from here
    step: int = 0
    history: dict[str, Any] = field(default_factory=dict)
    fitted: dict[str, float] | None = None  # what time_budget measured and chose
    result: TrainResult | None = None
    eval_took: float = 0.0  # seconds of the last validation pass (time_budget counts them)
    masks: dict[str, Any] = field(default_factory=dict)  # "main" / "short" -> mask_fn
    short: ShortBatch | None = None
    v2: bool = False  # a format-2 model: its forward returns its per-modality losses
    names: tuple[str, ...] = ()  # the model's modalities, registry order
    peak: float | None = None  # the device's peak FLOP/s, for MFU
    refit_every: int = 0  # time_budget: steps between speed checks after calibration

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def stop_at(self) -> int:
        return min(self.plan.total_steps, self.cfg.stop_after_steps or self.plan.total_steps)


def train(
    config: TrainConfig | str | Path | dict, overrides: list[str] | tuple[str, ...] = ()
) -> TrainResult:
    """Run (or continue) the training described by `config`; see the module docstring."""
    if not flush_denormals():
        log.info("subnormal floats are not flushed in every thread: late steps may be slower")
    run = _open(config, overrides, time.perf_counter())
    batches = _loaders(run)
    _loop(run, batches)
    return _finish(run)


def _open(config, overrides, t_start: float) -> _Run:
    """Config and plan, data, accelerator, model (fresh, initial weights or resumed) and
    optimizer."""
    cfg = make_config(config, overrides)
    out = Path(cfg.output_dir)
    resume_from = ts.resume_path(cfg, out / "checkpoints")
    # The launcher (accelerate launch / torchrun) says how many processes there will be.
    plan = make_plan(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if ts.is_main():
        log.info("plan: %s", plan.describe())
        if cfg.plan_devices and cfg.plan_devices != plan.devices:
            log.info("plan on %d devices (plan_devices): %s", cfg.plan_devices,
                     make_plan(cfg, cfg.plan_devices).describe())  # fmt: skip
    meta = load_meta(cfg.data_dir)
    train_shards = Shards(cfg.data_dir, "train", meta)
    has_val = meta["counts"].get("val", {}).get("samples")
    val_shards = Shards(cfg.data_dir, "val", meta) if has_val else None
    mcfg = model_config(cfg, meta)
    if mcfg.action_classes and len(meta.get("actions", ())) > mcfg.action_classes:
        raise ValueError(
            f"model.action_classes={mcfg.action_classes} but {cfg.data_dir} has "
            f"{len(meta['actions'])} actions ({', '.join(meta['actions'])})"
        )
    short = short_batch(cfg)
    if short is not None and not isinstance(mcfg, M2ConfigV2):
        raise ValueError("short_batch needs a format-2 model (model: {format: 2})")
    resume_step = None
    if resume_from is not None:
        resume_step = int(json.loads((resume_from / ts.STATE_FILE).read_text())["step"])
    acc = Accelerator(
        cpu=cfg.cpu,
        # a batch may hold no targets of some modality: its head then gets no gradient
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        mixed_precision=MIXED_PRECISION[cfg.dtype],
        log_with=available_trackers(out / "logs", resume_step) if ts.is_main() else None,
        project_dir=str(out),
    )
    if acc.num_processes != plan.devices:
        raise ValueError(
            f"WORLD_SIZE says {plan.devices} processes, accelerate has {acc.num_processes}"
        )
    if cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(cfg, mcfg, train_shards, val_shards, fresh=resume_from is None)
    model = model.to(acc.device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  fused=acc.device.type == "cuda")  # fmt: skip
    run = _Run(cfg, plan, acc, model, optimizer, meta, train_shards, val_shards, t_start)
    run.short, run.names, run.v2 = short, model.names, isinstance(mcfg, M2ConfigV2)
    run.peak = cfg.peak_flops or peak_flops(acc.device, cfg.dtype, cfg.tf32)
    rng = state = None
    if resume_from is not None:
        state, rng = ts.load_training_state(resume_from, model, optimizer)
        if state["tokens_per_step"] != plan.tokens_per_step:
            raise ValueError(
                f"resume from {resume_from}: it ran {state['tokens_per_step']:,} tokens/step, this run "
                f"{plan.tokens_per_step:,} (batch_size x processes x grad_accum x tokens/sample must match)"
            )
        run.step, run.history = int(state["step"]), state.get("metrics", {})
        run.fitted = state.get("fitted")
        if run.fitted:  # a time-budgeted run keeps the schedule it chose
            run.cfg = with_total_steps(cfg, plan, run.fitted["total_steps"])
            run.plan = make_plan(run.cfg, plan.devices)
        if acc.is_main_process:
            log.info("resumed from %s at step %d", resume_from, run.step)
    run.model, run.optimizer = acc.prepare(model, optimizer)
    if rng is not None:
        ts.restore_rng(acc, rng)
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
    else:
        torch.manual_seed(cfg.seed + 1000 * acc.process_index)
    acc.init_trackers(cfg.project, config={k: str(v) for k, v in cfg.to_dict().items()})
    run.result = TrainResult(out, None, run.step, run.step * run.plan.tokens_per_step)
    return run


def _loaders(run: _Run) -> tuple[Iterator, Iterator | None]:
    """Iterators over the masked batches of each step from `run.step` on: the main batch
    and, with `short_batch`, the short one (its own positions, from its own seed)."""
    cfg, acc = run.cfg, run.acc
    specs = {"main": (masking_config(cfg), cfg.batch_size, cfg.seed, cfg.num_workers)}
    if run.short is not None:
        specs["short"] = (run.short.masking, run.short.batch_size, cfg.seed + 7919, 0)
    its: dict[str, Iterator] = {}
    for key, (mcfg, batch, seed, workers) in specs.items():
        # validation scores from the true skeleton: comparable between runs with and without
        run.masks[key] = functools.partial(_mask, dataclasses.replace(mcfg, read_noise_prob=0.0))
        sampler = StepSampler(batch, acc.num_processes, acc.process_index, cfg.grad_accum,
                              run.step, run.plan.total_steps)  # fmt: skip
        its[key] = iter(DataLoader(
            MaskedDataset(run.train_shards, functools.partial(_mask, mcfg), seed),
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=acc.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        ))  # fmt: skip
    return its["main"], its.get("short")


def _mask(mcfg, sample, gen):  # module level: worker processes pickle it
    return mask_sample(sample, mcfg, gen)


def _loop(run: _Run, batches: tuple[Iterator, Iterator | None]) -> None:
    """Steps until the budget (or `stop_after_steps`) is spent: lr, micro-steps, clip,
    optimizer step; logging, validation and checkpoints at their intervals."""
    cfg, acc = run.cfg, run.acc
    run.model.train()
    bar = tqdm(total=run.plan.total_steps, initial=run.step, desc="train", unit="step",
               disable=not run.main, dynamic_ncols=True)  # fmt: skip
    window = Window()
    speed: list[float] = []
    total_wait = total_time = 0.0
    # time_budget: measure steps/s from step `first + 3` until calibration ends (plan.calibrate)
    first, mark = run.step, None
    recent = [0, 0.0]  # training steps and their seconds since the last (re)fit
    with logging_redirect_tqdm():
        while run.step < run.stop_at:
            if cfg.time_budget and run.fitted is None:
                if run.step == first + 3:
                    mark = (run.step, time.perf_counter())
                elif mark is not None:
                    calibrate(run, mark, bar)
            cfg = run.cfg
            t_step = time.perf_counter()
            lr = lr_at(cfg, (run.step + 1) * run.plan.tokens_per_step)
            for g in run.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)  # older checkpoints lack it
            loss, wait = _micro_steps(run, batches, window)
            grad_norm = (
                acc.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
                if cfg.clip_grad > 0
                else None
            )
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            step_loss = float(acc.reduce(loss, "mean"))
            run.result.losses.append(step_loss)
            dt = time.perf_counter() - t_step
            total_wait, total_time = total_wait + wait, total_time + dt
            if run.refit_every:  # time_budget, once fitted: has the machine slowed down?
                recent = [recent[0] + 1, recent[1] + dt]
                if recent[0] >= run.refit_every:
                    refit(run, recent[0] / recent[1], bar)
                    recent = [0, 0.0]
            window.add(step_loss, wait)
            bar.update()
            if run.step % cfg.log_interval == 0 or run.step == run.stop_at:
                tps = log_window(run, window, lr, grad_norm, bar)
                speed.append(tps)
                if run.main and len(speed) == 2:  # the first window includes start-up
                    log.info("measured %s tokens/s: full run %s", f"{tps:,.0f}",
                             format_duration(run.plan.total_steps * run.plan.tokens_per_step / tps))  # fmt: skip
                window = Window()
            if (
                run.plan.eval_every
                and run.step % run.plan.eval_every == 0
                and run.step < run.plan.total_steps
            ):
                evaluate(run)
            if (
                run.plan.checkpoint_every
                and run.step % run.plan.checkpoint_every == 0
                and run.step < run.stop_at
            ):
                _save(run)
    bar.close()
    run.result.tokens_per_s = float(np.median(speed[1:] or speed)) if speed else 0.0
    run.result.data_wait_share = total_wait / total_time if total_time else 0.0


def _micro_steps(run: _Run, batches, window: Window) -> tuple[torch.Tensor, float]:
    """Forward and backward over the step's micro-batches -> (loss, seconds waiting for
    data). A short batch goes first and without sync: the main batch's backward, the last
    one, synchronises both."""
    cfg, acc, model = run.cfg, run.acc, run.model
    loss_sum = torch.zeros((), device=acc.device)
    wait = 0.0
    it, it_short = batches
    for micro in range(cfg.grad_accum):
        work = [("short", it_short, run.short.weight)] if it_short is not None else []
        for key, source, weight in [*work, ("main", it, 1.0)]:
            t0 = time.perf_counter()
            batch = next(source)
            key_ = [cfg.seed, run.step, micro, acc.process_index]
            if key == "main" and cfg.motion_batch:  # pairs for the motion path alone
                batch.update(run.train_shards.pose_pairs(cfg.motion_batch, key_))
            if key == "main" and cfg.read_batch:  # frames for the heat map alone
                batch.update(run.train_shards.frames(cfg.read_batch, key_))
            batch = to_device(batch, acc.device)
            wait += time.perf_counter() - t0
            sync = key == "main" and micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else acc.no_sync(model):
                with acc.autocast():
                    logits, loss = model(batch)
                acc.backward(loss * weight / cfg.grad_accum)
            loss_sum += weight * loss.detach() / cfg.grad_accum
            parts = logits if run.v2 else modality_ce(logits, batch, run.names)
            accumulate(window.mods[key], parts)
    return loss_sum, wait


def _save(run: _Run) -> None:
    """A training checkpoint (weights, optimizer, RNG of every process, metrics) at run.step."""
    acc, plan, step = run.acc, run.plan, run.step
    rng_t = ts.rng_tensors(acc)
    if run.main:
        state = {
            "tokens": step * plan.tokens_per_step, "tokens_per_step": plan.tokens_per_step,
            "data_position": step * plan.global_batch, "config": run.cfg.to_dict(),
            "scheduler": {"kind": "linear warmup + cosine, in tokens", "lr": lr_at(run.cfg, step * plan.tokens_per_step)},
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None, "metrics": run.history,
            "fitted": run.fitted,
        }  # fmt: skip
        root = run.out / "checkpoints"
        ts.clean_stale(root)
        ts.save_training_state(root, step, acc.unwrap_model(run.model), run.optimizer.optimizer,
                               state, rng_t, run.cfg.keep_checkpoints)  # fmt: skip
    acc.wait_for_everyone()


def _finish(run: _Run) -> TrainResult:
    """The last validation and checkpoint, and the serving checkpoint when the budget is spent."""
    acc, result = run.acc, run.result
    result.step, result.tokens = run.step, run.step * run.plan.tokens_per_step
    if run.step >= run.plan.total_steps:
        evaluate(run)
    _save(run)
    result.finished = run.step >= run.plan.total_steps
    if result.finished and run.cfg.export:
        if run.main:
            result.final_dir = export_serving_checkpoint(
                run.out / "final", acc.unwrap_model(run.model), run.cfg, run.meta, result.val,
                {"train_loss": result.losses[-1] if result.losses else None, "tokens_per_s": result.tokens_per_s,
                 "steps": run.step, "tokens": result.tokens, "processes": acc.num_processes},
            )  # fmt: skip
            log.info("serving checkpoint: %s", result.final_dir)
        acc.wait_for_everyone()
        result.final_dir = run.out / "final"
    acc.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="m2 train", description="Train M2 (also: accelerate launch training/train.py)."
    )
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/m2-tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = train(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"m2 train: error: {e}", file=sys.stderr)
        return 2
    if ts.is_main():
        latest = ts.latest_checkpoint(res.output_dir / "checkpoints")
        if res.final_dir:
            where = f"serving checkpoint {res.final_dir}"
        elif res.finished:
            where = f"no serving checkpoint (export=false): m2 export --from {latest} --out DIR"
        else:
            where = f"stopped at step {res.step} (resume=auto continues)"
        print(f"trained {res.tokens:,} tokens in {res.step} steps; {where}")
    return 0


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A worker of a multi-process run skips interpreter teardown: there gloo's C++
        # threads, still holding work objects, could abort a finished run (SIGABRT, 1 in 6
        # runs of the two-process test under load); everything is written and flushed here.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
