"""Helpers of the service tests: a tiny, randomly initialised but real checkpoint (saved
with m2core's own save code), frames to upload, settings, waiting for /readyz."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from starlette.testclient import TestClient

from m2core.checkpoint import save_checkpoint
from m2core.model import M2Config, M2Model
from m2core.model_v2 import M2ConfigV2, M2ModelV2
from m2core.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from m2core.tokenizers.text import TextTokenizer
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CAPTIONS = [
    "a person doing jumping jacks in a park",
    "a person waving the right arm",
    "a person squatting in front of a wall",
    "a person walking to the left",
]


def make_checkpoint(directory: Path) -> Path:
    """A tiny M2 (untrained weights) + fresh image tokenizer + text tokenizer on disk."""
    torch.manual_seed(0)
    text = TextTokenizer.build(CAPTIONS, max_len=12)
    image = ImageTokenizer(ImageTokenizerConfig(levels=(4, 4), channels=(8, 8, 8, 8), res_blocks=0))
    config = M2Config(
        preset="tiny", dim=32, enc_layers=1, dec_layers=1, heads=2,
        image_vocab=image.vocab_size, text_vocab=text.vocab_size, caption_len=text.max_len,
    )  # fmt: skip
    save_checkpoint(directory, M2Model(config), image_tokenizer=image, text_tokenizer=text)
    return directory


ACTIONS = ["jumping_jacks", "waving", "squat"]


def make_checkpoint_v2(directory: Path) -> Path:
    """The same, format 2 (names an action of ACTIONS, gives per-joint confidence)."""
    torch.manual_seed(0)
    text = TextTokenizer.build(CAPTIONS, max_len=12)
    image = ImageTokenizer(ImageTokenizerConfig(levels=(4, 4), channels=(8, 8, 8, 8), res_blocks=0))
    config = M2ConfigV2(
        dim=32, enc_layers=1, dec_layers=1, heads=2, image_levels=image.config.levels,
        text_vocab=text.vocab_size, caption_len=text.max_len, action_classes=len(ACTIONS),
    )  # fmt: skip
    save_checkpoint(directory, M2ModelV2(config), image_tokenizer=image, text_tokenizer=text,
                    extra={"data": {"actions": ACTIONS}})  # fmt: skip
    return directory


def png_bytes(width: int = 160, height: int = 120, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"/readyz not 200 after {timeout} s: {client.get('/readyz').json()}")


def settings_for(checkpoint: Path, **overrides) -> Settings:
    base = {"checkpoint": checkpoint, "device": "cpu", "max_wait_ms": 5.0, "store_ttl_s": 60.0}
    return Settings(**{**base, **overrides})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def m2_command() -> list[str]:
    """The installed `m2` console script next to this Python, else the same via -m."""
    script = Path(sys.executable).parent / "m2"
    return [str(script)] if script.exists() else [sys.executable, "-m", "training.cli"]


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("M2_")}
    return {**env, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


@contextmanager
def run_server(checkpoint: Path, *extra: str, timeout: float = 60.0) -> Iterator[str]:
    """Start `m2 serve` on a free port, wait for /readyz, yield the URL, stop it."""
    port = free_port()
    cmd = [*m2_command(), "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--device", "cpu", "--log-level", "warning", *extra]  # fmt: skip
    log = tempfile.TemporaryFile()  # noqa: SIM115 -- closed in the finally below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(), cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(
                    f"m2 serve exited with {proc.returncode}: {log.read().decode()}"
                )
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"m2 serve not ready after {timeout} s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
