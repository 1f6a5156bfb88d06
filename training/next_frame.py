"""Fitting the next-frame head (M2Config.next_frame_levels) of a trained model.

The head maps the present frame's tokens and heat maps of the skeleton now and at t+6 to
the next key frame's FSQ code digits (model.py, `NextFrameHead`). It is fitted here, alone,
on the training split: the loss is the cross-entropy of the true next key frame's digits.
The skeleton at t+6 is the motion head's forecast from the true present skeleton (the
present itself without a motion head), as generation gives it the forecast it just made.

Most tokens do not change six frames on (87% on the demo's clips), and where the figure
moves a changed token is rarely guessed exactly, so the most likely digits alone are worse
than copying the frame. Generation keeps the present token unless the head's guess beats
it by a margin; the fit picks that margin on validation frames (the most accurate of
`MARGINS`, with copying everything as the fallback), or takes `--margin`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from m2core.modalities import FUTURE_FRAMES, NUM_JOINTS, POSE_BINS
from m2core.model import M2Model, pose_points
from training.data import Shards
from training.pose_context import fit_alone, require_arrays

MARGINS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  # nats, tried on validation frames
DEFAULT_MARGIN = 1.0  # without a val split (the demo's choice)


@torch.no_grad()
def forecast(model: M2Model, coords: torch.Tensor) -> torch.Tensor:
    """(B, 39) pose ids now -> (B, 39) the motion head's skeleton at t+6 (x / y moved by its
    displacement, flags kept); the present itself without a motion head."""
    if model.motion is None:
        return coords
    B = coords.shape[0]
    pos = torch.arange(coords.shape[1], device=coords.device).expand_as(coords)
    move = model.motion_bins(coords, pos, torch.ones_like(coords, dtype=torch.bool))
    last = move.view(B, FUTURE_FRAMES, NUM_JOINTS, 3)[:, -1, :, :2].nan_to_num(0.0)
    joints = coords.view(B, NUM_JOINTS, 3).clone()
    xy = joints[..., :2]
    placed = (xy >= 0) & (xy < POSE_BINS)
    moved = (xy + last.round().long()).clamp(0, POSE_BINS - 1)
    joints[..., :2] = torch.where(placed, moved, xy)
    return joints.view_as(coords)


def _inputs(model: M2Model, arrays, rows: np.ndarray, device: torch.device):
    """-> frame tokens (B, 256), joints now (xy, visible), at t+6 (xy, visible), and the
    next key frame's tokens (B, 256)."""
    take = lambda k: torch.from_numpy(np.asarray(arrays[k][rows], np.int64)).to(device)  # noqa: E731
    rgb, now, nxt = take("tok_rgb"), take("coords"), take("tok_rgb_next")
    return (rgb, *pose_points(now), *pose_points(forecast(model, now)), nxt)


def _accuracy(pred: torch.Tensor, truth: torch.Tensor) -> float:
    return float((pred == truth).float().mean())


def fit(
    model: M2Model,
    train: Shards,
    val: Shards | None,
    steps: int,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    progress: bool = True,
    margin: float | None = None,
) -> dict[str, float]:
    """Fit `model.next_frame` for `steps` AdamW steps and set its margin -> {"train_loss"
    (running mean of the digits' cross-entropy), "margin" (None: copy every token), and on up to 2,048 validation
    frames (NaN without a val split) "val_token_accuracy" (at that margin),
    "val_copy_accuracy" (copying the present frame), "val_best_digits_accuracy" (no margin)
    and "val_changed" (the share of tokens changed)}. `margin`: use this one instead of
    picking it on the validation frames. Only the head's weights (and margin) change."""
    if model.next_frame is None:
        raise ValueError("fitting the next-frame head needs model.next_frame_levels")
    if margin is not None and not (margin >= 0):
        raise ValueError(f"margin must be >= 0, got {margin}")
    require_arrays(train, ("tok_rgb", "coords", "tok_rgb_next"), "next-frame head")
    rng = np.random.default_rng([seed, 0x6E46])
    head = model.next_frame
    device = next(model.parameters()).device
    # ~1.1 KB per sample in memory: random batches then cost no disk reads
    arrays = {k: np.asarray(train.arrays[k]) for k in ("tok_rgb", "coords", "tok_rgb_next")}
    was_training = model.training
    model.eval()  # the motion head forecasts as in generation
    head.train()

    def loss_at(step: int) -> torch.Tensor:
        rows = np.sort(rng.choice(len(train), min(batch_size, len(train))))
        *given, nxt = _inputs(model, arrays, rows, device)
        lp = head.log_probs(*given)  # (B, digits, levels, N)
        return -lp.gather(2, head.digits_of(nxt)[:, :, None]).mean()

    desc = "next-frame head" if progress else None
    run = fit_alone(head.parameters(), loss_at, steps, lr, 0.01, warmup=100, desc=desc)
    head.eval()
    nan = float("nan")
    out = {"train_loss": run, "val_token_accuracy": nan, "val_copy_accuracy": nan,
           "val_best_digits_accuracy": nan, "val_changed": nan}  # fmt: skip
    chosen = DEFAULT_MARGIN if margin is None else margin
    if val is not None and len(val) and "tok_rgb_next" in val.arrays:
        rows = np.sort(rng.choice(len(val), min(2048, len(val)), replace=False))
        lps, rgbs, nxts = [], [], []
        with torch.no_grad():
            for i in range(0, len(rows), 256):
                *given, nxt = _inputs(model, val.arrays, rows[i : i + 256], device)
                lps.append(head.log_probs(*given))
                rgbs.append(given[0])
                nxts.append(nxt)
        lp, rgb, nxt = torch.cat(lps), torch.cat(rgbs), torch.cat(nxts)
        at = lambda m: head.decide(lp, rgb, m)  # noqa: E731
        copy = _accuracy(rgb, nxt)
        if margin is None:  # the most accurate margin; copying everything if none beats it
            scores = [(_accuracy(at(m), nxt), m) for m in MARGINS]
            best, m = max(scores, key=lambda s: (s[0], s[1]))
            chosen = m if best > copy else math.inf
        pred = at(chosen)
        out.update(val_token_accuracy=_accuracy(pred, nxt), val_copy_accuracy=copy,
                   val_best_digits_accuracy=_accuracy(at(-math.inf), nxt),
                   val_changed=float((pred != rgb).float().mean()))  # fmt: skip
    with torch.no_grad():
        head.margin.fill_(chosen)
    out["margin"] = chosen if math.isfinite(chosen) else None  # None: copy every token
    model.train(was_training)
    return out


def _option(bundle) -> dict:
    from training.image_context import image_levels

    if bundle.image_tokenizer is None:
        raise ValueError("the checkpoint has no image tokenizer inside")
    return {"next_frame_levels": image_levels(bundle.image_tokenizer)}


def main(argv: list[str] | None = None) -> int:
    """`m2 fit-next-frame`: a serving checkpoint -> the same checkpoint with a next-frame
    head (the next key frame from the frame and the forecast) fitted on a prepared data
    folder (the transformer's weights are unchanged)."""
    from training import refit

    return refit.main(
        argv,
        prog="m2 fit-next-frame",
        description=main.__doc__,
        part="next_frame",
        option=_option,
        fit=fit,
        steps=(8000, "AdamW steps (default 8000: ~16 min on 2 CPU cores)"),
        batch_size=64,
        summary=_summary,
        options={
            "--margin": dict(
                type=float, default=None, dest="margin",
                help="change a token only where the head's guess beats the present one by more "
                "than this many nats (default: the most accurate on validation frames)",
            )
        },
    )  # fmt: skip


def _summary(got: dict[str, float]) -> str:
    margin = "none (copies the frame)" if got["margin"] is None else f"{got['margin']:g} nats"
    return (f"margin {margin}; validation token accuracy "
            f"{got['val_token_accuracy']:.4f}, copying the frame {got['val_copy_accuracy']:.4f}, "
            f"{got['val_changed']:.2%} of tokens changed")  # fmt: skip
