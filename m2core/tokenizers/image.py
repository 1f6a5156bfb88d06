"""The image tokenizer: a small convolutional autoencoder with an FSQ bottleneck.

A letterboxed 256x256 RGB frame becomes a 16x16 grid of ids (downsampling 16) and back.
FSQ (finite scalar quantisation, Mentzer et al. 2023) projects each grid cell to a few
scalars, bounds each with a tanh scaled to its number of levels, and rounds it (with a
straight-through gradient). The id is the mixed-radix number of the rounded levels, so
the codebook is implicit (`prod(levels)` entries), has no parameters and cannot collapse.

The network is kept small because it trains and runs on a 2-core CPU: stride-2 4x4
convolutions widen the channels as they halve the resolution (3 -> 32 -> 64 -> 128 ->
128), residual blocks work at the 16x16 grid where they are cheap, and the decoder
mirrors it with transposed convolutions plus one 3x3 refinement per stage. Tensors are
channels-last, which oneDNN runs fastest on CPU.

Public API (the contract in contracts.md):

- `ImageTokenizerConfig` (frozen dataclass), `ImageTokenizer(config)`, `.vocab_size`.
- `encode(images uint8 (B, 256, 256, 3)) -> LongTensor (B, 16, 16)`;
  `decode(ids (B, 16, 16)) -> uint8 tensor (B, 256, 256, 3)`; both eval, no gradient,
  on the module's device.
- `save_pretrained(dir)` -> `dir/config.json` + `dir/model.safetensors`;
  `ImageTokenizer.from_pretrained(dir)` takes an exported dir or a serving checkpoint dir
  (which holds `image_tokenizer/`).
- `psnr(a, b)`: PSNR in dB of uint8 images, per image.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CHECKPOINT_SUBDIR = "image_tokenizer"  # where a serving checkpoint keeps its tokenizer
FORMAT = "m2-image-tokenizer"


# --- Config ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTokenizerConfig:
    """Architecture of the tokenizer. Stored as `config.json` next to the weights."""

    levels: tuple[int, ...] = (8, 8, 8, 8)  # FSQ levels per latent dim; vocab = product
    channels: tuple[int, ...] = (32, 64, 128, 128)  # one stride-2 stage each, high res first
    res_blocks: int = 2  # residual blocks at the token grid, in encoder and in decoder
    image_size: int = 256  # letterboxed frame side

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(int(v) for v in self.levels))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if not self.levels or any(v < 2 for v in self.levels):
            raise ValueError(f"levels must be a non-empty list of ints >= 2, got {self.levels}")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(
                f"channels must be a non-empty list of positive ints, got {self.channels}"
            )
        if self.res_blocks < 0:
            raise ValueError(f"res_blocks must be >= 0, got {self.res_blocks}")
        if self.image_size % self.downsample:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by the downsampling "
                f"{self.downsample} of {len(self.channels)} stride-2 stages"
            )

    @property
    def downsample(self) -> int:
        return 2 ** len(self.channels)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def vocab_size(self) -> int:
        return math.prod(self.levels)

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self), "vocab_size": self.vocab_size}

    @classmethod
    def from_dict(cls, data: dict) -> ImageTokenizerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"format", "vocab_size"}
        if unknown:
            raise ValueError(f"unknown image tokenizer config keys: {sorted(unknown)}")
        config = cls(**{k: v for k, v in data.items() if k in known})
        if "vocab_size" in data and data["vocab_size"] != config.vocab_size:
            raise ValueError(
                f"vocab_size {data['vocab_size']} does not match levels {config.levels} "
                f"(product {config.vocab_size})"
            )
        return config


# --- FSQ ------------------------------------------------------------------------------------


class FSQ(nn.Module):
    """Finite scalar quantisation of the last dim: bound, round (straight-through), index."""

    def __init__(self, levels: tuple[int, ...], eps: float = 1e-3):
        super().__init__()
        lv = torch.tensor(levels, dtype=torch.float32)
        half_l = (lv - 1) * (1 - eps) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)  # even levels sit between integers
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]], dtype=torch.int64), 0)
        # Derived constants: recomputed from the config, never stored in the weights file.
        self.register_buffer("levels", lv, persistent=False)
        self.register_buffer("half_l", half_l, persistent=False)
        self.register_buffer("offset", offset, persistent=False)
        self.register_buffer("shift", torch.atanh(offset / half_l), persistent=False)
        self.register_buffer("half_width", torch.floor(lv / 2), persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., d) -> codes in [-1, 1] (..., d) with a straight-through gradient, ids (...)."""
        bounded = torch.tanh(z + self.shift) * self.half_l - self.offset
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        return rounded / self.half_width, self.codes_to_ids(rounded)

    def codes_to_ids(self, rounded: torch.Tensor) -> torch.Tensor:
        digits = (rounded.detach() + self.half_width).round().long()  # 0 .. L-1 per dim
        return (digits * self.basis).sum(-1)

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) int -> codes (..., d) in [-1, 1]."""
        digits = (ids.unsqueeze(-1) // self.basis) % self.levels.long()
        return (digits.float() - self.half_width) / self.half_width


# --- Network --------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus the input. Used only at the token grid."""

    def __init__(self, ch: int):
        super().__init__()
        groups = math.gcd(8, ch)
        self.net = nn.Sequential(
            nn.GroupNorm(groups, ch),
            nn.SiLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
            nn.GroupNorm(groups, ch),
            nn.SiLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def _encoder(cfg: ImageTokenizerConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = 3
    for i, ch in enumerate(cfg.channels):
        layers.append(nn.Conv2d(prev, ch, 4, stride=2, padding=1))  # halves H and W
        if i < len(cfg.channels) - 1:
            layers.append(nn.SiLU())
        prev = ch
    layers += [ResBlock(prev) for _ in range(cfg.res_blocks)]
    # Normalise before projecting to the FSQ dims: without it the latents grow until the
    # tanh saturates, every dim sits at its end levels and the codebook collapses to a few ids.
    layers += [
        nn.GroupNorm(math.gcd(8, prev), prev),
        nn.SiLU(),
        nn.Conv2d(prev, len(cfg.levels), 1),
    ]
    return nn.Sequential(*layers)


def _decoder(cfg: ImageTokenizerConfig) -> nn.Sequential:
    widths = cfg.channels[::-1]  # low res first
    layers: list[nn.Module] = [nn.Conv2d(len(cfg.levels), widths[0], 1)]
    layers += [ResBlock(widths[0]) for _ in range(cfg.res_blocks)]
    for i, ch in enumerate(widths):
        out = widths[i + 1] if i + 1 < len(widths) else max(widths[-1] // 2, 8)
        layers += [nn.SiLU(), nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1)]  # doubles
        # One 3x3 refinement per stage: sharpens edges the upsampling smeared.
        layers += [nn.SiLU(), nn.Conv2d(out, out, 3, padding=1)]
    layers += [nn.SiLU(), nn.Conv2d(layers[-1].out_channels, 3, 3, padding=1)]
    return nn.Sequential(*layers)


# --- The tokenizer --------------------------------------------------------------------------


class ImageTokenizer(nn.Module):
    """FSQ autoencoder: uint8 (B, 256, 256, 3) <-> ids (B, 16, 16)."""

    def __init__(self, config: ImageTokenizerConfig | None = None):
        super().__init__()
        self.config = config or ImageTokenizerConfig()
        self.encoder = _encoder(self.config)
        self.quantizer = FSQ(self.config.levels)
        self.decoder = _decoder(self.config)
        self.to(memory_format=torch.channels_last)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # Training path: float images in [-1, 1], any size divisible by the downsampling.
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> (reconstruction (B, 3, H, W), ids (B, H/16, W/16))."""
        codes, ids = self.quantize(x)
        return self.decode_codes(codes), ids

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x.contiguous(memory_format=torch.channels_last))  # (B, d, h, w)
        codes, ids = self.quantizer(z.permute(0, 2, 3, 1))  # FSQ over the last dim
        return codes.permute(0, 3, 1, 2), ids  # (B, d, h, w), (B, h, w)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(codes.contiguous(memory_format=torch.channels_last))

    # Inference path: the contract's uint8 <-> ids.
    @torch.no_grad()
    def encode(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 RGB (B, 256, 256, 3), torch or numpy -> int64 ids (B, 16, 16) on the module's device."""
        self.eval()
        x = self._check_images(images).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, H, W) in [-1, 1]
        return self.quantize(x)[1]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """int ids (B, 16, 16) -> uint8 RGB (B, 256, 256, 3) on the module's device."""
        self.eval()
        ids = self._check_ids(ids).to(self.device)
        codes = self.quantizer.ids_to_codes(ids).permute(0, 3, 1, 2)  # (B, d, 16, 16)
        x = self.decode_codes(codes)
        return to_uint8(x)

    def _check_images(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"images must be a torch tensor or numpy array, got {type(images).__name__}"
            )
        if images.dtype != torch.uint8:
            raise ValueError(
                f"images must be uint8 RGB in 0..255, got dtype {images.dtype} "
                "(convert with (x * 255).round().to(torch.uint8) if you hold floats in [0, 1])"
            )
        s = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (s, s, 3):
            raise ValueError(
                f"images must have shape (B, {s}, {s}, 3), got {tuple(images.shape)}; "
                "letterbox frames first with m2core.geometry.letterbox"
            )
        return images

    def _check_ids(self, ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(ids, np.ndarray):
            ids = torch.from_numpy(ids)
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a torch tensor or numpy array, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}")
        g = self.config.grid
        if ids.ndim != 3 or tuple(ids.shape[1:]) != (g, g):
            raise ValueError(f"ids must have shape (B, {g}, {g}), got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(
                f"ids must lie in [0, {self.vocab_size}), got min {int(ids.min())} max {int(ids.max())}"
            )
        return ids.long()

    # --- Save / load (safetensors + JSON only) ---------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` into `directory`, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(
            directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": FORMAT})
        )
        text = json.dumps(self.config.to_dict(), indent=2) + "\n"
        atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text))
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu"
    ) -> ImageTokenizer:
        """Load from an exported tokenizer dir or a serving checkpoint dir with `image_tokenizer/`."""
        directory = resolve_dir(directory)
        config_path = directory / CONFIG_NAME
        try:
            data = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{config_path}: cannot read tokenizer config ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{config_path}: expected a JSON object")
        try:
            config = ImageTokenizerConfig.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{config_path}: {exc}") from exc
        model = cls(config)
        weights = directory / WEIGHTS_NAME
        try:
            state = load_file(str(weights))
        except Exception as exc:  # safetensors raises several types for damaged files
            raise ValueError(f"{weights}: cannot read weights ({exc})") from exc
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{weights}: weights do not match {config_path}: {exc}") from exc
        return model.to(device).eval()


def resolve_dir(directory: str | Path) -> Path:
    """The folder holding the tokenizer's files: `directory` or `directory/image_tokenizer`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such tokenizer directory")
    nested = directory / CHECKPOINT_SUBDIR
    if (nested / CONFIG_NAME).is_file():
        return nested
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{directory}: not an image tokenizer (needs {CONFIG_NAME} + {WEIGHTS_NAME}, "
            f"or a checkpoint with {CHECKPOINT_SUBDIR}/)"
        )
    return directory


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)` on a temp file beside `path`, then move it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the exported files are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    x = ((x.float() + 1.0) * 127.5).round_().clamp_(0, 255)
    return x.permute(0, 2, 3, 1).to(torch.uint8).contiguous()


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """PSNR in dB of uint8 images (..., H, W, C), one value per image (capped at 100 dB)."""
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double()
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = ((a.cpu() - b.cpu()) ** 2).flatten(-3).mean(-1)
    return (10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))).clamp_max(100.0).numpy()
