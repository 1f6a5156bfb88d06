"""Evaluation metrics and baselines (DESIGN section 11), as plain NumPy functions.

Skeleton errors are Euclidean distances in frame units divided by the person scale: the
longer side of the person's box at the key frame t. Joints that are not visible in the
ground truth are excluded. PCK@0.05 counts a joint as correct when its error is under
0.05 of that scale; ADE is the mean error over all future steps, FDE the mean error at
the last step.

Baselines, from ground truth at t: zero velocity (the pose at t repeated) and constant
velocity (the displacement from t - 1 to t, continued for each future frame's offset;
joints not visible at t - 1 or t keep zero velocity).

BLEU is corpus BLEU-4 on lower-cased whitespace words with the standard brevity
penalty and no smoothing (Papineni et al., 2002), written out here because no BLEU
package is a dependency of M2.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from m2core.modalities import JOINT_GROUPS


def person_scale(bbox: np.ndarray) -> np.ndarray:
    """(N, 4) boxes x1 y1 x2 y2 -> (N,) longer side, floored so a degenerate box stays finite."""
    bbox = np.asarray(bbox, dtype=np.float64)
    return np.maximum(np.maximum(bbox[:, 2] - bbox[:, 0], bbox[:, 3] - bbox[:, 1]), 1e-3)


def normalised_errors(pred_xy: np.ndarray, gt_xy: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(N, ..., 13, 2) predictions and truth -> (N, ..., 13) errors in person scales."""
    err = np.linalg.norm(np.asarray(pred_xy, np.float64) - np.asarray(gt_xy, np.float64), axis=-1)
    return err / scale.reshape(-1, *([1] * (err.ndim - 1)))


def pck(err: np.ndarray, visible: np.ndarray, threshold: float = 0.05) -> float:
    """Share of visible joints with error < threshold (nan when none is visible)."""
    vis = np.asarray(visible, bool)
    return float((err[vis] < threshold).mean()) if vis.any() else float("nan")


def pck_by_group(err: np.ndarray, visible: np.ndarray, threshold: float = 0.05) -> dict[str, float]:
    """(N, 13) errors and visibility -> PCK per joint group (head, shoulders, ...)."""
    return {g: pck(err[:, j], visible[:, j], threshold) for g, j in JOINT_GROUPS.items()}


def forecast_metrics(
    pred: np.ndarray, gt: np.ndarray, scale: np.ndarray, threshold: float = 0.05
) -> dict:
    """pred (N, K, 13, >=2), gt (N, K, 13, 3) -> PCK per future step, ADE, FDE, and ADE
    per joint group."""
    err = normalised_errors(pred[..., :2], gt[..., :2], scale)  # (N, K, 13)
    vis = gt[..., 2] > 0.5
    k = gt.shape[1]

    def mean(e: np.ndarray, v: np.ndarray) -> float:
        return float(e[v].mean()) if v.any() else float("nan")

    return {
        f"pck@{threshold:g}": [pck(err[:, i], vis[:, i], threshold) for i in range(k)],
        "ade": mean(err, vis),
        "fde": mean(err[:, -1], vis[:, -1]),
        # mean error at each future step (ADE's terms), to compare step by step
        "per_step": [mean(err[:, i], vis[:, i]) for i in range(k)],
        "ade_by_group": {g: mean(err[..., j], vis[..., j]) for g, j in JOINT_GROUPS.items()},
    }


def zero_velocity(now: np.ndarray, steps: int) -> np.ndarray:
    """(N, 13, 3) pose at t -> (N, steps, 13, 3): the same pose at every future step."""
    return np.repeat(np.asarray(now)[:, None], steps, axis=1)


def constant_velocity(now: np.ndarray, prev: np.ndarray, offsets: Sequence[int]) -> np.ndarray:
    """Continue the t-1 -> t displacement: pose(t + o) = pose(t) + o * (pose(t) - pose(t-1))."""
    now, prev = np.asarray(now, np.float64), np.asarray(prev, np.float64)
    vel = now[..., :2] - prev[..., :2]
    moving = (now[..., 2] > 0.5) & (prev[..., 2] > 0.5)
    vel = np.where(moving[..., None], vel, 0.0)
    out = np.repeat(now[:, None], len(offsets), axis=1)
    out[..., :2] += np.asarray(offsets, np.float64)[None, :, None, None] * vel[:, None]
    return out


def token_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = np.asarray(pred), np.asarray(truth)
    return float((pred == truth).mean()) if truth.size else float("nan")


def bleu(references: Sequence[str], hypotheses: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU (0..1) of hypotheses against one reference each."""
    if len(references) != len(hypotheses):
        raise ValueError(f"bleu: {len(references)} references for {len(hypotheses)} hypotheses")
    matches, totals = [0] * max_n, [0] * max_n
    ref_len = hyp_len = 0
    for ref_text, hyp_text in zip(references, hypotheses, strict=True):
        ref, hyp = ref_text.lower().split(), hyp_text.lower().split()
        ref_len, hyp_len = ref_len + len(ref), hyp_len + len(hyp)
        for n in range(1, max_n + 1):
            r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
            h = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
            matches[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(log_p)


def names_action(caption: str, action: str) -> bool:
    """Whether `caption` names `action`: the synthetic generator's keywords for its
    actions, else the label's words ('tennis_serve' -> 'tennis serve')."""
    text = caption.lower()
    try:
        from training.synth.text import action_keywords

        return any(k in text for k in action_keywords(action))
    except (ImportError, ValueError):
        from training.data.captioners import action_phrase

        return action_phrase(action) in text
