"""Masking: the Dirichlet curriculum of DESIGN section 6, and the batch format of the model.

A raw sample is a dict of full token arrays per modality (names from the registry; a
missing key = that modality is absent for this sample). `captions` is padded with pad=0
and starts with bos=1; its eligible tokens are the non-pad ones after bos (bos is implied).

`mask_sample(sample, cfg, rng)` picks, per sample:
1. an alpha set (mixture weights, as 4M's configs allow);
2. input counts: Dirichlet(input alphas) x input_budget, capped by what each modality has;
   the budget left by the caps is **redistributed** to the modalities that still have
   tokens (in proportion to their share), so every slot is filled whenever tokens exist;
3. target counts: the same over target_budget and the target alphas, capped by what is
   not an input (no token is ever both);
4. positions: image / pose inputs and targets from one random permutation; a caption
   target is a contiguous span learned left to right (teacher forcing: the query of slot
   i carries token i-1, bos at the span start), caption inputs a random subset of the
   rest;
5. decoder-side MaskGIT conditioning: with probability `reveal_prob` an image / pose
   target modality reveals a random part of its targets (mask ratio from the same cosine
   schedule as generation): those queries carry their token and get no loss, so the
   model learns to predict the rest given the chosen ones, as MaskGIT asks it to.
   Future modalities never become encoder inputs (alpha 0 by default).
6. read noise: with probability `read_noise_prob`, a sample whose present skeleton is not a
   target gets it with each joint moved by Gaussian noise (`read_noise`, per joint, frame
   units, times a scale drawn per sample from U(0, sqrt 3): mean square 1, some samples
   near clean). The noisy skeleton is what the sample's inputs, `present_pose` and future
   priors carry, as the chain's forecast starts from the skeleton it read from the frame;
   every target stays true (docs/model.md, run 16).

Batch format (`collate` stacks samples into torch tensors; I = input_budget, T =
target_budget; slots grouped by modality in registry order, then padding):

| key | shape, dtype | meaning |
|---|---|---|
| enc_ids | (B, I) int64 | input token ids (in their modality's vocabulary) |
| enc_mod, enc_pos | (B, I) int64 | modality index (registry order), position in modality |
| enc_valid | (B, I) bool | slot filled |
| dec_query | (B, T) int64 | token carried by the query; -1 = the mask token |
| dec_mod, dec_pos, dec_valid | (B, T) | as for inputs |
| dec_labels | (B, T) int64 | target id, or -100 (padding / revealed: no loss) |
| dec_prior | (B, T) int64 | for `coords_next` / `tok_rgb_next` targets: the present token at that position (`coords` joint/component, `tok_rgb` cell), else -1 |
| present_pose | (B, 39) int64 | the sample's present skeleton (`coords`, read-noised with step 6), -1 where it has none: what a future skeleton starts from |
| future_pose | (B, 234) int64 | the sample's whole `coords_next`, -1 where it has none: what the motion path trains on (`model.motion_dense`) |
| action | (B,) int64 | only when the raw samples carry it: the clip's action id (-1 = unknown) |

Per-sample cost is tens of microseconds (bench/bench_model.py measures it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from m2core.modalities import NUM_JOINTS, POSE_BINS, TOKENS_PER_POSE, build_registry

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# Per-sample labels that are not modalities: passed through to the batch as one int64 each
# (`action`: the clip's action id, for the model's auxiliary action head; -1 = unknown).
LABELS = ("action",)
IGNORE = -100
_REG = build_registry(action_classes=1)  # names, kinds and order only; sizes come from the arrays
_NAMES = tuple(_REG)
_FUTURE_LEN = _REG["coords_next"].num_tokens
_KIND = {n: m.kind for n, m in _REG.items()}
_INDEX = {n: i for i, n in enumerate(_REG)}
_LENGTH = {n: m.num_tokens for n, m in _REG.items() if m.kind != "text"}
# future modality -> the present one whose aligned token is its query's prior (model.py)
_PRESENT_OF = {"coords_next": "coords", "tok_rgb_next": "tok_rgb"}


def cosine_schedule(u: float | np.ndarray) -> float | np.ndarray:
    """MaskGIT's mask ratio at progress u in [0, 1]: 1 at the start, 0 at the end."""
    return np.cos(np.pi / 2 * np.asarray(u))


@dataclass(frozen=True)
class AlphaSet:
    """Dirichlet concentrations per modality (missing = 0 = never), and a mixture weight."""

    inputs: Mapping[str, float]
    targets: Mapping[str, float]
    weight: float = 1.0

    def __post_init__(self) -> None:
        for side in ("inputs", "targets"):
            alphas = getattr(self, side)
            for name, a in alphas.items():
                if name not in _REG:
                    raise ValueError(f"alpha set {side}: unknown modality {name!r}")
                if not (isinstance(a, int | float) and a >= 0):
                    raise ValueError(f"alpha set {side}.{name}: must be >= 0, got {a!r}")
                if side == "inputs" and a > 0 and not _REG[name].can_input:
                    raise ValueError(f"alpha set inputs.{name}: {name} cannot be an input")
            if not any(a > 0 for a in alphas.values()):
                raise ValueError(f"alpha set {side}: at least one alpha must be > 0")
        if self.weight <= 0:
            raise ValueError(f"alpha set weight must be > 0, got {self.weight}")


# Input alphas favour vision, target alphas favour text and the future (DESIGN 6); the
# second set is the chained-generation shape: everything now -> the future.
DEFAULT_ALPHA_SETS: tuple[AlphaSet, ...] = (
    AlphaSet(
        inputs={"tok_rgb": 1.0, "coords": 0.5, "captions": 0.5},
        targets={"tok_rgb": 0.2, "coords": 1.0, "captions": 1.0, "coords_next": 1.0,
                 "tok_rgb_next": 1.0},
    ),
    AlphaSet(
        inputs={"tok_rgb": 1.0, "coords": 1.0, "captions": 1.0},
        targets={"coords": 0.5, "captions": 0.5, "coords_next": 1.0, "tok_rgb_next": 1.0},
    ),
)  # fmt: skip


@dataclass(frozen=True)
class MaskingConfig:
    input_budget: int = 128
    target_budget: int = 128
    alpha_sets: tuple[AlphaSet, ...] = field(default=DEFAULT_ALPHA_SETS)
    reveal_prob: float = 0.5
    read_noise: tuple[float, ...] = ()  # per joint, frame units (step 6); () = none
    read_noise_prob: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "read_noise", tuple(float(v) for v in self.read_noise))
        if self.read_noise and (
            len(self.read_noise) != NUM_JOINTS or not all(0 <= v <= 1 for v in self.read_noise)
        ):
            raise ValueError(
                f"read_noise needs {NUM_JOINTS} values in [0, 1] (frame units), got {self.read_noise}"
            )
        if not 0 <= self.read_noise_prob <= 1:
            raise ValueError(f"read_noise_prob must be in [0, 1], got {self.read_noise_prob}")
        if self.read_noise_prob > 0 and not self.read_noise:
            raise ValueError("read_noise_prob > 0 needs read_noise (one value per joint)")
        if self.input_budget < 1 or self.target_budget < 1:
            raise ValueError(
                f"masking budgets must be >= 1, got {self.input_budget}, {self.target_budget}"
            )
        if not self.alpha_sets:
            raise ValueError("masking needs at least one alpha set")
        if not 0 <= self.reveal_prob <= 1:
            raise ValueError(f"reveal_prob must be in [0, 1], got {self.reveal_prob}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MaskingConfig:
        """From YAML/JSON data: alpha_sets as a list of {inputs, targets, weight} dicts."""
        known = {"input_budget", "target_budget", "alpha_sets", "reveal_prob", "read_noise",
                 "read_noise_prob"}  # fmt: skip
        for key in data:
            if key not in known:
                raise ValueError(f"unknown masking config key {key!r}; known: {sorted(known)}")
        data = dict(data)
        if "alpha_sets" in data:
            data["alpha_sets"] = tuple(
                s if isinstance(s, AlphaSet) else AlphaSet(**s) for s in data["alpha_sets"]
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_budget": self.input_budget,
            "target_budget": self.target_budget,
            "reveal_prob": self.reveal_prob,
            "read_noise": list(self.read_noise),
            "read_noise_prob": self.read_noise_prob,
            "alpha_sets": [
                {"inputs": dict(s.inputs), "targets": dict(s.targets), "weight": s.weight}
                for s in self.alpha_sets
            ],
        }


def _draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability proportional to weights (cheaper than choice(p=))."""
    cum = np.cumsum(weights)
    return min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(cum) - 1)


def _split(
    budget: int, alphas: np.ndarray, caps: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Counts per modality: floor(Dirichlet(alphas) x budget) capped by caps, then the
    leftover handed to modalities with room, in proportion to their share."""
    counts = np.zeros(len(caps), dtype=np.int64)
    active = (alphas > 0) & (caps > 0)
    if not active.any():
        return counts
    share = np.zeros(len(caps))
    share[active] = rng.dirichlet(alphas[active])
    counts = np.minimum(np.floor(share * budget).astype(np.int64), caps)
    left = min(budget, int(caps[active].sum())) - int(counts.sum())
    while left > 0:
        room = np.where(active, caps - counts, 0)
        w = np.where(room > 0, share, 0.0)
        if w.sum() <= 0:  # shares that underflowed to 0: spread evenly
            w = (room > 0).astype(float)
        w = w / w.sum()
        extra = np.minimum(np.floor(w * left).astype(np.int64), room)
        if extra.sum() == 0:  # the last few: one at a time, drawn by share
            extra[_draw(w, rng)] = 1
        counts += extra
        left -= int(extra.sum())
    return counts


def _eligible(name: str, ids: np.ndarray) -> np.ndarray:
    if _KIND[name] == "text":
        if ids.ndim != 1 or len(ids) < 2 or ids[0] != BOS_ID:
            raise ValueError(f"sample captions must be 1D and start with bos={BOS_ID}")
        return np.flatnonzero(ids[1:] != PAD_ID) + 1
    if ids.shape != (_LENGTH[name],):
        raise ValueError(f"sample {name}: expected shape ({_LENGTH[name]},), got {ids.shape}")
    return np.arange(len(ids))


def mask_sample(
    sample: Mapping[str, np.ndarray | torch.Tensor], cfg: MaskingConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One sample -> the fixed-size input / target slots of the batch format above."""
    for name in sample:
        if name not in _REG and name not in LABELS:
            raise ValueError(f"sample has unknown modality {name!r}; known: {list(_NAMES)}")
    extra = {k: np.asarray(sample[k], dtype=np.int64) for k in LABELS if k in sample}
    # a known action is also the one-token `action` modality (alpha 0 unless a set names it)
    names = [n for n in _NAMES if n in sample and (n != "action" or int(extra[n]) >= 0)]
    ids = {n: np.asarray(sample[n], dtype=np.int64).reshape(-1) for n in names}
    eligible = {n: _eligible(n, ids[n]) for n in names}
    avail = np.array([len(eligible[n]) for n in names], dtype=np.int64)

    aset = cfg.alpha_sets[_draw(np.array([s.weight for s in cfg.alpha_sets]), rng)]
    a_in = np.array([aset.inputs.get(n, 0.0) for n in names], dtype=float)
    a_t = np.array([aset.targets.get(n, 0.0) for n in names], dtype=float)
    n_in = _split(cfg.input_budget, a_in, avail, rng)
    n_t = _split(cfg.target_budget, a_t, avail - n_in, rng)
    noise = cfg.read_noise_prob > 0 and "coords" in ids and rng.random() < cfg.read_noise_prob
    if noise and n_t[names.index("coords")] == 0:
        ids["coords"] = _read_noise(ids["coords"], cfg.read_noise, rng)

    size_in, size_t = cfg.input_budget, cfg.target_budget
    out = {
        "enc_ids": np.zeros(size_in, np.int64), "enc_mod": np.zeros(size_in, np.int64),
        "enc_pos": np.zeros(size_in, np.int64), "enc_valid": np.zeros(size_in, bool),
        "dec_query": np.full(size_t, -1, np.int64), "dec_mod": np.zeros(size_t, np.int64),
        "dec_pos": np.zeros(size_t, np.int64), "dec_labels": np.full(size_t, IGNORE, np.int64),
        "dec_valid": np.zeros(size_t, bool), "dec_prior": np.full(size_t, -1, np.int64),
    }  # fmt: skip
    i = t = 0  # next free input / target slot
    for j, name in enumerate(names):
        k_in, k_t, el, tok = int(n_in[j]), int(n_t[j]), eligible[name], ids[name]
        if k_in + k_t == 0:
            continue
        if _KIND[name] == "text":
            start = int(rng.integers(0, len(el) - k_t + 1))
            tgt = el[start : start + k_t]
            rest = np.concatenate([el[:start], el[start + k_t :]])
            inp = np.sort(rng.choice(rest, k_in, replace=False))
            query = tok[tgt - 1]  # teacher forcing: token i-1 ...
            if k_t:
                query[0] = BOS_ID  # ... and the start marker at the span start
            labels = tok[tgt]
        else:
            perm = rng.permutation(len(el))
            inp, tgt = np.sort(perm[:k_in]), np.sort(perm[k_in : k_in + k_t])
            query = np.full(k_t, -1, dtype=np.int64)
            labels = tok[tgt]
            if k_t >= 2 and rng.random() < cfg.reveal_prob:
                n_mask = max(1, math.ceil(float(cosine_schedule(rng.random())) * k_t))
                shown = rng.choice(k_t, k_t - n_mask, replace=False)
                query[shown], labels[shown] = labels[shown], IGNORE
        mod = _INDEX[name]
        out["enc_ids"][i : i + k_in] = tok[inp]
        out["enc_pos"][i : i + k_in] = inp
        out["enc_mod"][i : i + k_in] = mod
        out["dec_query"][t : t + k_t] = query
        out["dec_labels"][t : t + k_t] = labels
        out["dec_pos"][t : t + k_t] = tgt
        out["dec_mod"][t : t + k_t] = mod
        src = _PRESENT_OF.get(name)
        if src in ids:
            out["dec_prior"][t : t + k_t] = ids[src][tgt % len(ids[src])]
        i, t = i + k_in, t + k_t
    out["enc_valid"][:i] = True
    out["dec_valid"][:t] = True
    out["present_pose"] = (
        ids["coords"] if "coords" in ids else np.full(TOKENS_PER_POSE, -1, np.int64)
    )
    out["future_pose"] = (
        ids["coords_next"] if "coords_next" in ids else np.full(_FUTURE_LEN, -1, np.int64)
    )
    return {**out, **extra}


def _read_noise(pose: np.ndarray, sigma: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """A (39,) skeleton with each placed joint moved by N(0, (u sigma_j)^2), u ~ U(0, sqrt 3)."""
    xy = pose.reshape(NUM_JOINTS, 3)[:, :2]
    scale = rng.uniform(0, math.sqrt(3)) * np.asarray(sigma)[:, None] * POSE_BINS
    moved = np.clip(np.rint(xy + rng.standard_normal(xy.shape) * scale), 0, POSE_BINS - 1)
    out = pose.reshape(NUM_JOINTS, 3).copy()
    out[:, :2] = np.where(xy < POSE_BINS, moved, xy).astype(np.int64)
    return out.reshape(-1)


def collate(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack masked samples (from mask_sample) into the batch `M2Model.forward` takes."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in samples[0]}


class MaskCollator:
    """DataLoader `collate_fn`: raw samples -> masked batch. Each worker process draws
    from its own generator, seeded by (seed, torch.initial_seed()): different per worker
    and per epoch, reproducible when the training script seeds torch."""

    def __init__(self, cfg: MaskingConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed
        self._key: int | None = None
        self._rng: np.random.Generator | None = None

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        key = torch.initial_seed() % 2**63
        if self._rng is None or key != self._key:
            self._key, self._rng = key, np.random.default_rng([self.seed, key])
        return collate([mask_sample(s, self.cfg, self._rng) for s in samples])


def random_sample(
    rng: np.random.Generator,
    image_vocab: int = 4096,
    text_vocab: int = 1000,
    caption_len: int = 32,
    caption_tokens: int | None = None,
) -> dict[str, np.ndarray]:
    """A raw sample of random but well-formed tokens (for benchmarks and tests)."""
    reg = build_registry(image_vocab, text_vocab, caption_len)
    out: dict[str, np.ndarray] = {}
    for name, m in reg.items():
        if m.kind == "image":
            out[name] = rng.integers(0, image_vocab, m.num_tokens)
        elif m.kind == "pose":
            ids = rng.integers(0, m.vocab_size - 2, m.num_tokens)
            ids[2::3] = m.vocab_size - 2 + rng.integers(0, 2, m.num_tokens // 3)
            out[name] = ids
        else:
            n = (
                caption_tokens
                if caption_tokens is not None
                else int(rng.integers(1, caption_len - 1))
            )
            if not 0 <= n <= caption_len - 2:
                raise ValueError(f"caption_tokens must be in [0, {caption_len - 2}], got {n}")
            ids = np.full(caption_len, PAD_ID, dtype=np.int64)
            ids[0], ids[n + 1] = BOS_ID, EOS_ID
            ids[1 : n + 1] = rng.integers(EOS_ID + 1, text_vocab, n)
            out[name] = ids
    return out
