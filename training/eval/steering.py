"""Steering where it can matter: the frames whose label leads the motion.

In a clip that changes action, a frame's label names what the person is about to do, so
for a few frames before each switch the label says one action and the pose still shows
the last one. Only there can an action input tell the forecast something the skeleton
does not; over all frames that effect is diluted ~20-fold (4.6% of the synthetic test
samples at `--switch-share 0.5`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from training.eval import metrics as M
from training.synth.scene import LEAD


def label_leads(clip: np.ndarray, frame: np.ndarray, action: np.ndarray, lag: int):
    """(rows, shown): the samples whose label differs from their clip's label `lag` frames
    earlier, and that earlier label (the action the pose still shows). A frame's label names
    the action a few frames ahead, so near a switch the pose still shows the last one."""
    label = {(int(c), int(f)): int(a) for c, f, a in zip(clip, frame, action, strict=True)}
    rows, shown = [], []
    for i, (c, f, a) in enumerate(zip(clip, frame, action, strict=True)):
        before = label.get((int(c), int(f) - lag))
        if before is not None and before != int(a):
            rows.append(i)
            shown.append(before)
    return np.asarray(rows, np.int64), np.asarray(shown, np.int64)


def steering_at_switches(
    model, shards, pose, gen_cfg, samples: int, batch_size: int, seed: int
) -> dict[str, Any] | None:
    """Forecast ADE given the frame and the true skeleton on the label-leads samples: with
    no action, the coming (true) action and the shown (earlier) one. None without such
    samples (one-action clips)."""
    from m2core.chain import generate

    A = shards.arrays
    rows, shown = label_leads(
        np.asarray(A["clip"]), np.asarray(A["frame"]), np.asarray(A["action"]), LEAD
    )  # the synth's label lead, not the key-frame stride: the pose shows the old action then
    if len(rows) == 0:
        return None
    pick = np.sort(np.random.default_rng(seed).permutation(len(rows))[:samples])
    rows, shown = rows[pick], shown[pick]
    preds: dict[str, list[np.ndarray]] = {"no_action": [], "true_action": [], "shown_action": []}
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            r = rows[i : i + batch_size]
            full = shards.modalities(r)
            base = {"tok_rgb": full["tok_rgb"], "coords": full["coords"]}
            acts = {
                "no_action": None,
                "true_action": torch.as_tensor(np.asarray(A["action"][r], np.int64))[:, None],
                "shown_action": torch.as_tensor(shown[i : i + batch_size])[:, None],
            }
            for key, act in acts.items():
                g = generate(model, base if act is None else {**base, "action": act}, gen_cfg)
                preds[key].append(g.coords_next[:, 0].numpy())
    gt_now = pose.decode(np.asarray(A["coords"][rows], np.int64))
    gt_next = pose.decode_future(np.asarray(A["coords_next"][rows], np.int64))
    scale = M.person_scale(np.asarray(A["bbox"][rows]))

    def ade(future: np.ndarray) -> float:
        return M.forecast_metrics(future, gt_next, scale)["ade"]

    res: dict[str, Any] = {
        k: ade(pose.decode_future(np.concatenate(v), strict=False)) for k, v in preds.items()
    }
    res["zero_velocity"] = ade(M.zero_velocity(gt_now, 6))
    res["samples"] = len(rows)
    res["clips"] = len(set(np.asarray(A["clip"][rows]).tolist()))
    return res
