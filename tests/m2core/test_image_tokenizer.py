"""The FSQ image tokenizer: shapes, id range, determinism, learning, save/load, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from m2core.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, psnr

TINY = ImageTokenizerConfig(levels=(8, 5, 5, 5), channels=(8, 16, 32, 32), res_blocks=1)


def figure_frames(n: int = 4) -> torch.Tensor:
    """uint8 (n, 256, 256, 3): a stick figure on a coloured background, moving per frame."""
    frames = []
    for i in range(n):
        img = Image.new("RGB", (256, 256), (30 + 40 * i, 90, 160 - 30 * i))
        d = ImageDraw.Draw(img)
        cx = 90 + 20 * i
        d.ellipse([cx - 14, 40, cx + 14, 68], fill=(240, 200, 160))
        d.line([cx, 68, cx, 150], fill=(220, 40, 40), width=10)
        d.line([cx, 90, cx + 50 * math.cos(i), 90 + 50 * math.sin(i)], fill=(250, 250, 60), width=7)
        d.line([cx, 150, cx - 25, 220], fill=(20, 20, 120), width=9)
        d.line([cx, 150, cx + 25, 220], fill=(20, 20, 120), width=9)
        frames.append(np.asarray(img))
    return torch.from_numpy(np.stack(frames))


@pytest.fixture(scope="module")
def tok() -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(TINY).eval()


def test_shapes_dtype_and_id_range(tok: ImageTokenizer) -> None:
    assert tok.vocab_size == 8 * 5 * 5 * 5 == TINY.to_dict()["vocab_size"]
    frames = figure_frames(3)
    ids = tok.encode(frames.numpy())  # numpy accepted as well as torch
    assert ids.shape == (3, 16, 16) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size
    out = tok.decode(ids)
    assert out.shape == (3, 256, 256, 3) and out.dtype == torch.uint8
    assert not torch.is_grad_enabled() or not out.requires_grad


def test_fsq_ids_are_a_bijection_over_the_codebook(tok: ImageTokenizer) -> None:
    fsq = tok.quantizer
    ids = torch.arange(tok.vocab_size)
    codes = fsq.ids_to_codes(ids)  # (V, d) in [-1, 1]
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.equal(fsq.codes_to_ids(codes * fsq.half_width), ids)
    # Any real-valued latent lands on a valid id and the straight-through codes agree with it.
    z = torch.randn(1000, 4) * 3
    q, z_ids = fsq(z)
    assert int(z_ids.min()) >= 0 and int(z_ids.max()) < tok.vocab_size
    assert torch.allclose(fsq.ids_to_codes(z_ids), q)


def test_deterministic_and_independent_of_batch(tok: ImageTokenizer) -> None:
    frames = figure_frames(4)
    a, b = tok.encode(frames), tok.encode(frames)
    assert torch.equal(a, b)
    assert torch.equal(tok.encode(frames[2:3])[0], a[2])  # alone or in a batch: same ids
    assert torch.equal(tok.decode(a), tok.decode(b))


def test_training_a_few_steps_improves_reconstruction() -> None:
    torch.manual_seed(0)
    model = ImageTokenizer(TINY)
    frames = figure_frames(2)
    before = psnr(model.decode(model.encode(frames)), frames).mean()
    x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(40):
        recon, _ = model(x)
        loss = (recon - x).abs().mean() + (recon - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = psnr(model.decode(model.encode(frames)), frames).mean()
    assert after > before + 3, (before, after)


def test_save_load_gives_identical_ids_and_images(tok: ImageTokenizer, tmp_path) -> None:
    frames = figure_frames(2)
    tok.save_pretrained(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["vocab_size"] == 1000
    loaded = ImageTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == tok.config
    ids = tok.encode(frames)
    assert torch.equal(loaded.encode(frames), ids)
    assert torch.equal(loaded.decode(ids), tok.decode(ids))
    # A serving checkpoint dir (its own config.json at the top) holds it as image_tokenizer/.
    ckpt = tmp_path / "ckpt"
    tok.save_pretrained(ckpt / "image_tokenizer")
    (ckpt / "config.json").write_text(json.dumps({"preset": "tiny"}))
    assert torch.equal(ImageTokenizer.from_pretrained(ckpt).encode(frames), ids)


def test_bad_images_raise_clear_errors(tok: ImageTokenizer) -> None:
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(torch.rand(1, 256, 256, 3))
    with pytest.raises(ValueError, match="letterbox"):
        tok.encode(torch.zeros(1, 240, 320, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 256, 256, 3\)"):
        tok.encode(torch.zeros(256, 256, 3, dtype=torch.uint8))  # missing batch dim
    with pytest.raises(ValueError, match=r"\(B, 256, 256, 3\)"):
        tok.encode(torch.zeros(1, 3, 256, 256, dtype=torch.uint8))  # channels first
    with pytest.raises(TypeError, match="tensor or numpy"):
        tok.encode([[0]])


def test_bad_ids_raise_clear_errors(tok: ImageTokenizer) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        tok.decode(torch.full((1, 16, 16), 1000))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        tok.decode(torch.full((1, 16, 16), -1))
    with pytest.raises(ValueError, match=r"\(B, 16, 16\)"):
        tok.decode(torch.zeros(1, 256, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        tok.decode(torch.zeros(1, 16, 16))


def test_load_errors_name_the_file(tok: ImageTokenizer, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such"):
        ImageTokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not an image tokenizer"):
        ImageTokenizer.from_pretrained(tmp_path / "empty")
    d = tok.save_pretrained(tmp_path / "damaged")
    (d / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        ImageTokenizer.from_pretrained(d)
    d = tok.save_pretrained(tmp_path / "mismatch")
    cfg = json.loads((d / "config.json").read_text())
    cfg["channels"] = [8, 16, 32, 16]  # weights no longer fit
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        ImageTokenizer.from_pretrained(d)
    cfg["channels"], cfg["vocab_size"] = [8, 16, 32, 32], 4096  # vocab typed twice, disagreeing
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vocab_size"):
        ImageTokenizer.from_pretrained(d)


def test_config_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError, match="levels"):
        ImageTokenizerConfig(levels=(8, 1))
    with pytest.raises(ValueError, match="divisible"):
        ImageTokenizerConfig(image_size=200)
    assert ImageTokenizerConfig().grid == 16 and ImageTokenizerConfig().vocab_size == 4096
