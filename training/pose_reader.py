"""Fitting the pose reader (M2Config.pose_reader_levels) of a trained model.

The reader maps a frame's tokens, as FSQ code values, to every joint's position; generation
uses its positions for the skeleton it reads from a frame (model.py). It is fitted here,
alone, on (frame tokens, skeleton) pairs of the training split: the loss is the L1
distance between read and true positions over the visible joints, plus (with the flag head,
`pose_reader_flags`, which this command adds) `flag_weight` times the binary cross-entropy
of each joint's visibility. The transformer is not trained on it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from m2core.modalities import NUM_JOINTS, POSE_BINS
from m2core.model import M2Model, pose_points
from training.data.shards import Shards
from training.eval.metrics import normalised_errors, pck, person_scale
from training.pose_context import fit_alone, require_arrays


def _batch(arrays, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
    """-> frame tokens (B, 256), true joint positions in [0, 1] (B, 13, 2), visible and
    placed in the frame (B, 13), visibility flag (B, 13)."""
    rows = np.sort(rows)  # memory-mapped arrays read faster in order
    rgb = torch.from_numpy(np.asarray(arrays["tok_rgb"][rows], np.int64)).to(device)
    coords = torch.from_numpy(np.asarray(arrays["coords"][rows], np.int64)).to(device)
    xy, seen = pose_points(coords)
    return rgb, xy, seen, coords.view(-1, NUM_JOINTS, 3)[..., 2] == POSE_BINS + 1


def shift_grid(
    rgb: torch.Tensor, xy: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move each frame's 16x16 token grid by (dx, dy) whole tokens ((B,) ints; the edge
    tokens fill the gap), as if the camera had moved by that many 16-pixel cells -> the
    moved tokens, the joints (B, 13, 2) moved with them, and which are still in the frame."""
    B, g = rgb.shape[0], math.isqrt(rgb.shape[1])
    cells = torch.arange(g, device=rgb.device)[None]
    rows = (cells - dy[:, None]).clamp(0, g - 1)  # (B, g): source row of each row
    cols = (cells - dx[:, None]).clamp(0, g - 1)
    grid = rgb.view(B, g, g)
    grid = grid.gather(1, rows[:, :, None].expand(B, g, g)).gather(2, cols[:, None].expand(B, g, g))
    xy = xy + torch.stack([dx, dy], 1)[:, None].to(xy.dtype) / g
    return grid.reshape(B, g * g), xy, ((xy >= 0) & (xy < 1)).all(-1)


def fit(
    model: M2Model,
    train: Shards,
    val: Shards | None,
    steps: int,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    progress: bool = True,
    flag_weight: float = 0.05,
    shift: int = 2,
) -> dict[str, float]:
    """Fit `model.pose_reader` for `steps` AdamW steps -> {"train_loss" (running mean: the
    mean |error| per coordinate in frame units, plus the flags' weighted cross-entropy),
    "val_pck@0.05" (visible joints of up to 2,048 validation frames within 0.05 of the
    person's size; NaN without a val split or boxes)} and with the flag head
    "val_flag_accuracy" beside "val_flag_all_visible" (every joint marked visible). Only
    the reader's weights change. `shift`: each training frame's token grid is moved by up to
    that many tokens each way (`shift_grid`; 0 = off): the reader learnt each training
    clip's look (PCK@0.05 0.93 on training frames, 0.67 on validation ones), and in a
    1,200-step trial moving by up to 2 raised validation PCK@0.05 from 0.666 to 0.680."""
    if model.pose_reader is None:
        raise ValueError("fitting the pose reader needs model.pose_reader_levels")
    if flag_weight < 0 or shift < 0:
        raise ValueError(f"flag weight and shift must be >= 0, got {flag_weight}, {shift}")
    require_arrays(train, ("tok_rgb", "coords"), "pose reader")
    rng = np.random.default_rng([seed, 0x9E4D])
    net = model.pose_reader
    device = next(model.parameters()).device
    # ~600 bytes per sample in memory: random batches then cost no disk reads
    arrays = {k: np.asarray(train.arrays[k]) for k in ("tok_rgb", "coords")}
    was_training = model.training
    net.train()

    def loss_at(step: int) -> torch.Tensor:
        rgb, xy, seen, flag = _batch(
            arrays, rng.choice(len(train), min(batch_size, len(train))), device
        )
        if shift:
            dx, dy = torch.from_numpy(rng.integers(-shift, shift + 1, (2, len(rgb)))).to(device)
            rgb, xy, inside = shift_grid(rgb, xy, dx, dy)
            seen, flag = seen & inside, flag & inside  # out of the frame: not visible
        got, visible = net.read(rgb)
        err = (got - xy).abs().sum(-1)
        loss = (err * seen).sum() / seen.sum().clamp(min=1) / 2
        if visible is not None:
            loss = loss + flag_weight * F.binary_cross_entropy_with_logits(visible, flag.float())
        return loss

    desc = "pose reader" if progress else None
    run = fit_alone(net.parameters(), loss_at, steps, lr, 0.01, warmup=100, desc=desc)
    out = {"train_loss": run, "val_pck@0.05": float("nan")}
    if val is not None and len(val) and "bbox" in val.arrays:
        net.eval()
        rows = np.sort(rng.choice(len(val), min(2048, len(val)), replace=False))
        rgb, xy, seen, flag = _batch(val.arrays, rows, device)
        with torch.no_grad():
            parts = [net.read(rgb[i : i + 256]) for i in range(0, len(rgb), 256)]
        got = torch.cat([p[0] for p in parts])
        scale = person_scale(np.asarray(val.arrays["bbox"][rows]))
        err = normalised_errors(got.cpu().numpy(), xy.cpu().numpy(), scale)
        out["val_pck@0.05"] = pck(err, seen.cpu().numpy())
        if net.visible is not None:
            visible = torch.cat([p[1] for p in parts]) > 0
            out["val_flag_accuracy"] = float((visible == flag).float().mean())
            out["val_flag_all_visible"] = float(flag.float().mean())
    model.train(was_training)
    return out


def _option(bundle) -> dict:
    from training.image_context import image_levels

    return {"pose_reader_levels": image_levels(bundle), "pose_reader_flags": True}


def main(argv: list[str] | None = None) -> int:
    """`m2 fit-pose-reader`: a serving checkpoint -> the same checkpoint with a pose reader
    (the skeleton from the frame) fitted on a prepared data folder (the transformer's
    weights are unchanged)."""
    from training import refit

    return refit.main(
        argv,
        prog="m2 fit-pose-reader",
        description=main.__doc__,
        part="pose_reader",
        option=_option,
        fit=fit,
        steps=(4000, "AdamW steps (default 4000: ~13 min on 2 CPU cores)"),
        batch_size=128,
        summary=_summary,
        options={
            "--shift": dict(
                type=int, default=2, dest="shift",
                help="move each training frame's token grid by up to this many tokens (default 2)",
            ),
            "--flag-weight": dict(
                type=float, default=0.05, dest="flag_weight",
                help="weight of the visibility flags' cross-entropy beside the L1 (default 0.05)",
            )
        },
    )  # fmt: skip


def _summary(got: dict[str, float]) -> str:
    out = f"validation PCK@0.05 {got['val_pck@0.05']:.3f}"
    if "val_flag_accuracy" in got:
        out += (f", flags right {got['val_flag_accuracy']:.3f} (all visible: "
                f"{got['val_flag_all_visible']:.3f})")  # fmt: skip
    return out
