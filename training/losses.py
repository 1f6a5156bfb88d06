"""Per-modality cross-entropy: from the model's logits, summed over batches and processes,
and the validation pass that training runs at its eval interval (fixed masks, fixed subset).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from m2core.model import action_rows
from training.data.shards import MaskedDataset, Shards

IGNORE = -100


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def modality_ce(
    logits: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], names: tuple[str, ...]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(summed cross-entropy, labelled targets) per modality from `M2Model.forward` logits,
    as detached device tensors (no host sync until someone reads them); also for the
    auxiliary `action` head when the model has one."""
    out = {}
    mod, valid, labels = batch["dec_mod"], batch["dec_valid"], batch["dec_labels"]
    for name, lg in logits.items():
        if name == "action":
            y = batch["action"][action_rows(batch, names)]
            out[name] = (
                F.cross_entropy(lg.detach().float(), y, reduction="sum"),
                y.new_tensor(len(y)),
            )
            continue
        sel = (valid & (mod == names.index(name))).flatten().nonzero().squeeze(1)
        y = labels.flatten().index_select(0, sel)
        ce = F.cross_entropy(lg.detach().float(), y, ignore_index=IGNORE, reduction="sum")
        out[name] = (ce, (y != IGNORE).sum())
    return out


def accumulate(sums: dict[str, list], parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for name, (ce, n) in parts.items():
        s = sums.setdefault(name, [0.0, 0])
        s[0], s[1] = s[0] + ce, s[1] + n


def reduce_ce(acc: Accelerator, sums: dict[str, list], names: tuple[str, ...]) -> dict[str, float]:
    """Sum per-modality (ce, n) over processes -> mean CE per modality and their mean (of
    the modalities; the auxiliary `action` CE, a format-2 adapter's whole-modality loss
    (`NAME_whole`) and the heat map's extra frames (`coords_heat`), when there are any, are
    reported beside it)."""
    zero = torch.zeros((), dtype=torch.float64, device=acc.device)
    # the same keys on every process
    beside = ("action", "coords_heat", *(f"{n}_whole" for n in names))
    keys = (*names, *beside)
    t = torch.stack([zero + sums.get(n, (0.0, 0))[k] for n in keys for k in (0, 1)])
    t = acc.reduce(t, "sum").cpu().view(-1, 2)
    ce = {n: float(t[i, 0] / t[i, 1]) for i, n in enumerate(names) if t[i, 1] > 0}
    if ce:
        ce["mean"] = float(np.mean(list(ce.values())))
    for i, n in enumerate(beside, len(names)):
        if t[i, 1] > 0:
            ce[n] = float(t[i, 0] / t[i, 1])
    return ce


@torch.no_grad()
def evaluate_ce(
    acc: Accelerator, model: nn.Module, shards: Shards, mask_fn, cfg
) -> dict[str, float]:
    """Per-modality validation cross-entropy on a fixed masked subset of the split."""
    from m2core.masking import collate

    names = acc.unwrap_model(model).names
    n = min(cfg.eval_samples, len(shards))
    data = MaskedDataset(shards, mask_fn, cfg.seed + 1)  # fixed masks, other than training's
    mine = list(range(acc.process_index, n, acc.num_processes))
    sums: dict[str, list[float]] = {}
    model.eval()
    for i in range(0, len(mine), cfg.batch_size):
        batch = to_device(collate([data[p] for p in mine[i : i + cfg.batch_size]]), acc.device)
        with acc.autocast():
            logits, _ = model(batch)
        # a format-2 model returns its per-modality (summed loss, count) itself
        accumulate(
            sums,
            logits
            if not isinstance(next(iter(logits.values()), None), Tensor)
            else modality_ce(logits, batch, names),
        )
    model.train()
    return reduce_ce(acc, sums, names)
