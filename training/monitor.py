"""What a training run reports as it goes: one tracker row per log window (loss, lr,
tokens/s, data wait, training loss per modality) and the validation pass."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from training.losses import evaluate_ce, reduce_ce

if TYPE_CHECKING:
    from training.train import _Run as Run

log = logging.getLogger("training.train")


@dataclass
class Window:
    """What the steps since the last log line add up to."""

    t0: float = field(default_factory=time.perf_counter)
    steps: int = 0
    wait: float = 0.0
    loss: list[float] = field(default_factory=list)
    mods: dict[str, dict] = field(default_factory=lambda: {"main": {}, "short": {}})

    def add(self, loss: float, wait: float) -> None:
        self.steps += 1
        self.wait += wait
        self.loss.append(loss)


def log_window(run: Run, w: Window, lr: float, grad_norm, bar: tqdm) -> float:
    """One tracker row (loss, lr, tokens/s, data wait, per-modality training loss) -> tokens/s."""
    acc, plan = run.acc, run.plan
    elapsed = time.perf_counter() - w.t0
    tps = w.steps * plan.tokens_per_step / elapsed
    row = {"train/loss": float(np.mean(w.loss)), "lr": lr, "tokens_per_s": tps,
           "data_wait_share": w.wait / elapsed, "tokens": run.step * plan.tokens_per_step}  # fmt: skip
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    row.update({f"train/ce_{k}": v for k, v in reduce_ce(acc, w.mods["main"], run.names).items()})
    if run.short is not None:
        got = reduce_ce(acc, w.mods["short"], run.names)
        row.update({f"train/short_ce_{k}": v for k, v in got.items()})
    if acc.device.type == "cuda" and run.peak and not run.v2:
        row["mfu"] = acc.unwrap_model(run.model).estimate_mfu(tps / acc.num_processes, run.peak)
    acc.log(row, step=run.step)
    bar.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{tps:,.0f}")
    return tps


def evaluate(run: Run) -> None:
    """Validation loss per modality on fixed masks (and on the short batch's, as short_*)."""
    if run.val_shards is None:
        return
    t0 = time.perf_counter()
    ce = evaluate_ce(run.acc, run.model, run.val_shards, run.masks["main"], run.cfg)
    if run.short is not None:
        got = evaluate_ce(run.acc, run.model, run.val_shards, run.masks["short"], run.cfg)
        ce.update({f"short_{k}": v for k, v in got.items()})
    run.eval_took = time.perf_counter() - t0
    run.result.val = ce
    run.history[str(run.step)] = {f"val/{k}": v for k, v in ce.items()}
    run.acc.log({f"val/ce_{k}": v for k, v in ce.items()}, step=run.step)
    if run.main:
        log.info("step %d validation CE: %s", run.step,
                 ", ".join(f"{k} {v:.3f}" for k, v in ce.items()))  # fmt: skip
