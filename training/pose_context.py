"""Warm start of the pose context (M2Config.pose_context + action_classes) before training.

The pose context is a small MLP over the box-normalised input skeleton, with an auxiliary
head that names the clip's action. In the transformer's own batches it sees ~10 skeletons
a step and learned slowly (action CE 2.3 -> 1.4 in 400 steps of a CPU fine-tune). Fitted
alone, on the training split's skeletons in batches of 256, it names the action of held-out
frames for ~99% of them in a few seconds on a CPU, so a run fits it first
(`context_warmup_steps`): its hidden layer and action head are trained, its output layer
stays zero, and the transformer then only has to learn to read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from m2core.modalities import TOKENS_PER_POSE
from m2core.model import M2Model, skeleton_features
from training.data.shards import Shards


def _batch(shards: Shards, rows: np.ndarray, rng: np.random.Generator, drop: bool):
    """Skeletons of `rows` as the encoder sees them -> (features, action ids). With `drop`,
    a quarter of the samples lose a random share (up to 30%) of their slots, as masked
    inputs do; generation always gives the whole skeleton (dropping more cost 25 points of
    accuracy on whole ones)."""
    rows = np.sort(rows)  # memory-mapped arrays read faster in order
    ids = torch.from_numpy(np.asarray(shards.arrays["coords"][rows], np.int64))
    keep = torch.ones_like(ids, dtype=torch.bool)
    if drop:
        share = rng.uniform(0.0, 0.3, (len(rows), 1)) * (rng.random((len(rows), 1)) < 0.25)
        keep = torch.from_numpy(rng.random((len(rows), TOKENS_PER_POSE)) >= share)
    pos = torch.arange(TOKENS_PER_POSE).expand_as(ids)
    action = torch.from_numpy(np.asarray(shards.arrays["action"][rows], np.int64))
    return skeleton_features(ids, pos, keep), action


def cosine_to_tenth(lr: float, step: int, steps: int) -> float:
    """The learning rate of step `step` of `steps`: cosine from `lr` down to `lr` / 10."""
    return lr * (0.1 + 0.45 * (1 + np.cos(np.pi * step / max(steps, 1))))


def fit_alone(
    params: Iterable[torch.nn.Parameter],
    loss_at: Callable[[int], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    warmup: int = 0,
    desc: str | None = None,
) -> float:
    """AdamW on `params` for `steps` steps of `loss_at(step)`, the learning rate cosine from
    `lr` to `lr` / 10 after a linear warm-up of `warmup` steps -> the loss's running mean
    (0.98 decay) at the end (`loss_at` may return (loss, figure): then the figure's). The loop of every part fitted alone (the pose context, the
    image context, the motion head, the pose reader); a progress bar when `desc` is given."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    run = None
    for step in tqdm(range(steps), desc=desc, unit="step", disable=desc is None):
        for g in opt.param_groups:
            g["lr"] = cosine_to_tenth(lr, step, steps) * min(1.0, (step + 1) / max(warmup, 1))
        loss = loss_at(step)
        loss, figure = loss if isinstance(loss, tuple) else (loss, loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run = figure.detach() if run is None else 0.98 * run + 0.02 * figure.detach()
    return float("nan") if run is None else float(run)


def read_share_or_default(read_share: float | None, has_reader: bool) -> float:
    """The share of a fit's batches made from skeletons the pose reader reads from the frame
    (`m2 fit-motion`, `m2 fit-next-frame`): None -> 0.5 with a reader, else 0; ValueError
    outside [0, 1], or above 0 without a reader."""
    if read_share is None:
        read_share = 0.5 if has_reader else 0.0
    if not 0.0 <= read_share <= 1.0:
        raise ValueError(f"read share must be in [0, 1], got {read_share}")
    if read_share > 0 and not has_reader:
        raise ValueError("a read share above 0 needs a pose reader (m2 fit-pose-reader first)")
    return read_share


def require_arrays(shards: Shards, names: Iterable[str], what: str) -> None:
    """ValueError naming `what` when the split lacks one of the arrays a fit reads."""
    for name in names:
        if name not in shards.arrays:
            raise ValueError(f"{what}: the training split has no {name!r}")


def warm_start(
    model: M2Model,
    train: Shards,
    val: Shards | None,
    steps: int,
    seed: int = 0,
    batch_size: int = 256,
    lr: float = 3e-3,
) -> dict[str, float]:
    """Fit the pose context's hidden layer and action head on (skeleton, action) pairs of
    `train` for `steps` AdamW steps -> {"train_ce", "val_accuracy" (full skeletons; NaN
    without a val split)}. The model's other weights, and the context's output layer, are
    not touched."""
    if model.pose_context is None or model.action_head is None:
        raise ValueError("context_warmup_steps needs model.pose_context and model.action_classes")
    rng = np.random.default_rng([seed, 0xC0DE])
    hidden, head = model.pose_context[:2], model.action_head
    device = next(model.parameters()).device

    def loss_at(step: int) -> torch.Tensor:
        x, y = _batch(train, rng.choice(len(train), min(batch_size, len(train))), rng, True)
        return F.cross_entropy(head(hidden(x.to(device))), y.to(device))

    ce = fit_alone([*hidden.parameters(), *head.parameters()], loss_at, steps, lr)
    out = {"train_ce": ce, "val_accuracy": float("nan")}
    if val is not None and len(val):
        rows = rng.choice(len(val), min(2048, len(val)), replace=False)
        x, y = _batch(val, rows, rng, False)
        with torch.no_grad():
            pred = head(hidden(x.to(device))).argmax(-1).cpu()
        out["val_accuracy"] = float((pred == y).float().mean())
    return out
