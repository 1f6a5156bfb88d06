"""`m2 train-tokenizer` and `m2 tokenize-image` end to end on a tiny Penn-Action-layout folder."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from penn_layout import write_label
from PIL import Image, ImageDraw

from m2core.tokenizers.image import ImageTokenizer, psnr
from training.data.tokenize_image import main as tokenize_main
from training.tokenizer import data
from training.tokenizer.train import TokenizerTrainConfig, load_config
from training.tokenizer.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
TINY = ["channels=[8,16,32,32]", "res_blocks=1", "levels=[8,5,5,5]", "batch_size=4",
        "crop=64", "warmup_steps=2", "lr=0.005", "eval_every=5", "checkpoint_every=5",
        "time_budget=0"]  # fmt: skip


def write_clips(
    root: Path, clips: int = 5, frames: int = 4, size: tuple[int, int] = (240, 180)
) -> Path:
    """Penn Action layout: frames/NNNN/NNNNNN.jpg + labels/NNNN.mat; the last clip is a test clip."""
    w, h = size
    rng = np.random.default_rng(0)
    (root / "labels").mkdir(parents=True)
    for c in range(1, clips + 1):
        cid = f"{c:04d}"
        (root / "frames" / cid).mkdir(parents=True)
        bg = tuple(int(v) for v in rng.integers(0, 256, 3))
        xs, ys = np.zeros((frames, 13)), np.zeros((frames, 13))
        for f in range(frames):
            img = Image.new("RGB", (w, h), bg)
            d = ImageDraw.Draw(img)
            cx, cy = 70 + 15 * f, 60
            d.ellipse([cx - 10, cy - 30, cx + 10, cy - 10], fill=(240, 200, 160))
            d.line([cx, cy - 10, cx, cy + 50], fill=(200, 30, 30), width=8)
            d.line(
                [cx, cy, cx + 40 * math.cos(f), cy + 40 * math.sin(f)], fill=(250, 240, 50), width=6
            )
            d.line([cx, cy + 50, cx - 20, cy + 100], fill=(20, 20, 120), width=7)
            img.save(root / "frames" / cid / f"{f + 1:06d}.jpg", quality=95)
            xs[f], ys[f] = cx, cy
        write_label(root, cid, xs, ys, (w, h), train=c < clips)
    return root


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return write_clips(tmp_path_factory.mktemp("penn"))


@pytest.fixture(scope="module")
def trained(clips, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    assert train_main(["--data", str(clips), "--out", str(out), "steps=10", *TINY]) == 0
    return out


def test_train_exports_metrics_and_resumes(clips, trained, capsys) -> None:
    tok = ImageTokenizer.from_pretrained(trained)
    assert tok.vocab_size == 1000 and tok.config.channels == (8, 16, 32, 32)
    metrics = json.loads((trained / "metrics.json").read_text())
    held = metrics["held_out"]
    assert held["frames"] == 4 and metrics["held_out_clips"] == 1  # clip 0005 has train = -1
    for key in ("psnr", "psnr_block_mean", "psnr_nearest", "codebook_usage"):
        assert np.isfinite(held[key])
    assert [h["step"] for h in metrics["history"]] == [5, 10]
    # Same --out, more steps: continues from the step-10 checkpoint, keeps only the newest.
    assert train_main(["--data", str(clips), "--out", str(trained), "steps=15", *TINY]) == 0
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["resumed_from"] == 10 and [h["step"] for h in metrics["history"]] == [15]
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == [
        "latest.json",
        "step-0000015",
    ]
    assert "held-out PSNR" in capsys.readouterr().out


def test_resume_with_other_model_settings_is_refused(clips, trained, capsys) -> None:
    args = ["--data", str(clips), "--out", str(trained), "steps=20", *TINY, "levels=[8,8,8,8]"]
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
    assert err.startswith("m2 train-tokenizer: error:") and "levels" in err and "\n" not in err


def test_damaged_checkpoint_is_a_clear_error(clips, trained, tmp_path, capsys) -> None:
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    (next((out / "checkpoints").glob("step-*")) / "optimizer.safetensors").write_bytes(b"junk")
    assert train_main(["--data", str(clips), "--out", str(out), "steps=30", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("m2 train-tokenizer: error:") and "cannot resume" in err


def test_split_is_by_clip(clips) -> None:
    train, held = data.split_clips(clips, val_fraction=0.5)
    assert [c.clip_id for c in held] == ["0005"]  # the label's train flag wins
    assert [c.clip_id for c in train] == ["0001", "0002", "0003", "0004"]
    assert {c.clip_id for c, _ in data.frame_refs(held)} == {"0005"}


def test_baselines_are_exact_on_blocky_images() -> None:
    small = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    blocky = small.repeat_interleave(16, 1).repeat_interleave(16, 2)  # constant 16x16 patches
    assert torch.equal(data.block_mean(blocky), blocky)
    assert torch.equal(data.nearest_resample(blocky), blocky)
    noisy = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    assert psnr(data.block_mean(noisy), noisy).mean() < 20


def test_config_file_matches_defaults_and_overrides_are_typed() -> None:
    assert load_config(REPO / "configs" / "tokenizer.yaml") == TokenizerTrainConfig()
    cfg = load_config(None, ["steps=7", "lr=1e-3", "levels=[8,5,5,5]"])
    assert (cfg.steps, cfg.lr, cfg.levels, cfg.model_config().vocab_size) == (
        7,
        1e-3,
        (8, 5, 5, 5),
        1000,
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [("stepz=3", "unknown config key 'stepz'"), ("steps=many", "'steps' expects"),
     ("crop=100", "crop must be a multiple of 16"), ("steps", "not key=value")],
)  # fmt: skip
def test_bad_config_is_one_clear_line(clips, tmp_path, capsys, override, message) -> None:
    assert train_main(["--data", str(clips), "--out", str(tmp_path / "o"), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
    assert message in err and err.startswith("m2 train-tokenizer: error:") and "\n" not in err


def test_missing_data_dir(tmp_path, capsys) -> None:
    assert train_main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such data directory" in capsys.readouterr().err


def test_tokenize_image_round_trip(clips, trained, tmp_path, capsys) -> None:
    src = clips / "frames" / "0005" / "000001.jpg"  # 240x180: letterboxed with black bars
    out = tmp_path / "recon.png"
    assert (
        tokenize_main(
            [
                str(src),
                "--tokenizer",
                str(trained),
                "--out",
                str(out),
                "--ids",
                str(tmp_path / "ids.json"),
            ]
        )
        == 0
    )
    recon = np.asarray(Image.open(out))
    assert recon.shape == (256, 256, 3)
    printed = capsys.readouterr().out
    assert printed.startswith("PSNR ") and "dB" in printed
    ids = json.loads((tmp_path / "ids.json").read_text())["ids"]
    assert np.array(ids).shape == (16, 16)
    # A serving checkpoint dir works too (the tokenizer under image_tokenizer/).
    ckpt = tmp_path / "ckpt"
    ImageTokenizer.from_pretrained(trained).save_pretrained(ckpt / "image_tokenizer")
    (ckpt / "config.json").write_text("{}")
    out2 = tmp_path / "recon2.png"
    assert tokenize_main([str(src), "--tokenizer", str(ckpt), "--out", str(out2)]) == 0
    assert np.array_equal(np.asarray(Image.open(out2)), recon)


def test_tokenize_image_bad_inputs(trained, tmp_path, capsys) -> None:
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not a jpeg")
    cases = [
        [str(junk), "--tokenizer", str(trained), "--out", str(tmp_path / "a.png")],
        [
            str(tmp_path / "missing.jpg"),
            "--tokenizer",
            str(trained),
            "--out",
            str(tmp_path / "a.png"),
        ],
        [str(junk), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "a.png")],
        [str(junk), "--tokenizer", str(trained), "--out", str(tmp_path / "a.xyz")],
    ]
    for argv in cases:
        assert tokenize_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
        assert err.startswith("m2 tokenize-image: error:") and "\n" not in err
    assert not (tmp_path / "a.png").exists()
