"""How far a frame is from the frames a checkpoint was trained on.

A request's features join two views:
- the image: from the tokenizer pass `/predict` makes anyway, the encoder's latent
  statistics per channel, the reconstruction error per token cell, and how many distinct
  codes the frame uses;
- the skeleton the model read: how many joints it calls visible, and its bone lengths
  relative to the torso (a read-out that found no body gives an implausible one).
The score is the mean distance to the k nearest held-out training-domain frames, in
features whitened by those frames' covariance, over a threshold: a high quantile of the
same distance for frames of other clips. Above 1 is out of domain. `m2 calibrate-domain`
stores it all in the checkpoint's `in_domain.safetensors`; docs/in_domain.md has the
measurements, and what the score misses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from m2core.tokenizers.image import ImageTokenizer, atomic_write

FILE_NAME = "in_domain.safetensors"
FORMAT = "m2-in-domain/2"
QUANTILE = 0.98  # of held-out distances: about 2% of in-domain frames warn
NEIGHBOURS = 3


@torch.no_grad()
def encode_with_features(
    tokenizer: ImageTokenizer, images: torch.Tensor | np.ndarray
) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 (B, 256, 256, 3) -> (ids (B, 16, 16), features (B, F) float64): the ids are
    what `tokenizer.encode` gives; the features cost one extra decoder pass."""
    tokenizer.eval()
    x = tokenizer._check_images(images).to(tokenizer.device)
    x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    z = tokenizer.encoder(x.contiguous(memory_format=torch.channels_last))  # (B, d, 16, 16)
    codes, ids = tokenizer.quantizer(z.permute(0, 2, 3, 1))
    recon = tokenizer.decode_codes(codes.permute(0, 3, 1, 2)).clamp(-1, 1)
    cell = tokenizer.config.downsample
    err = F.avg_pool2d(((recon - x) ** 2).mean(1, keepdim=True), cell).flatten(1)  # per cell
    log_err = torch.log(err + 1e-6)
    distinct = torch.tensor([float(torch.unique(r).numel()) for r in ids.flatten(1)])
    feats = torch.cat(
        [
            z.mean((2, 3)),
            z.std((2, 3)),
            log_err.mean(1, keepdim=True),
            log_err.std(1, keepdim=True),
            log_err.quantile(0.9, dim=1, keepdim=True),
            torch.log(distinct.to(z.device) / ids[0].numel()).unsqueeze(1),
        ],
        1,
    )
    return ids, feats.double().cpu().numpy()


BONES = (
    (1, 3),
    (3, 5),
    (2, 4),
    (4, 6),
    (7, 9),
    (9, 11),
    (8, 10),
    (10, 12),
    (1, 2),
    (7, 8),
    (1, 7),
    (2, 8),
    (0, 1),
    (0, 2),
)  # fmt: skip  (Penn Action order)


def skeleton_features(joints: np.ndarray) -> np.ndarray:
    """Read skeletons (N, 13, 3) in frame units (x, y, visible) -> (N, 16): the number of
    visible joints, the torso's log length and each bone's log length over the torso."""
    j = np.asarray(joints, dtype=np.float64).reshape(-1, 13, 3)
    xy = j[..., :2]
    torso = np.linalg.norm((xy[:, 1] + xy[:, 2]) / 2 - (xy[:, 7] + xy[:, 8]) / 2, axis=1) + 1e-3
    bones = np.stack([np.linalg.norm(xy[:, a] - xy[:, b], axis=1) for a, b in BONES], 1)
    return np.concatenate(
        [(j[..., 2] > 0.5).sum(1, keepdims=True), np.log(torso)[:, None],
         np.log(bones / torso[:, None] + 1e-2)], 1,
    )  # fmt: skip


@dataclass(frozen=True)
class DomainCheck:
    """Whitening, the bank of whitened calibration frames and the distance threshold."""

    mean: np.ndarray  # (F,)
    whiten: np.ndarray  # (F, F): x -> (x - mean) @ whiten has identity covariance
    bank: np.ndarray  # (M, F) whitened calibration frames
    threshold: float
    quantile: float
    k: int
    frames: int  # calibration frames in all (bank + threshold)
    source: str  # what they were

    @classmethod
    def fit(
        cls, feats: np.ndarray, source: str, quantile: float = QUANTILE, k: int = NEIGHBOURS
    ) -> DomainCheck:
        """`feats` ordered by clip: the first half's frames are the bank, the threshold is
        the quantile of the second half's distances, so frames are never scored against
        neighbours from their own clip."""
        feats = np.asarray(feats, dtype=np.float64)
        n, f = feats.shape
        if n < 8 * f:
            raise ValueError(f"need at least {8 * f} calibration frames for {f} features, got {n}")
        fit, hold = feats[: n // 2], feats[n // 2 :]
        mean = fit.mean(0)
        cov = np.cov(fit, rowvar=False)
        # shrink towards the diagonal, with a floor: a constant feature must not divide by 0
        cov = 0.9 * cov + 0.1 * np.diag(np.diag(cov)) + 1e-3 * np.diag(cov).mean() * np.eye(f)
        whiten = np.linalg.cholesky(np.linalg.inv(cov))
        check = cls(mean, whiten, (fit - mean) @ whiten, math.inf, quantile, k, n, source)
        threshold = float(np.quantile(check.distance(hold), quantile))
        return cls(mean, whiten, check.bank, threshold, quantile, k, n, source)

    def distance(self, feats: np.ndarray) -> np.ndarray:
        """Mean distance to the k nearest bank frames, per row of `feats` (N, F)."""
        x = torch.from_numpy((np.asarray(feats, dtype=np.float64) - self.mean) @ self.whiten)
        d = torch.cdist(x, torch.from_numpy(self.bank))
        return d.topk(min(self.k, d.shape[1]), largest=False).values.mean(1).numpy()

    def score(self, image_feats: np.ndarray, skeleton_feats: np.ndarray) -> np.ndarray:
        """Per frame, the distance over the threshold: above 1 is out of domain."""
        return self.distance(np.concatenate([image_feats, skeleton_feats], 1)) / self.threshold

    def save(self, checkpoint: str | Path) -> Path:
        """Write `in_domain.safetensors` into the checkpoint folder, atomically."""
        path = Path(checkpoint) / FILE_NAME
        tensors = {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k), dtype=np.float32))
                   for k in ("mean", "whiten", "bank")}  # fmt: skip
        meta = {"format": FORMAT, "threshold": repr(self.threshold), "quantile": repr(self.quantile),
                "k": str(self.k), "frames": str(self.frames), "source": self.source}  # fmt: skip
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        return path

    @classmethod
    def load(cls, checkpoint: str | Path) -> DomainCheck | None:
        """The statistics a checkpoint stores, None when it has none."""
        path = Path(checkpoint) / FILE_NAME
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"expected format {FORMAT!r}, got {meta.get('format')!r}")
                t = {k: f.get_tensor(k).double().numpy() for k in ("mean", "whiten", "bank")}
            f_ = len(t["mean"])
            if t["whiten"].shape != (f_, f_) or t["bank"].ndim != 2 or t["bank"].shape[1] != f_:
                raise ValueError("mean, whiten and bank do not agree in size")
            return cls(t["mean"], t["whiten"], t["bank"], float(meta["threshold"]),
                       float(meta["quantile"]), int(meta["k"]), int(meta["frames"]),
                       meta["source"])  # fmt: skip
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path}: cannot read in-domain statistics ({e})") from None


def feature_count(tokenizer: ImageTokenizer) -> int:
    """Features per frame: the image's (2 per latent channel + 4), then the skeleton's 16."""
    return 2 * len(tokenizer.config.levels) + 4 + 16
