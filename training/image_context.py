"""Fitting the image context (M2Config.image_context_levels) of a trained model.

The image context reads the frame's tokens around the person and maps them into the pose
context's hidden space, so that a caption made from the frame alone (the skeleton guessed
from the frame, as /predict does) gets a vector that names the action. It is fitted here,
alone, on (frame, skeleton, action) triples of the training split: the frozen action head
must name the clip's action from its output, and its output should match the pose
context's hidden layer on the true skeleton (which the caption decoder has learned to read
through `caption_context`). The window is centred on the true skeleton with a random move
of up to one token, since generation centres it on a guessed one. The transformer is not
trained on it, and nothing else in the model changes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from m2core.model import M2Model, skeleton_features
from training.data.shards import Shards
from training.pose_context import fit_alone, require_arrays

# Weight of the mean squared distance to the pose context's hidden layer, beside the action
# CE. Captions from the frame alone named the action of 256 validation frames for 34.8% at
# weight 1 (before the context also replaced the guessed skeleton's in the encoder: 38.3%
# at weight 10 then), and after it 41.0% at 10, 43.4% at 50, 40.2% at 100; the action head
# on the context named 52-58% throughout. A second fit at 50 (the demo's) gave 37.5%: fits
# differ by a few points, so 10-100 are alike and weight 1 is worse. The caption decoder
# reads vectors like those it was trained on better than ones that only satisfy the head.
MATCH_WEIGHT = 50.0


def _batch(shards: Shards, rows: np.ndarray) -> tuple[torch.Tensor, ...]:
    rows = np.sort(rows)  # memory-mapped arrays read faster in order
    rgb = torch.from_numpy(np.asarray(shards.arrays["tok_rgb"][rows], np.int64))
    coords = torch.from_numpy(np.asarray(shards.arrays["coords"][rows], np.int64))
    action = torch.from_numpy(np.asarray(shards.arrays["action"][rows], np.int64))
    return rgb, coords, action


def fit(
    model: M2Model,
    train: Shards,
    val: Shards | None,
    steps: int,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    progress: bool = True,
) -> dict[str, float]:
    """Fit `model.image_context` for `steps` AdamW steps -> {"train_ce", "val_accuracy"
    (the action head on the context, window on the true skeleton, as `image_hidden` reads
    it; NaN without a val split)}. Only the image context's weights change."""
    if model.image_context is None or model.pose_context is None or model.action_head is None:
        raise ValueError(
            "fitting the image context needs model.image_context_levels (and so an action head)"
        )
    require_arrays(train, ("tok_rgb", "coords", "action"), "image context")
    rng = np.random.default_rng([seed, 0x1A6E])
    gen = torch.Generator().manual_seed(seed)
    net, target, head = model.image_context, model.pose_context[:2], model.action_head
    device = next(model.parameters()).device
    was_training = model.training
    net.train()

    def loss_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, coords, action = (
            t.to(device) for t in _batch(train, rng.choice(len(train), min(batch_size, len(train))))
        )
        pos = torch.arange(coords.shape[1], device=device).expand_as(coords)
        with torch.no_grad():
            feats = skeleton_features(coords, pos, torch.ones_like(coords, dtype=torch.bool))
            want = target(feats)
        shift = torch.randint(-1, 2, (len(rgb), 2), generator=gen).to(device)
        got = net(rgb, feats[:, -3:-1], shift)
        ce = F.cross_entropy(head(got), action)
        return ce + MATCH_WEIGHT * F.mse_loss(got, want), ce  # the figure: the action CE

    desc = "image context" if progress else None
    ce = fit_alone(net.parameters(), loss_at, steps, lr, weight_decay=0.05, desc=desc)
    model.zero_grad(set_to_none=True)  # the frozen action head got gradients too
    out = {"train_ce": ce, "val_accuracy": float("nan")}
    if val is not None and len(val):
        model.eval()
        rgb, coords, action = _batch(val, rng.choice(len(val), min(2048, len(val)), replace=False))
        with torch.no_grad():
            pred = torch.cat([
                head(model.image_hidden(rgb[i : i + 256].to(device), coords[i : i + 256].to(device)))
                .argmax(-1).cpu()
                for i in range(0, len(rgb), 256)
            ])  # fmt: skip
        out["val_accuracy"] = float((pred == action).float().mean())
    model.train(was_training)
    return out


def image_levels(bundle) -> int:
    """The FSQ levels per code digit of a checkpoint's image tokenizer, which the parts that
    read code values (image context, pose reader, next-frame head) take; ValueError without
    a tokenizer, or when its digits have different level counts."""
    if bundle.image_tokenizer is None:
        raise ValueError("the checkpoint has no image tokenizer inside")
    levels = set(bundle.image_tokenizer.config.levels)
    if len(levels) != 1:
        raise ValueError(
            f"reading FSQ code values needs one level count for every digit, got {bundle.image_tokenizer.config.levels}"
        )
    return levels.pop()


def _option(bundle) -> dict:
    levels = image_levels(bundle)
    if not bundle.model.config.action_classes:
        raise ValueError("the checkpoint's model has no action head (action_classes)")
    return {"image_context_levels": levels}


def main(argv: list[str] | None = None) -> int:
    """`m2 fit-image-context`: a serving checkpoint -> the same checkpoint with an image
    context fitted on a prepared data folder (the transformer's weights are unchanged)."""
    from training import refit

    return refit.main(
        argv,
        prog="m2 fit-image-context",
        description=main.__doc__,
        part="image_context",
        option=_option,
        fit=fit,
        steps=(3000, "AdamW steps (default 3000: ~3 min on 2 CPU cores)"),
        batch_size=128,
        summary=lambda got: (
            f"validation action accuracy from the frame: {100 * got['val_accuracy']:.1f}%"
        ),
    )
