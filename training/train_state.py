"""Resumable training checkpoints, written atomically, without pickle.

One checkpoint is a directory `<root>/step-00000123/` holding

- `model.safetensors`      the (unwrapped) model's weights,
- `optimizer.safetensors`  every tensor of the optimizer state (`state/<param>/<key>`),
- `rng.safetensors`        torch RNG states (CPU and CUDA, one per process),
- `state.json`             everything else: step, tokens, data position, optimizer
                           scalars and param groups, scheduler, gradient scaler, Python
                           and NumPy RNG states, the config, the metrics so far.

It is assembled in `<root>/.tmp-step-...` and renamed into place in one `os.replace`, so
a process killed mid-write (even `kill -9`) leaves either the previous checkpoints or the
new one, never a directory that looks complete. `state.json` is written last inside the
temporary directory and names the files it expects; a directory without it is ignored.
Old checkpoints beyond `keep` are renamed to `.trash-*` before deletion for the same reason.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

if TYPE_CHECKING:
    from accelerate import Accelerator

    from training.config import TrainConfig

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
_NAME = re.compile(r"^step-(\d{8,})$")


class TrainStateError(ValueError):
    """A training checkpoint that is missing, incomplete or does not fit the run."""


def is_main() -> bool:
    """Rank 0 of a launched run (or a plain process), before the accelerator exists."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


# --- optimizer state <-> safetensors + JSON ---------------------------------------------


def optimizer_to_safe(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors and a JSON-ready remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state_dict["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{pid}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
        for g in state_dict["param_groups"]
    ]
    return tensors, {"scalars": scalars, "param_groups": groups}


def optimizer_from_safe(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split("/", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, extra in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(extra)
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


# --- RNG ---------------------------------------------------------------------------------


def host_rng_state() -> dict:
    """Python and NumPy global RNG states as JSON."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *[_plain(x) for x in np_state[2:]]],
    }


def set_host_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def _plain(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else x


# --- save / find / load ------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def clean_stale(root: str | Path) -> None:
    """Remove what an interrupted save or rotation left behind."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)


def save_training_state(
    root: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    rng_tensors: dict[str, torch.Tensor],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` of them.

    `state` must be JSON-ready (step, tokens, scheduler/scaler state, config, metrics...).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / FILES[0]))
    tensors, meta = optimizer_to_safe(optimizer.state_dict())
    save_file(tensors, str(tmp / FILES[1]))
    save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / FILES[2]))
    body = {
        **state,
        "step": step,
        "optimizer": meta,
        "host_rng": host_rng_state(),
        "files": list(FILES),
    }
    (tmp / STATE_FILE).write_text(json.dumps(body, indent=1))
    for name in (*FILES, STATE_FILE):
        _fsync(tmp / name)
    if final.exists():  # re-saving the same step (resumed and stopped again)
        old = root / f".trash-{final.name}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        trash = root / f".trash-{old.name}"
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def load_training_state(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load weights (strict) and optimizer state; return (state.json body, RNG tensors).

    Host RNG states are restored here; the caller restores torch RNG from the tensors.
    """
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise TrainStateError(f"{path}: not a complete training checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise TrainStateError(f"{state_file}: damaged JSON ({e})") from None
    for name in state.get("files", FILES):
        if not (path / name).is_file():
            raise TrainStateError(f"{path}: missing {name}")
    try:
        missing, unexpected = load_model(model, str(path / FILES[0]), strict=False)
        if missing or unexpected:
            raise TrainStateError(
                f"{path / FILES[0]}: does not fit the model (missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]})"
            )
        if optimizer is not None:
            opt = optimizer_from_safe(load_file(str(path / FILES[1])), state["optimizer"])
            optimizer.load_state_dict(opt)
        rng = load_file(str(path / FILES[2]))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise TrainStateError(f"{path}: cannot load ({e})") from None
    set_host_rng_state(state["host_rng"])
    return state, rng


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_initial_weights(path: str | Path, model: torch.nn.Module) -> list[str]:
    """Start a run from another run's weights (`init_from`): a serving checkpoint or a
    training checkpoint directory (either holds model.safetensors; any float dtype, cast to
    the model's). Every stored tensor must exist in the model with the same shape; the
    model's parameters the file lacks (a head added since) keep their initialisation and
    are returned by name. No optimizer state, step or schedule is taken over."""
    from safetensors.torch import load_file

    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise TrainStateError(f"init_from={path}: no model.safetensors there")
    try:
        stored = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise TrainStateError(f"{weights}: damaged or not a safetensors file ({e})") from None
    if hasattr(model, "adapt_state_dict"):
        stored = model.adapt_state_dict(stored)
    own = model.state_dict()
    unknown = sorted(set(stored) - set(own))
    if unknown:
        raise TrainStateError(
            f"init_from={path}: the model has no {unknown[:5]} (another architecture?)"
        )
    for name, t in stored.items():
        if t.shape != own[name].shape:
            raise TrainStateError(
                f"init_from={path}: {name} is {tuple(t.shape)} there, {tuple(own[name].shape)} here"
            )
    model.load_state_dict(stored, strict=False)
    return sorted(set(own) - set(stored))


def rng_tensors(acc: Accelerator) -> dict[str, torch.Tensor]:
    """The torch RNG states of every process (a collective), keyed by rank."""
    mine = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        mine["torch_cuda"] = torch.cuda.get_rng_state()
    states = gather_object([mine]) if acc.num_processes > 1 else [mine]
    return {f"{k}_{rank}": v for rank, s in enumerate(states) for k, v in s.items()}


def restore_rng(acc: Accelerator, rng: dict[str, torch.Tensor]) -> None:
    r = acc.process_index
    if f"torch_cpu_{r}" in rng:
        torch.set_rng_state(rng[f"torch_cpu_{r}"])
    if torch.cuda.is_available() and f"torch_cuda_{r}" in rng:
        torch.cuda.set_rng_state(rng[f"torch_cuda_{r}"])


def resume_path(cfg: TrainConfig, ckpt_root: Path) -> Path | None:
    """The checkpoint `resume` names: auto = the newest under `ckpt_root`, none = None."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return latest_checkpoint(ckpt_root)
    path = Path(cfg.resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume={cfg.resume}: not a training checkpoint (no {STATE_FILE})")
    return path
