"""`m2 eval`: the metrics and baselines, the report's keys, the GIF pair, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2core.tokenizers.pose import PoseTokenizer
from m2core.tokenizers.text import TextTokenizer
from training.data.shards import load_meta
from training.eval import metrics as M
from training.eval.evaluate import evaluate, main
from training.eval.steering import label_leads


def test_pck_ade_fde_by_hand():
    gt = np.zeros((1, 2, 13, 3))
    gt[..., 2] = 1.0
    gt[0, :, 12, 2] = 0.0  # joint 12 not visible: excluded whatever its error
    pred = gt.copy()
    pred[0, 0, :6, 0] += 0.02  # 6 joints off by 0.02 frame units at step 1
    pred[0, 1, :, 0] += 0.1  # every joint off by 0.1 at step 2
    pred[0, :, 12, 0] += 5.0
    scale = np.array([0.5])  # errors in person scales: 0.04 and 0.2
    m = M.forecast_metrics(pred, gt, scale)
    assert m["pck@0.05"] == pytest.approx([1.0, 0.0])  # 0.04 < 0.05 < 0.2
    assert m["ade"] == pytest.approx((6 * 0.04 + 12 * 0.2) / 24)
    assert m["fde"] == pytest.approx(0.2)
    # per group: joints 0-5 are off 0.04 then 0.2, the rest 0 then 0.2; joint 12 is unseen
    by = m["ade_by_group"]
    assert list(by) == ["head", "shoulders", "elbows", "wrists", "hips", "knees", "ankles"]
    assert [by["head"], by["wrists"]] == pytest.approx([0.12, 0.11])  # wrist 6 is not off
    assert [by["hips"], by["ankles"]] == pytest.approx([0.1, 0.1])


def test_baselines_are_exact_on_the_motion_they_assume():
    rng = np.random.default_rng(0)
    now = np.concatenate([rng.random((5, 13, 2)), np.ones((5, 13, 1))], -1)
    vel = rng.normal(0, 0.01, (5, 13, 2))
    prev = now.copy()
    prev[..., :2] -= vel
    offsets = [1, 2, 3, 4, 5, 6]
    linear = np.repeat(now[:, None], 6, 1)
    linear[..., :2] += np.asarray(offsets)[None, :, None, None] * vel[:, None]
    scale = np.full(5, 0.3)
    assert M.forecast_metrics(M.constant_velocity(now, prev, offsets), linear, scale)["ade"] < 1e-9
    still = np.repeat(now[:, None], 6, 1)
    assert M.forecast_metrics(M.zero_velocity(now, 6), still, scale)["fde"] == 0.0
    prev[0, 3, 2] = 0.0  # unseen at t-1: that joint keeps zero velocity
    assert np.allclose(M.constant_velocity(now, prev, offsets)[0, :, 3, :2], now[0, 3, :2])


def test_person_scale_is_the_longer_box_side():
    assert M.person_scale(
        np.array([[0.1, 0.2, 0.3, 0.7], [0.0, 0.0, 0.0, 0.0]])
    ).tolist() == pytest.approx([0.5, 1e-3])


def test_bleu():
    assert M.bleu(["a man waves his arm"], ["a man waves his arm"]) == pytest.approx(1.0)
    assert M.bleu(["a man waves his arm"], ["dogs bark"]) == 0.0
    # no four-gram in common: corpus BLEU-4 without smoothing is 0
    assert M.bleu(["a man waves his arm"], ["a man waves her arm"]) == 0.0
    # 5/6 words, 4/5 bigrams, 3/4 trigrams, 2/3 four-grams; equal lengths: no penalty
    got = M.bleu(["the person does jumping jacks now"], ["the person does jumping jacks today"])
    assert got == pytest.approx((5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25)
    short = M.bleu(["the person does jumping jacks now"], ["the person does jumping jacks"])
    assert short == pytest.approx(np.exp(1 - 6 / 5))  # all n-grams match; brevity penalty only


def test_caption_names_the_action():
    assert M.names_action("a woman doing jumping jacks in a grey room", "jumping_jacks")
    assert not M.names_action("a woman squatting in a grey room", "jumping_jacks")
    assert M.names_action("a person doing a tennis serve", "tennis_serve")  # Penn Action label


def test_a_gif_of_a_still_forecast_keeps_its_seven_frames(tmp_path):
    """Pillow merges identical frames; each panel names its step, so a forecast that does
    not move still plays as now, +1 .. +6."""
    from training.eval.gifs import render, save_gif

    now = np.concatenate([np.full((2, 13, 2), 0.5), np.ones((2, 13, 1))], -1)
    still = np.repeat(now[:, None], 6, 1)
    bgs = [Image.new("RGB", (256, 256)) for _ in range(2)]
    save_gif(tmp_path / "still.gif", render(bgs, now, still, ["action: squats", "action: lunges"]))
    gif = Image.open(tmp_path / "still.gif")
    assert gif.n_frames == 7 and gif.size == (512, 256)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    from m2core.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
    from training.data.prepare import PrepareOptions, prepare
    from training.synth.synth import generate
    from training.train import train

    tmp = tmp_path_factory.mktemp("eval")
    generate(tmp / "synth", clips=3, seed=4, workers=1, frames=(20, 22), progress=False)
    torch.manual_seed(0)
    tok = ImageTokenizer(ImageTokenizerConfig(levels=(4, 4), channels=(8, 8, 16, 16), res_blocks=0))
    prepare(
        PrepareOptions(
            tmp / "synth",
            tok.save_pretrained(tmp / "tok"),
            tmp / "prep",
            workers=0,
            val_fraction=0.4,
        )
    )
    res = train({"data_dir": str(tmp / "prep"), "output_dir": str(tmp / "run"), "batch_size": 4,
                 "num_tokens_per_sample": 64, "total_tokens": "512", "warmup_tokens": "256",
                 "model_preset": "tiny", "model": {"dim": 32, "heads": 2, "enc_layers": 1, "dec_layers": 1},
                 "eval_interval": 0, "checkpoint_interval": 0, "num_workers": 0, "cpu": True})  # fmt: skip
    return res.final_dir, tmp / "prep"


def test_report_has_the_designed_keys_and_honest_baselines(trained, tmp_path):
    ckpt, data = trained
    report = evaluate(ckpt, data, tmp_path, samples=4, batch_size=4, gifs=2, maskgit_steps=1)
    saved = json.loads((tmp_path / "report.json").read_text())
    now, nxt = np.load(data / "val" / "tok_rgb.npy"), np.load(data / "val" / "tok_rgb_next.npy")
    assert saved["samples"] == report["samples"] == min(4, len(now)) and saved["clips"] >= 1
    assert set(saved["ce"]) == {
        "tok_rgb",
        "coords",
        "captions",
        "tok_rgb_next",
        "coords_next",
        "mean",
    }
    cn = saved["coords_next"]
    for m in (cn, cn["zero_velocity"], cn["constant_velocity"]):
        assert len(m["pck@0.05"]) == 6 and m["ade"] >= 0 and m["fde"] >= 0
    assert 0 <= saved["coords"]["pck@0.05"] <= 1
    assert {"token_accuracy", "copy_current"} <= set(saved["tok_rgb_next"])
    assert {"token_accuracy", "action_accuracy", "bleu"} <= set(saved["captions"])
    meta = json.loads((data / "meta.json").read_text())
    text = TextTokenizer.load(data)
    caps, acts = np.load(data / "val" / "captions.npy"), np.load(data / "val" / "action.npy")
    named = [
        M.names_action(text.decode(c.astype(np.int64)), meta["actions"][a])
        for c, a in zip(caps, acts, strict=True)
    ]
    assert saved["captions"]["action_accuracy_reference"] == pytest.approx(np.mean(named))
    assert 0 <= saved["captions"]["action_accuracy"] <= 1
    # the baselines are what they claim: recompute the copy baseline from the shards
    assert len(now) <= 4  # so every validation sample was evaluated
    assert saved["tok_rgb_next"]["copy_current"]["token_accuracy"] == pytest.approx(
        (now == nxt).mean()
    )
    assert "| zero velocity |" in (tmp_path / "report.md").read_text()
    # the forecast from the frame alone is generate's, and its baseline holds the skeleton
    # generate read from the frame still; both scored against the true future
    from m2core.checkpoint import load_checkpoint
    from m2core.generate import GenerationConfig, generate
    from m2core.tokenizers.pose import PoseTokenizer

    g = generate(load_checkpoint(ckpt).model.eval(), {"tok_rgb": torch.from_numpy(now.astype(np.int64))},
                 GenerationConfig(maskgit_steps=1, temperature=0.0))  # fmt: skip
    pose, bbox = PoseTokenizer(), np.load(data / "val" / "bbox.npy")
    truth = pose.decode_future(np.load(data / "val" / "coords_next.npy").astype(np.int64))
    read = pose.decode(g.coords.numpy(), strict=False)
    ff, scale = saved["coords_next_from_frame"], M.person_scale(bbox)
    want = M.forecast_metrics(
        pose.decode_future(g.coords_next[:, 0].numpy(), strict=False), truth, scale
    )
    assert ff["ade"] == pytest.approx(want["ade"]) and ff["fde"] == pytest.approx(want["fde"])
    still = M.forecast_metrics(M.zero_velocity(read, 6), truth, scale)
    assert ff["zero_velocity"]["ade"] == pytest.approx(still["ade"])
    assert "what `/predict` does" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.md").read_text().count("| ADE by joint group |") == 2
    assert ff["ade_by_group"]["wrists"] == pytest.approx(want["ade_by_group"]["wrists"])
    assert saved["tok_rgb_next"]["from_frame"]["token_accuracy"] == pytest.approx(
        (g.tok_rgb_next[:, 0].numpy() == nxt).mean()
    )
    now_truth = pose.decode(np.load(data / "val" / "coords.npy").astype(np.int64))
    flags_right = ((read[..., 2] > 0.5) == (now_truth[..., 2] > 0.5)).mean()
    assert saved["coords"]["flag_accuracy"] == pytest.approx(flags_right)
    for name in ("original", "predicted"):
        gif = Image.open(tmp_path / f"pose_future_{name}.gif")
        assert gif.n_frames == 7 and gif.size[1] == 256


def test_format_2_report_names_the_action_steers_and_draws_two_actions(trained, tmp_path):
    """A format-2 checkpoint adds the action read-out, steering by action and per-joint
    confidence to the report (with read_heat, the heat map's read alone), and `steering.gif`:
    each sample under two actions."""
    from m2core.chain import generate
    from m2core.checkpoint import load_checkpoint
    from m2core.generate import GenerationConfig
    from m2core.masking import AlphaSet, MaskingConfig, collate, mask_sample
    from training.train import train

    _, data = trained
    res = train({"data_dir": str(data), "output_dir": str(tmp_path / "run"), "batch_size": 4,
                 "num_tokens_per_sample": 64, "total_tokens": "512", "warmup_tokens": "256",
                 "model_preset": "tiny", "eval_interval": 0, "checkpoint_interval": 0,
                 "model": {"format": 2, "dim": 32, "heads": 2, "enc_layers": 1, "dec_layers": 1,
                           "read_ce": 0.2, "read_heat": True},
                 "read_batch": 4, "num_workers": 0, "cpu": True})  # fmt: skip
    out = tmp_path / "eval"
    report = evaluate(res.final_dir, data, out, samples=4, batch_size=4, gifs=2, maskgit_steps=1)
    now = np.load(data / "val" / "tok_rgb.npy").astype(np.int64)
    truth = np.load(data / "val" / "action.npy")
    assert len(now) <= 4  # every validation sample was evaluated, in order
    bundle = load_checkpoint(res.final_dir)
    model = bundle.model.eval()
    g = generate(
        model,
        {"tok_rgb": torch.from_numpy(now)},
        GenerationConfig(maskgit_steps=1, temperature=0.0),
    )
    assert report["action"]["from_frame"] == pytest.approx((g.action.numpy() == truth).mean())
    # read_heat: the heat map's read alone is reported beside the read-out's, per group too
    with torch.no_grad():
        emb = model.frame_embedding(torch.from_numpy(now))
        xy = model.adapters["coords"].heat_read(emb)[0].numpy()
    pose = PoseTokenizer().decode(np.load(data / "val" / "coords.npy").astype(np.int64))
    scale = M.person_scale(np.load(data / "val" / "bbox.npy"))
    heat = M.pck(M.normalised_errors(xy, pose[..., :2], scale), pose[..., 2] > 0.5)
    assert report["coords"]["heat_alone_pck@0.05"] == pytest.approx(heat)
    assert set(report["coords"]["heat_alone_pck@0.05_by_group"]) == set(M.JOINT_GROUPS)
    assert "the heat map alone" in (out / "report.md").read_text()
    # the skeleton alone, by the masking path: every token of the true skeleton in, no frame
    raws = [{"coords": c, "action": a} for c, a in zip(np.load(data / "val" / "coords.npy"), truth, strict=True)]  # fmt: skip
    mcfg = MaskingConfig(64, 64, (AlphaSet({"coords": 1.0}, {"action": 1.0}),))
    mb = collate([mask_sample(r, mcfg, np.random.default_rng(0)) for r in raws])
    assert mb["enc_valid"].sum(1).tolist() == [39] * len(raws)
    with torch.no_grad():
        h, ctx = model.hidden(mb)
        sel, s = model.target_slots(mb, "action")
        alone = model.adapters["action"].readout(h[sel], s, ctx)[0].numpy()
    assert report["action"]["skeleton_alone"] == pytest.approx((alone == truth).mean())
    names = load_meta(data)["actions"]
    texts = [bundle.text_tokenizer.decode(np.asarray(c)) for c in g.captions]
    follows = [M.names_action(t, names[int(a)]) for t, a in zip(texts, g.action, strict=True)]
    assert report["captions"]["names_read_action_from_frame"] == pytest.approx(np.mean(follows))
    steer = report["steering"]
    assert steer["no_action"] == report["coords_next"]["ade"]
    assert steer["true_action"] >= 0 and steer["wrong_action"] >= 0
    assert set(report["coords"]["confidence"]) == {"auroc", "table"}  # NaN: no joint hit yet
    assert json.loads((out / "report.json").read_text())["steering"] == steer
    assert "at_switches" not in steer  # one label per clip: no frame where the label leads
    clips = len(set(np.load(data / "val" / "clip.npy").tolist()))
    gif = Image.open(out / "steering.gif")
    assert gif.n_frames == 7 and gif.size == (256 * 2 * min(2, clips), 256)

    # the same clips relabelled from frame 6 on: frame 6 (and 9, where a clip has it) now
    # carries a label its pose (the label 6 frames earlier) does not show yet
    switched = tmp_path / "switched"
    shutil.copytree(data, switched)
    frame = np.load(switched / "val" / "frame.npy")
    action = np.load(switched / "val" / "action.npy")
    C = len(names)
    np.save(switched / "val" / "action.npy", np.where(frame >= 6, (action + 1) % C, action))
    sw = evaluate(res.final_dir, switched, tmp_path / "e2", samples=4, batch_size=4, gifs=0,
                  maskgit_steps=1)["steering"]["at_switches"]  # fmt: skip
    clip = np.load(switched / "val" / "clip.npy")
    rows, shown = label_leads(clip, frame, np.load(switched / "val" / "action.npy"), 6)
    assert sw["samples"] == len(rows) == ((frame == 6) | (frame == 9)).sum() >= 1
    assert (shown == action[rows]).all()
    for key in ("no_action", "true_action", "shown_action", "zero_velocity"):
        assert np.isfinite(sw[key]) and sw[key] >= 0


def test_label_leads_finds_the_frames_whose_label_the_pose_does_not_show_yet():
    clip = np.array([0] * 6 + [1] * 4)
    frame = np.array([0, 3, 6, 9, 12, 15, 0, 3, 6, 9])
    action = np.array([2, 2, 2, 5, 5, 5, 1, 1, 1, 1])  # clip 0 changes at frame 9
    rows, shown = label_leads(clip, frame, action, lag=6)
    assert rows.tolist() == [3, 4] and shown.tolist() == [2, 2]  # frame 15's label was 5 at 9
    assert len(label_leads(clip[6:], frame[6:], action[6:], 6)[0]) == 0


def test_cli_errors(trained, tmp_path, capsys):
    ckpt, data = trained
    assert (
        main(["--checkpoint", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "o")])
        == 2
    )
    assert capsys.readouterr().err.strip().startswith("m2 eval: error:")
    assert (
        main(["--checkpoint", str(ckpt), "--data", str(tmp_path), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "meta.json" in capsys.readouterr().err
    assert (
        main(
            [
                "--checkpoint",
                str(ckpt),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "o"),
                "--samples",
                "0",
            ]
        )
        == 2
    )
