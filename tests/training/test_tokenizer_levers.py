"""The image tokenizer's levers for thin limbs: the limb band and its loss weight, the time
budget, and `m2 eval-tokenizer`'s report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from penn_layout import write_label
from PIL import Image, ImageDraw

from m2core.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from training.eval.tokenizer import main as eval_main
from training.tokenizer import data
from training.tokenizer.train import load_config, recon_loss, sample_batch, train

REPO = Path(__file__).resolve().parents[2]
SIZE = 128  # frames are 128x128, letterboxed to 256x256 (scale 2)
TINY = ["channels=[8,16,16,16]", "res_blocks=1", "levels=[8,5,5,5]", "batch_size=4", "crop=128",
        "warmup_steps=2", "lr=0.01", "eval_every=1000", "checkpoint_every=1000", "val_frames=8"]  # fmt: skip


def figure(rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """A 128x128 frame of a stick figure with 2-px limbs, and its 13 joints (x, y)."""
    img = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in rng.integers(40, 200, 3)))
    cx, cy = rng.uniform(50, 78), rng.uniform(40, 60)
    j = np.zeros((13, 2))
    j[0] = cx, cy - 22
    j[1], j[2] = (cx - 8, cy - 12), (cx + 8, cy - 12)
    j[7], j[8] = (cx - 6, cy + 12), (cx + 6, cy + 12)
    for s, (sh, el, wr, hip, kn, an) in enumerate([(1, 3, 5, 7, 9, 11), (2, 4, 6, 8, 10, 12)]):
        side = -1 if s == 0 else 1
        a = rng.uniform(-2.5, 0.5)  # arm angle: up to raised
        j[el] = j[sh] + 14 * np.array([side * np.cos(a), np.sin(a)])
        j[wr] = j[el] + 13 * np.array([side * np.cos(a - 0.4), np.sin(a - 0.4)])
        j[kn] = j[hip] + [side * rng.uniform(0, 6), 16]
        j[an] = j[kn] + [side * rng.uniform(0, 6), 16]
    pen = ImageDraw.Draw(img)
    limb = tuple(int(v) for v in rng.integers(0, 256, 3))
    pen.ellipse([j[0][0] - 6, j[0][1] - 6, j[0][0] + 6, j[0][1] + 6], fill=(230, 190, 150))
    pen.polygon([tuple(j[1]), tuple(j[2]), tuple(j[8]), tuple(j[7])], fill=(200, 40, 40))
    for a, b in data.LIMB_SEGMENTS:
        pen.line([tuple(j[a]), tuple(j[b])], fill=limb, width=2)
    return img, j


def write_figures(root: Path, clips: int = 6, frames: int = 6) -> Path:
    rng = np.random.default_rng(0)
    (root / "labels").mkdir(parents=True)
    for c in range(1, clips + 1):
        cid = f"{c:04d}"
        (root / "frames" / cid).mkdir(parents=True)
        xs, ys = np.zeros((frames, 13)), np.zeros((frames, 13))
        for f in range(frames):
            img, j = figure(rng)
            img.save(root / "frames" / cid / f"{f + 1:06d}.jpg", quality=95)
            xs[f], ys[f] = j[:, 0] - 0.5, j[:, 1] - 0.5  # pixel-centre convention
        write_label(root, cid, xs, ys, (SIZE, SIZE), train=c < clips, action="jumping_jacks")
    return root


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> Path:
    return write_figures(tmp_path_factory.mktemp("figures"))


def test_limb_band_covers_the_segments_and_nothing_far() -> None:
    xy = np.zeros((13, 2))
    xy[1], xy[3], xy[5] = (100, 100), (140, 100), (180, 100)  # a horizontal left arm
    visible = np.zeros(13, dtype=bool)
    visible[[1, 3, 5]] = True
    band = data.limb_band(xy, visible)
    assert band[100, 100:180].all() and band[104, 120] and band[96, 160]  # on it, 4 px off
    assert not band[106, 120] and not band[100, 186] and not band[150, 150]  # 6 px off, far
    visible[5] = False  # an elbow-wrist segment needs both ends seen
    band = data.limb_band(xy, visible)
    assert band[100, 120] and not band[100, 160]


def test_frames_load_with_bands_on_the_drawn_limbs(figures) -> None:
    clips = list(data.iter_clips(figures))
    images, bands = data.load_frames(data.frame_refs(clips[:1]), bands=True)
    assert images.shape == (6, 256, 256, 3) and bands.shape == (6, 256, 256)
    # the band's pixels are the limb colour far more often than the rest of the frame
    bg = images[:, 2, 2].float()  # the background colour of each frame (a corner pixel)
    differs = (images.float() - bg[:, None, None]).abs().sum(-1) > 30
    assert differs[bands].float().mean() > 4 * differs[~bands].float().mean()


def test_a_band_pixel_pulls_one_plus_limb_weight_times_as_hard() -> None:
    """The same error on and off the band: the loss's gradient there is 1 + limb_weight times
    as large (pixel terms only; the edge term is off)."""
    cfg = load_config(None, [*TINY, "limb_weight=4", "edge_weight=0"])
    recon = torch.full((1, 3, 4, 4), 0.5, requires_grad=True)
    band = torch.zeros(1, 1, 4, 4)
    band[..., 0, 0] = 1.0
    recon_loss(recon, torch.zeros(1, 3, 4, 4), cfg, 1.0 + cfg.limb_weight * band).backward()
    g = recon.grad[0, 0]
    torch.testing.assert_close(g[0, 0] / g[1, 1], torch.tensor(5.0))


def test_limb_weight_moves_the_loss_to_the_band(figures) -> None:
    """Same seed, same steps: weighting the band lowers its error more than the frame's.
    The size of the shift is small at these steps and varies between machines (the band's
    error falls 2-5% more than the frame's), so the test asserts its direction."""
    clips = list(data.iter_clips(figures))
    images, bands = data.load_frames(data.frame_refs(clips[-1:]), bands=True)
    errors = {}
    for weight in (0.0, 20.0):
        cfg = load_config(None, [*TINY, "steps=1", f"limb_weight={weight}", "batch_size=8"])
        torch.manual_seed(0)
        tok = ImageTokenizer(cfg.model_config())
        opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
        train_images, train_bands = data.load_frames(data.frame_refs(clips[:-1]), bands=True)
        gen = torch.Generator().manual_seed(0)
        for _ in range(150):
            batch, w = sample_batch(train_images, cfg, gen, train_bands if weight else None)
            loss = recon_loss(tok(batch)[0], batch, cfg, w)
            opt.zero_grad()
            loss.backward()
            opt.step()
        recon, _ = data.reconstruct(tok, images)
        sq = (recon.float() - images.float()).square().mean(-1)
        errors[weight] = (sq[bands].mean().item(), sq.mean().item())
    band_ratio = errors[20.0][0] / errors[0.0][0]
    frame_ratio = errors[20.0][1] / errors[0.0][1]
    assert band_ratio < frame_ratio and band_ratio < 1, errors


def test_time_budget_cuts_the_schedule_and_resume_keeps_it(figures, tmp_path) -> None:
    cfg = load_config(None, [*TINY, "steps=100000", "time_budget=0.15", "checkpoint_every=5"])
    t0 = time.perf_counter()
    result = train(figures, tmp_path, cfg)
    took = time.perf_counter() - t0
    assert 5 <= result["steps"] < 100000
    assert result["train_seconds_this_run"] < 0.15 * 60 * 1.5 and took < 60
    state = json.loads(next((tmp_path / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["step"] == state["total_steps"] == result["steps"]
    # Resuming the finished run does not restart the 100,000-step schedule.
    again = train(figures, tmp_path, cfg)
    assert again["steps"] == result["steps"] and again["resumed_from"] == result["steps"]


def test_eval_tokenizer_report_and_sheet(figures, tmp_path, capsys) -> None:
    tok_dir = tmp_path / "tok"
    ImageTokenizer(ImageTokenizerConfig(channels=(8, 16, 16, 16), res_blocks=1)).save_pretrained(
        tok_dir
    )
    out = tmp_path / "report"
    argv = ["--tokenizer", str(tok_dir), "--data", str(figures), "--out", str(out)]
    assert eval_main([*argv, "--compare", str(tok_dir), "--split", "all", "--frames", "12"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["frames"] == 12 and report["clips"] == 6
    for name in ("tokenizer", "compare"):
        r = report[name]
        assert r["dead_codes"] == pytest.approx(1 - r["codebook_usage"])
        assert np.isfinite(r["psnr"]) and np.isfinite(r["psnr_limb_band"])
    assert report["tokenizer"] == report["compare"]  # the same weights score the same
    # the block mean is recomputed here on the same frames
    clips = list(data.iter_clips(figures))
    images, bands = data.load_frames(data.spread(data.frame_refs(clips), 12), bands=True)
    blocks = data.block_mean(images)
    assert report["block_mean"]["psnr_limb_band"] == pytest.approx(
        float(np.nanmean(data.band_psnr(blocks, images, bands)))
    )
    sheet = Image.open(out / "sheet.png")
    assert sheet.size[0] == 5 * 256 and sheet.size[1] > 256
    assert "| 16x16 block mean |" in (out / "report.md").read_text()
    assert "limb band" in capsys.readouterr().out
    # test split by default: only clip 0006 is marked train = -1
    assert eval_main([*argv, "--frames", "4"]) == 0
    assert json.loads((out / "report.json").read_text())["clips"] == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--frames", "0"], "--frames must be >= 1"), (["--data", "/nonexistent"], "no such data")],
)
def test_eval_tokenizer_bad_input_is_one_clear_line(figures, tmp_path, capsys, extra, message):
    argv = ["--tokenizer", str(REPO / "checkpoints" / "m2-demo"), "--data", str(figures)]
    assert eval_main([*argv, "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("m2 eval-tokenizer: error:") and message in err
    assert not (tmp_path / "o" / "report.json").exists()
