"""The run's arithmetic: how many steps the token budget buys, the learning-rate schedule,
and fitting the step count to a wall-clock budget (`time_budget`)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator

from training.builders import short_batch
from training.config import TrainConfig

if TYPE_CHECKING:
    from tqdm import tqdm

    from training.train import _Run as Run

log = logging.getLogger("training.train")


@dataclass(frozen=True)
class Plan:
    """The run's arithmetic: how many steps the token budget buys on `devices` devices."""

    devices: int
    global_batch: int
    tokens_per_step: int
    total_steps: int
    warmup_steps: int
    eval_every: int  # steps; 0 = never during the run
    checkpoint_every: int

    def describe(self, tokens_per_s: float | None = None) -> str:
        s = (
            f"{self.devices} device(s) x batch -> global batch {self.global_batch} samples, "
            f"{self.tokens_per_step:,} tokens/step, {self.total_steps:,} steps "
            f"({self.warmup_steps:,} warmup), eval every {self.eval_every:,} steps, "
            f"checkpoint every {self.checkpoint_every:,} steps"
        )
        if tokens_per_s:
            total = self.total_steps * self.tokens_per_step / tokens_per_s
            s += f"; at {tokens_per_s:,.0f} tokens/s: {format_duration(total)}"
        return s


def make_plan(cfg: TrainConfig, devices: int) -> Plan:
    """Steps are the ceiling of tokens / tokens-per-step (5e9 / (512 x 256) = 38,147)."""
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    global_batch = cfg.batch_size * devices * cfg.grad_accum
    per_step = global_batch * cfg.num_tokens_per_sample
    short = short_batch(cfg)
    if short is not None:
        per_step += short.batch_size * devices * cfg.grad_accum * short.tokens_per_sample

    def steps(millions: float) -> int:
        return math.ceil(round(millions * 1e6) / per_step) if millions > 0 else 0

    return Plan(
        devices=devices,
        global_batch=global_batch,
        tokens_per_step=per_step,
        total_steps=max(1, steps(cfg.total_tokens)),
        warmup_steps=steps(cfg.warmup_tokens),
        eval_every=steps(cfg.eval_interval),
        checkpoint_every=steps(cfg.checkpoint_interval),
    )


def steps_in_time(
    plan: Plan, step: int, steps_per_s: float, seconds_left: float, eval_s: float = 0.0
) -> int:
    """The step count the remaining steps at `steps_per_s`, and the evaluations they include
    (every `plan.eval_every` steps and one at the end, `eval_s` each), fit in `seconds_left`:
    uncapped by the plan's total, at least step + 1."""
    per_step = 1.0 / steps_per_s + (eval_s / plan.eval_every if plan.eval_every else 0.0)
    more = int(max(seconds_left - eval_s, 0.0) / per_step)
    return step + max(1, more)


def with_total_steps(cfg: TrainConfig, plan: Plan, steps: int) -> TrainConfig:
    """`cfg` ending after min(steps, plan.total_steps) steps; warmup is kept when it fits
    in the first tenth of the new total, else shrunk to that tenth."""
    if steps >= plan.total_steps:
        return cfg
    total = steps * plan.tokens_per_step / 1e6
    return dataclasses.replace(
        cfg, total_tokens=total, warmup_tokens=min(cfg.warmup_tokens, total / 10)
    )


def cap_note(cfg: TrainConfig, plan: Plan, budget_steps: int) -> str | None:
    """What to tell a time-budgeted run whose total_tokens stops it well before the time
    would (None when the two agree within 5%)."""
    if budget_steps <= plan.total_steps * 1.05:
        return None
    return (f"total_tokens={cfg.total_tokens:g} caps this run at {plan.total_steps:,} steps; "
            f"the time budget would fit about {budget_steps:,}: raise total_tokens to use it")  # fmt: skip


def lr_at(cfg: TrainConfig, tokens: float) -> float:
    """Learning rate once `tokens` tokens have been consumed: linear warmup from 0 to `lr`
    over `warmup_tokens`, then cosine from `lr` to `min_lr` at `total_tokens`, then flat.

    A step's lr is the schedule at the token count that step reaches, so the first step
    already learns and the last one runs at `min_lr`.
    """
    warm, total = cfg.warmup_tokens * 1e6, cfg.total_tokens * 1e6
    if tokens < warm:
        return cfg.lr * tokens / warm
    if tokens >= total:
        return cfg.min_lr
    progress = (tokens - warm) / (total - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return f"{d}d {h:02d}h {m:02d}m" if d else f"{h}h {m:02d}m {s:02d}s"


def fit_budget(
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
    fits = _agreed_steps(acc, plan, step, rate, _seconds_left(cfg, now, t_start), eval_s)
    new = with_total_steps(cfg, plan, fits)
    return new, {
        "total_steps": make_plan(new, acc.num_processes).total_steps,
        "steps_per_s": rate,
        "budget_steps": fits,  # what the time alone allows; total_tokens may cap it
    }


def _agreed_steps(
    acc: Accelerator, plan: Plan, step: int, rate: float, left: float, eval_s: float
) -> int:
    """The steps that fit in `left` seconds on every process (the slowest wins)."""
    fits = steps_in_time(plan, step, rate, left, eval_s)
    return int(acc.gather(torch.tensor([fits], device=acc.device)).min())


def _seconds_left(cfg: TrainConfig, now: float, t_start: float) -> float:
    # leave room for the last checkpoint and the export
    return cfg.time_budget * 60 - (now - t_start) - (3.0 + 0.03 * cfg.time_budget * 60)


def refit_budget(
    acc: Accelerator,
    cfg: TrainConfig,
    plan: Plan,
    step: int,
    steps_per_s: float,
    t_start: float,
    eval_s: float,
    fitted: dict[str, float],
    now: float | None = None,
) -> tuple[TrainConfig, dict[str, float]] | None:
    """time_budget, later in the run: when the recent speed (`steps_per_s`, training steps
    only) no longer finishes the planned steps in time, `cfg` cut to what still fits and
    the updated record of `fit_budget`; None while the plan still fits (within 2%). It only
    shortens: a run that speeds up ends early rather than stretching its schedule. A
    collective, like `fit_budget`: every process calls it at the same step."""
    left = _seconds_left(cfg, time.perf_counter() if now is None else now, t_start)
    steps = _agreed_steps(acc, plan, step, steps_per_s, left, eval_s)
    if steps >= plan.total_steps * 0.98:
        return None
    new = with_total_steps(cfg, plan, steps)
    total = make_plan(new, acc.num_processes).total_steps
    return new, {**fitted, "total_steps": total, "steps_per_s": steps_per_s}


def calibrate(run: Run, mark: tuple[int, float], bar: tqdm) -> None:
    """time_budget: once the speed is measured (`fit_budget`), the run's plan fits the time."""
    eval_s = None if run.val_shards is None else run.eval_took
    fit = fit_budget(run.acc, run.cfg, run.plan, run.step, mark, run.t_start, eval_s)
    if fit is None:
        return
    _replan(run, fit, bar)
    # re-measure ten times over the run (this process calibrated, so its clock is the budget's)
    run.refit_every = max(20, (run.plan.total_steps - run.step) // 10)
    note = cap_note(run.cfg, run.plan, run.fitted["budget_steps"])
    if note and run.main:
        log.warning(note)


def _replan(run: Run, fit: tuple[TrainConfig, dict[str, float]], bar: tqdm) -> None:
    run.cfg, run.fitted = fit
    run.plan = make_plan(run.cfg, run.acc.num_processes)
    bar.total = run.plan.total_steps
    if run.main:
        log.info("time_budget %.1f min: %.2f steps/s, so %s steps (%s tokens)",
                 run.cfg.time_budget, run.fitted["steps_per_s"], f"{run.plan.total_steps:,}",
                 f"{run.plan.total_steps * run.plan.tokens_per_step:,}")  # fmt: skip


def refit(run: Run, steps_per_s: float, bar: tqdm) -> None:
    """time_budget, later: a run whose machine slowed down is cut to end on time."""
    fit = refit_budget(run.acc, run.cfg, run.plan, run.step, steps_per_s, run.t_start,
                       run.eval_took, run.fitted)  # fmt: skip
    if fit is not None:
        _replan(run, fit, bar)
