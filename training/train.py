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
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from training import train_state as ts
from training.config import (
    Plan,
    TrainConfig,
    fit_to_time,
    format_duration,
    lr_at,
    make_config,
    make_plan,
    masking_config,
    model_config,
    with_total_steps,
)
from training.data.shards import MaskedDataset, Shards, StepSampler, load_meta
from training.export import export_serving_checkpoint, peak_flops
from training.losses import accumulate, evaluate_ce, modality_ce, reduce_ce, to_device
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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only, not on norms, biases or embeddings; the
    parameters the model lists in `LR_SCALE` (name prefix -> factor) get their own groups
    whose learning rate is the schedule's times that factor (`lr_scale`)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    scales: dict[str, float] = getattr(model, "LR_SCALE", {})
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = next((f for pre, f in scales.items() if name.startswith(pre)), 1.0)
            decay = not (p.ndim < 2 or id(p) in embeddings)
            groups.setdefault((decay, scale), []).append(p)
    return [
        {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        for (decay, scale), ps in groups.items()
        if ps or scale == 1.0
    ]


def _rng_tensors(acc: Accelerator) -> dict[str, torch.Tensor]:
    mine = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        mine["torch_cuda"] = torch.cuda.get_rng_state()
    states = gather_object([mine]) if acc.num_processes > 1 else [mine]
    return {f"{k}_{rank}": v for rank, s in enumerate(states) for k, v in s.items()}


def _restore_rng(acc: Accelerator, rng: dict[str, torch.Tensor]) -> None:
    r = acc.process_index
    if f"torch_cpu_{r}" in rng:
        torch.set_rng_state(rng[f"torch_cpu_{r}"])
    if torch.cuda.is_available() and f"torch_cuda_{r}" in rng:
        torch.cuda.set_rng_state(rng[f"torch_cuda_{r}"])


def _resume_path(cfg: TrainConfig, ckpt_root: Path) -> Path | None:
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return ts.latest_checkpoint(ckpt_root)
    path = Path(cfg.resume)
    if not (path / ts.STATE_FILE).is_file():
        raise FileNotFoundError(
            f"resume={cfg.resume}: not a training checkpoint (no {ts.STATE_FILE})"
        )
    return path


def train(
    config: TrainConfig | str | Path | dict, overrides: list[str] | tuple[str, ...] = ()
) -> TrainResult:
    """Run (or continue) the training described by `config`; see the module docstring."""
    from m2core.masking import collate, mask_sample
    from m2core.model import M2Model
    from m2core.model_v2 import M2ConfigV2, M2ModelV2

    t_start = time.perf_counter()  # time_budget counts from here
    cfg = make_config(config, overrides)
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    resume_from = _resume_path(cfg, ckpt_root)
    # The launcher (accelerate launch / torchrun) says how many processes there will be.
    plan = make_plan(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if _is_main():
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
    resume_step = None
    if resume_from is not None:
        resume_step = int(json.loads((resume_from / ts.STATE_FILE).read_text())["step"])

    acc = Accelerator(
        cpu=cfg.cpu,
        # a batch may hold no targets of some modality: its head then gets no gradient
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        mixed_precision=MIXED_PRECISION[cfg.dtype],
        log_with=available_trackers(out / "logs", resume_step) if _is_main() else None,
        project_dir=str(out),
    )
    main = acc.is_main_process
    if acc.num_processes != plan.devices:
        raise ValueError(
            f"WORLD_SIZE says {plan.devices} processes, accelerate has {acc.num_processes}"
        )
    if cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(cfg.seed)  # same initial weights on every process
    np.random.seed(cfg.seed)
    model = M2ModelV2(mcfg) if isinstance(mcfg, M2ConfigV2) else M2Model(mcfg)
    if cfg.init_from and resume_from is None:
        fresh = ts.load_initial_weights(cfg.init_from, model)
        if main:
            log.info("initial weights from %s%s", cfg.init_from,
                     f" (new, freshly initialised: {', '.join(fresh)})" if fresh else "")  # fmt: skip
    if cfg.context_warmup_steps and resume_from is None:
        from training.pose_context import warm_start

        got = warm_start(model, train_shards, val_shards, cfg.context_warmup_steps, cfg.seed)
        if main:
            log.info("pose context warm start: %d steps, training CE %.3f, names the action of "
                     "%.1f%% of validation skeletons", cfg.context_warmup_steps, got["train_ce"],
                     100 * got["val_accuracy"])  # fmt: skip
    if getattr(model, "image_context", None) is not None:
        # fitted after training, from the pose context it imitates (`m2 fit-image-context`):
        # the transformer's losses never read it, so it is kept out of the optimizer
        model.image_context.requires_grad_(False)
    if (
        getattr(model, "pose_reader", None) is not None
    ):  # fitted after training (`m2 fit-pose-reader`)
        model.pose_reader.requires_grad_(False)
    if getattr(model, "motion", None) is not None:
        # fitted after training on the skeletons alone (`m2 fit-motion`); the transformer's
        # forecast loss reads it, but trains around it, not it
        model.motion.requires_grad_(False)
    model = model.to(acc.device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  fused=acc.device.type == "cuda")  # fmt: skip
    step, history = 0, {}
    rng = None
    if resume_from is not None:
        state, rng = ts.load_training_state(resume_from, model, optimizer)
        if state["tokens_per_step"] != plan.tokens_per_step:
            raise ValueError(
                f"resume from {resume_from}: it ran {state['tokens_per_step']:,} tokens/step, this run "
                f"{plan.tokens_per_step:,} (batch_size x processes x grad_accum x tokens/sample must match)"
            )
        step, history = int(state["step"]), state.get("metrics", {})
        if state.get("fitted"):  # a time-budgeted run keeps the schedule it chose
            cfg = with_total_steps(cfg, plan, state["fitted"]["total_steps"])
            plan = make_plan(cfg, plan.devices)
        if main:
            log.info("resumed from %s at step %d", resume_from, step)
    model, optimizer = acc.prepare(model, optimizer)
    if rng is not None:
        _restore_rng(acc, rng)
        if acc.scaler is not None and state.get("scaler"):
            acc.scaler.load_state_dict(state["scaler"])
    else:
        torch.manual_seed(cfg.seed + 1000 * acc.process_index)
    acc.init_trackers(cfg.project, config={k: str(v) for k, v in cfg.to_dict().items()})

    mcfg_mask = masking_config(cfg)

    def mask_fn(sample, gen):
        return mask_sample(sample, mcfg_mask, gen)

    sampler = StepSampler(
        cfg.batch_size, acc.num_processes, acc.process_index, cfg.grad_accum, step, plan.total_steps
    )
    loader = DataLoader(
        MaskedDataset(train_shards, mask_fn, cfg.seed),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        pin_memory=acc.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if cfg.num_workers else None,
    )
    names = acc.unwrap_model(model).names
    v2 = isinstance(acc.unwrap_model(model), M2ModelV2)  # its forward returns per-modality losses
    peak = cfg.peak_flops or peak_flops(acc.device, cfg.dtype, cfg.tf32)
    stop_at = min(plan.total_steps, cfg.stop_after_steps or plan.total_steps)
    result = TrainResult(out, None, step, step * plan.tokens_per_step)
    eval_took = 0.0  # seconds the last validation pass took (time_budget counts them in)

    def save(step_: int) -> None:
        rng_t = _rng_tensors(acc)
        if main:
            state = {
                "tokens": step_ * plan.tokens_per_step, "tokens_per_step": plan.tokens_per_step,
                "data_position": step_ * plan.global_batch, "config": cfg.to_dict(),
                "scheduler": {"kind": "linear warmup + cosine, in tokens", "lr": lr_at(cfg, step_ * plan.tokens_per_step)},
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None, "metrics": history,
                "fitted": fitted,
            }  # fmt: skip
            ts.clean_stale(ckpt_root)
            ts.save_training_state(ckpt_root, step_, acc.unwrap_model(model), optimizer.optimizer,
                                   state, rng_t, cfg.keep_checkpoints)  # fmt: skip
        acc.wait_for_everyone()

    def run_eval(step_: int) -> None:
        nonlocal eval_took
        if val_shards is None:
            return
        t0 = time.perf_counter()
        ce = evaluate_ce(acc, model, val_shards, mask_fn, cfg)
        eval_took = time.perf_counter() - t0
        result.val = ce
        history[str(step_)] = {f"val/{k}": v for k, v in ce.items()}
        acc.log({f"val/ce_{k}": v for k, v in ce.items()}, step=step_)
        if main:
            log.info(
                "step %d validation CE: %s", step_, ", ".join(f"{k} {v:.3f}" for k, v in ce.items())
            )

    model.train()
    it = iter(loader)
    bar = tqdm(
        total=plan.total_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not main,
        dynamic_ncols=True,
    )
    window = {"t0": time.perf_counter(), "steps": 0, "wait": 0.0, "loss": [], "mods": {}}
    speed: list[float] = []
    total_wait = total_time = 0.0
    # time_budget: measure steps/s from step `first + 3` until calibration ends (_fit_budget)
    fitted = state.get("fitted") if resume_from is not None else None
    first, mark = step, None
    with logging_redirect_tqdm():
        while step < stop_at:
            if cfg.time_budget and fitted is None:
                if step == first + 3:
                    mark = (step, time.perf_counter())
                elif mark is not None:
                    eval_s = None if val_shards is None else eval_took
                    fit = _fit_budget(acc, cfg, plan, step, mark, t_start, eval_s)
                    if fit is not None:
                        cfg, fitted = fit
                        plan = make_plan(cfg, acc.num_processes)
                        stop_at = min(plan.total_steps, cfg.stop_after_steps or plan.total_steps)
                        bar.total = plan.total_steps
                        if main:
                            log.info("time_budget %.1f min: %.2f steps/s, so %s steps (%s tokens)",
                                     cfg.time_budget, fitted["steps_per_s"], f"{plan.total_steps:,}",
                                     f"{plan.total_steps * plan.tokens_per_step:,}")  # fmt: skip
            t_step = time.perf_counter()
            lr = lr_at(cfg, (step + 1) * plan.tokens_per_step)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)  # older checkpoints lack it
            loss_sum = torch.zeros((), device=acc.device)
            wait = 0.0
            for micro in range(cfg.grad_accum):
                t0 = time.perf_counter()
                batch = to_device(next(it), acc.device)
                wait += time.perf_counter() - t0
                sync = micro == cfg.grad_accum - 1
                with acc.no_sync(model) if not sync else _null():
                    with acc.autocast():
                        logits, loss = model(batch)
                    acc.backward(loss / cfg.grad_accum)
                loss_sum += loss.detach() / cfg.grad_accum
                accumulate(window["mods"], logits if v2 else modality_ce(logits, batch, names))
            grad_norm = (
                acc.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                if cfg.clip_grad > 0
                else None
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_loss = float(acc.reduce(loss_sum, "mean"))
            result.losses.append(step_loss)
            dt = time.perf_counter() - t_step
            total_wait, total_time = total_wait + wait, total_time + dt
            window["steps"] += 1
            window["wait"] += wait
            window["loss"].append(step_loss)
            bar.update()
            if step % cfg.log_interval == 0 or step == stop_at:
                elapsed = time.perf_counter() - window["t0"]
                tps = window["steps"] * plan.tokens_per_step / elapsed
                speed.append(tps)
                row = {"train/loss": float(np.mean(window["loss"])), "lr": lr, "tokens_per_s": tps,
                       "data_wait_share": window["wait"] / elapsed, "tokens": step * plan.tokens_per_step}  # fmt: skip
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                row.update(
                    {f"train/ce_{k}": v for k, v in reduce_ce(acc, window["mods"], names).items()}
                )
                if acc.device.type == "cuda" and peak and not v2:
                    row["mfu"] = acc.unwrap_model(model).estimate_mfu(tps / acc.num_processes, peak)
                acc.log(row, step=step)
                bar.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{tps:,.0f}")
                if main and len(speed) == 2:  # the first window includes start-up
                    log.info(
                        "measured %s tokens/s: full run %s",
                        f"{tps:,.0f}",
                        format_duration(plan.total_steps * plan.tokens_per_step / tps),
                    )
                window = {
                    "t0": time.perf_counter(),
                    "steps": 0,
                    "wait": 0.0,
                    "loss": [],
                    "mods": {},
                }
            if plan.eval_every and step % plan.eval_every == 0 and step < plan.total_steps:
                run_eval(step)
            if plan.checkpoint_every and step % plan.checkpoint_every == 0 and step < stop_at:
                save(step)
    bar.close()
    result.step, result.tokens = step, step * plan.tokens_per_step
    result.tokens_per_s = float(np.median(speed[1:] or speed)) if speed else 0.0
    result.data_wait_share = total_wait / total_time if total_time else 0.0
    if step >= plan.total_steps:
        run_eval(step)
    save(step)
    result.finished = step >= plan.total_steps
    if result.finished and cfg.export:
        if main:
            result.final_dir = export_serving_checkpoint(
                out / "final", acc.unwrap_model(model), cfg, meta, result.val,
                {"train_loss": result.losses[-1] if result.losses else None, "tokens_per_s": result.tokens_per_s,
                 "steps": step, "tokens": result.tokens, "processes": acc.num_processes},
            )  # fmt: skip
            log.info("serving checkpoint: %s", result.final_dir)
        acc.wait_for_everyone()
        result.final_dir = out / "final"
    acc.end_training()
    return result


def _fit_budget(
    acc: Accelerator,
    cfg: TrainConfig,
    plan: Plan,
    step: int,
    mark: tuple[int, float],
    t_start: float,
    eval_s: float | None,
) -> tuple[TrainConfig, dict[str, float]] | None:
    """time_budget: None while calibrating (steps/s measured since `mark`), then `cfg`
    re-planned to end within the budget, and what was measured. Every process calls it at
    every step of the calibration and all decide together (a collective), so they stop
    calibrating at the same step and agree on the new total. `eval_s`: the last validation
    pass's seconds (0 = none yet, then a third of a step per batch is assumed; None = no
    validation split)."""
    now = time.perf_counter()
    calibrate_s = min(max(2.0, 0.05 * cfg.time_budget * 60), 60.0)
    ready = now - mark[1] >= calibrate_s and step - mark[0] >= 5
    flag = torch.tensor(float(ready), device=acc.device)
    if float(acc.reduce(flag, "sum")) < acc.num_processes:
        return None
    rate = (step - mark[0]) / (now - mark[1])
    if eval_s is None:
        eval_s = 0.0
    elif eval_s == 0.0:
        eval_s = math.ceil(cfg.eval_samples / cfg.batch_size) / rate / 3
    # leave room for the last checkpoint and the export
    left = cfg.time_budget * 60 - (now - t_start) - (3.0 + 0.03 * cfg.time_budget * 60)
    steps = make_plan(
        fit_to_time(cfg, plan, step, rate, left, eval_s), acc.num_processes
    ).total_steps
    steps = int(acc.gather(torch.tensor([steps], device=acc.device)).min())  # the slowest wins
    return with_total_steps(cfg, plan, steps), {
        "total_steps": min(steps, plan.total_steps),
        "steps_per_s": rate,
    }


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _is_main() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


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
    if _is_main():
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
