"""The tokenizer run's state: atomic checkpoints (safetensors + JSON) and the time budget.

A checkpoint holds the weights, the optimizer state, the sampling generator's state and
the schedule's length, so a resumed run continues the same schedule, including one a time
budget cut short. `Budget` measures steps/s once and fits the step count to the minutes.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from m2core.tokenizers.image import atomic_write

if TYPE_CHECKING:
    from training.tokenizer.train import TokenizerTrainConfig

CHECKPOINTS = "checkpoints"  # OUT/checkpoints/step-000500/, OUT/checkpoints/latest.json
MODEL_KEYS = ("levels", "channels", "res_blocks")  # a resume must not change these


# --- Checkpoints (safetensors + JSON, atomic by directory rename) ----------------------------


def save_checkpoint(
    out: Path, step: int, model, optimizer, gen: torch.Generator, cfg, total: int
) -> Path:
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
    meta = {
        "step": step,
        "total_steps": total,  # the schedule's length (time_budget may have cut it)
        "config": asdict(cfg),
        "param_groups": opt["param_groups"],
    }
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


def load_checkpoint(
    out: Path, model, optimizer, gen: torch.Generator, cfg
) -> tuple[int, int | None]:
    """Restore the latest checkpoint under `out`; returns the step to continue from (0 if
    none) and the schedule's length when a time budget cut it (else None: cfg.steps)."""
    pointer = out / CHECKPOINTS / "latest.json"
    if not pointer.is_file():
        return 0, None
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
    # A schedule the time budget cut is kept, unless this run asks for another step count.
    total = meta.get("total_steps")
    cut = total is not None and total != saved["steps"] and cfg.steps == saved["steps"]
    return int(meta["step"]), int(total) if cut else None


class Budget:
    """time_budget: measures steps/s over the first steps (evaluation time left out), then
    gives the step count that ends within the budget; every process gets the slowest's."""

    def __init__(self, cfg: TokenizerTrainConfig, accelerator: Accelerator):
        self.cfg, self.acc = cfg, accelerator
        self.t_start = time.perf_counter()
        self.mark: tuple[int, float] | None = None  # (step, time) once warm
        self.skipped = 0.0  # seconds of evaluation since the mark
        self.calibrate_s = min(max(2.0, 0.03 * cfg.time_budget * 60), 60.0)

    def skip(self, seconds: float) -> None:
        self.skipped += seconds

    def fit(self, step: int) -> int | None:
        now = time.perf_counter()
        if self.mark is None:
            if step >= 3:  # the first steps pay for one-off allocation
                self.mark = (step, now)
            return None
        spent = now - self.mark[1] - self.skipped
        ready = float(spent >= self.calibrate_s and step - self.mark[0] >= 5)
        flag = torch.tensor(ready, device=self.acc.device)
        if float(self.acc.reduce(flag, "sum")) < self.acc.num_processes:
            return None
        rate = (step - self.mark[0]) / spent
        # evaluation every eval_every steps and the export at the end cost ~3% of the budget
        left = self.cfg.time_budget * 60 * 0.97 - (now - self.t_start)
        steps = torch.tensor([max(step, step + int(left * rate))], device=self.acc.device)
        return int(self.acc.gather(steps).min())
