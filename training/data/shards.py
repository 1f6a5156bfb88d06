"""Token shards on disk -> masked training batches, in an order fixed by (seed, step).

`Shards` memory-maps one split that `m2 prepare` wrote (checked against `meta.json`).

The order of samples is a pure function of the seed: global sample position p (0, 1, 2,
... across the whole run) is row `perm_e[p mod N]` of epoch e = p div N, masked with a
generator seeded by (seed, p). Step k of a run with global batch G takes positions
kG ... kG + G - 1; micro-step a of process r takes the slice
`kG + a*B*P + r*B ... + B` (B per-device batch, P processes). So

- resuming at step k needs nothing but k (the data position is the step),
- 1 process x 2 accumulation steps and 2 processes x 1 step see the same samples with
  the same masks, and
- DataLoader workers can be added or removed without changing a single batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

MODALITY_ARRAYS = ("tok_rgb", "coords", "captions", "tok_rgb_next", "coords_next")
EXTRA_ARRAYS = ("coords_prev", "bbox", "clip", "frame", "action")


def load_meta(root: str | Path) -> dict[str, Any]:
    """meta.json of a prepared folder; a folder without it is an unfinished `m2 prepare`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {root}: no such directory (run `m2 prepare` first)")
    path = root / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{root}: no meta.json, so not a finished `m2 prepare` output (rerun it to complete)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: damaged JSON ({e})") from None
    for key in ("counts", "image_vocab", "text_vocab", "caption_len"):
        if key not in meta:
            raise ValueError(f"{path}: missing field {key!r}")
    return meta


class Shards:
    """One split of a prepared folder, memory-mapped: `arrays[name]` is (N, ...) on disk."""

    def __init__(self, root: str | Path, split: str, meta: dict[str, Any] | None = None):
        self.root = Path(root)
        self.meta = meta or load_meta(self.root)
        if split not in self.meta["counts"]:
            raise ValueError(f"{self.root}: no split {split!r} (have {list(self.meta['counts'])})")
        self.split = split
        n = self.meta["counts"][split]["samples"]
        self.arrays: dict[str, np.ndarray] = {}
        for name in (*MODALITY_ARRAYS, *EXTRA_ARRAYS):
            path = self.root / split / f"{name}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing shard array")
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:
                raise ValueError(f"{path}: damaged shard array ({e})") from None
            if len(arr) != n:
                raise ValueError(f"{path}: {len(arr)} rows, meta.json says {n}")
            self.arrays[name] = arr

    def __len__(self) -> int:
        return len(self.arrays["tok_rgb"])

    def sample(self, row: int) -> dict[str, np.ndarray]:
        """The five modalities of one sample as int64 arrays (captions padded with 0), and
        its clip's `action` id."""
        return {
            name: np.asarray(self.arrays[name][row], dtype=np.int64)
            for name in (*MODALITY_ARRAYS, "action")
        }

    def modalities(self, rows: np.ndarray | slice) -> dict[str, torch.Tensor]:
        """Full (unmasked) token tensors of several rows, int64."""
        return {
            name: torch.from_numpy(np.asarray(self.arrays[name][rows], dtype=np.int64))
            for name in MODALITY_ARRAYS
        }

    def pose_pairs(self, n: int, key: list[int]) -> dict[str, torch.Tensor]:
        """`n` rows drawn by `key` -> their skeleton now and whole future, as the motion
        path's extra pairs (`motion_present` (n, 39), `motion_future` (n, 234)), and their
        action, given for half of them as a steering input (`motion_action` (n,), -1 = none)."""
        rng = np.random.default_rng([*key, 0x9A1])
        rows = np.sort(rng.integers(0, len(self), n))
        out = {
            f"motion_{k}": torch.from_numpy(np.asarray(self.arrays[name][rows], dtype=np.int64))
            for k, name in (("present", "coords"), ("future", "coords_next"))
        }
        action = np.asarray(self.arrays["action"][rows], np.int64)
        out["motion_action"] = torch.from_numpy(np.where(rng.random(n) < 0.5, action, -1))
        return out

    def frames(self, n: int, key: list[int]) -> dict[str, torch.Tensor]:
        """`n` rows drawn by `key` -> their frame and skeleton now (`read_rgb` (n, 256),
        `read_pose` (n, 39)), the heat map's extra frames."""
        rows = np.sort(np.random.default_rng([*key, 0x4EA7]).integers(0, len(self), n))
        return {
            f"read_{k}": torch.from_numpy(np.asarray(self.arrays[name][rows], dtype=np.int64))
            for k, name in (("rgb", "tok_rgb"), ("pose", "coords"))
        }


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def sample_generator(seed: int, position: int) -> np.random.Generator:
    """The masking RNG of global sample position `position`."""
    return np.random.default_rng([seed, position, 0xA5C])


class MaskedDataset(Dataset):
    """Index = global sample position; returns the masked sample (see module docstring).

    `mask_fn(sample, rng) -> dict` is the masking step (m2core.masking.mask_sample bound to
    its config).
    """

    def __init__(self, shards: Shards, mask_fn, seed: int):
        if len(shards) == 0:
            raise ValueError(f"{shards.root}: split {shards.split!r} has no samples")
        self.shards, self.mask_fn, self.seed = shards, mask_fn, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:  # positions are unbounded; this is one epoch
        return len(self.shards)

    def row(self, position: int) -> int:
        epoch, k = divmod(position, len(self.shards))
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.seed, epoch, len(self.shards)))
        return int(self._perm[1][k])

    def __getitem__(self, position: int) -> dict[str, Any]:
        return self.mask_fn(
            self.shards.sample(self.row(position)), sample_generator(self.seed, position)
        )


class StepSampler(Sampler[list[int]]):
    """Yields this process's positions for each micro-step, from `start_step` to `total_steps`."""

    def __init__(
        self,
        batch_size: int,
        num_processes: int,
        rank: int,
        grad_accum: int,
        start_step: int,
        total_steps: int,
    ):
        self.b, self.p, self.r, self.a = batch_size, num_processes, rank, grad_accum
        self.start, self.total = start_step, total_steps

    def positions(self, step: int, micro: int) -> list[int]:
        g = self.b * self.p * self.a
        first = step * g + micro * self.b * self.p + self.r * self.b
        return list(range(first, first + self.b))

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.total):
            for micro in range(self.a):
                yield self.positions(step, micro)

    def __len__(self) -> int:
        return max(0, self.total - self.start) * self.a
