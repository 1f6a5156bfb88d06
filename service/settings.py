"""The service's settings: one typed `Settings` object, from arguments or `M2_*` variables.

Every knob of `m2 serve` lives here (pydantic-settings): `M2_CHECKPOINT=... m2 serve`
and `m2 serve --checkpoint ...` mean the same. `m2 serve --help` and the README's table
are made from / checked against these fields and `shown_default`, so a field's
description and default are written once. Nothing reads the environment at import
time: `create_app(Settings())` does, when the app is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEMO_CHECKPOINT = Path("checkpoints") / "m2-demo"


def default_checkpoint() -> Path:
    """`checkpoints/m2-demo`: next to the repo / package first, else the working directory.

    The service package lives in `<repo>/service/`, so the repo's bundled checkpoint is
    `<repo>/checkpoints/m2-demo` wherever the command is run from. An installed (non
    editable) package has no repo around it; then `./checkpoints/m2-demo` is the guess.
    """
    repo_copy = Path(__file__).resolve().parent.parent / DEMO_CHECKPOINT
    return repo_copy if repo_copy.exists() else Path.cwd() / DEMO_CHECKPOINT


class Settings(BaseSettings):
    """All settings of the service. Environment variables: `M2_<FIELD>` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="M2_", extra="ignore", frozen=True)

    # --- Model -------------------------------------------------------------------------
    checkpoint: Path = Field(default_factory=default_checkpoint, description="checkpoint dir")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch")
    warmup: bool = Field(True, description="run a warm-up prediction before /readyz says ok")

    # --- HTTP --------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="port, 0 = any free one")
    api_key: SecretStr | None = Field(
        None, description="when set, required on all routes but health"
    )
    cors_origins: list[str] = Field(default_factory=list, description="CORS off unless set")

    # --- Batching and backpressure -----------------------------------------------------
    max_batch_size: int = Field(8, ge=1, le=256, description="requests per model call")
    max_wait_ms: float = Field(10.0, ge=0.0, le=10_000.0, description="wait to fill a batch")
    max_queue: int = Field(64, ge=1, description="waiting requests before 503")
    request_timeout_s: float = Field(60.0, gt=0.0, description="per-request deadline -> 504")

    # --- Input limits ------------------------------------------------------------------
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="request body cap in bytes -> 413"
    )
    max_pixels: int = Field(40_000_000, ge=1, description="width x height cap -> 413")
    allowed_formats: tuple[str, ...] = Field(
        ("PNG", "JPEG", "WEBP", "BMP"), description="image formats taken (others: 415)"
    )
    max_steps: int = Field(4, ge=1, le=32, description="roll-out steps allowed per request")
    max_temperature: float = Field(5.0, gt=0.0, description="highest sampling temperature")
    default_temperature: float = Field(
        0.0, ge=0.0, description="sampling temperature when a request sends none: 0 = most likely"
    )
    max_caption_chars: int = Field(500, ge=1, description="longest caption a request may give")
    decode_concurrency: int = Field(2, ge=1, description="images decoded at once (memory cap)")

    # --- Prediction store and GIFs -----------------------------------------------------
    store_max_items: int = Field(256, ge=1, description="predictions kept for GIF/PNG")
    store_max_bytes: int = Field(
        128 * 1024 * 1024, ge=1024, description="bytes the kept predictions may take"
    )
    store_ttl_s: float = Field(900.0, gt=0.0, description="seconds a prediction is kept")
    gif_max_side: int = Field(384, ge=64, le=2048, description="longer side of GIF frames")
    gif_frame_ms: int = Field(120, ge=20, le=2000, description="display time per GIF frame")

    @model_validator(mode="after")
    def _normalise(self) -> Settings:
        formats = tuple(f.upper() for f in self.allowed_formats)
        object.__setattr__(self, "allowed_formats", formats)
        return self

    def resolved_device(self) -> str:
        """`auto` -> cuda when available, else cpu; `cuda` without a GPU is an error."""
        import torch  # imported here: settings stay cheap to build

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA device is available")
        return self.device


def env_name(field: str) -> str:
    return f"M2_{field.upper()}"


def shown_default(field: str) -> str:
    """A field's default as `m2 serve --help` and the README show it: unset (None), none
    (empty list), 16 MiB (byte sizes), 10 (not 10.0), checkpoints/m2-demo (resolved at run)."""
    info = Settings.model_fields[field]
    if info.default_factory is default_checkpoint:
        return str(DEMO_CHECKPOINT)
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and field.endswith("_bytes") and value % 2**20 == 0:
        return f"{value // 2**20} MiB"
    return str(value)
