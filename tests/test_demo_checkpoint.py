"""The bundled demo checkpoint really forecasts, and its model card's numbers reproduce.

- `/predict` through the real app on held-out synthetic frames (clips drawn with a seed
  the demo never trained on): the skeleton lies on the drawn figure and the caption names
  the action.
- `m2 synth` + `m2 prepare` + `m2 eval` on the small held-out set named in
  `checkpoints/m2-demo/reproduce.json` give the numbers written there (and in the card).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from training.synth.synth import ACTIONS, render_clip, sample_spec
from training.synth.text import action_from_caption

DEMO = Path(__file__).resolve().parents[1] / "checkpoints" / "m2-demo"
HELD_OUT_SEED = 90210  # the demo's clips come from seed 0
# share of visible joints within 0.05 x the person's box (PCK@0.05; the demo with its pose
# reader: 0.60 on these ten frames, 0.68 on 8,192 test frames; without it the bar was 0.5 at PCK@0.2)
PCK_BAR = 0.5
ACTION_BAR = 0.6  # share of frames whose generated caption names the true action
# flags right, above the share of visible joints (the demo: 0.88 against 0.80 on these frames)
FLAG_MARGIN = 0.05


def _png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client():
    assert (DEMO / "model.safetensors").is_file(), f"{DEMO} is missing: the demo is bundled"
    settings = Settings(checkpoint=DEMO, device="cpu", warmup=False, max_wait_ms=1.0)
    with TestClient(create_app(settings)) as c:
        yield c


def _predict_held_out(client) -> tuple[list, list]:
    """/predict on one held-out frame per action -> (per-frame stats, responses)."""
    stats, bodies = [], []
    for i, action in enumerate(ACTIONS):
        clip = render_clip(sample_spec(HELD_OUT_SEED, i, frames=(24, 24), action=action))
        t = 12
        r = client.post(
            "/predict",
            files={"frame": ("frame.png", _png(clip.frames[t]), "image/png")},
            data={"seed": "0", "temperature": "0"},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        pred = np.array([j[:2] for j in body["coords"]], dtype=float)
        true = np.stack([clip.x[t], clip.y[t]], axis=1)
        vis = clip.visibility[t]
        x1, y1, x2, y2 = clip.bbox[t]
        err = np.linalg.norm(pred - true, axis=1)[vis] / max(x2 - x1, y2 - y1)
        flags = np.array([j[2] for j in body["coords"]]) > 0
        stats.append(
            (
                int((err < 0.05).sum()),
                int(vis.sum()),
                action_from_caption(body["caption"]) == action,
                int((flags == vis).sum()),
            )
        )
        bodies.append(body)
    return stats, bodies


def test_predict_on_held_out_frames_answers_in_the_upload_frame(held_out_bodies):
    """The real app on the bundled checkpoint: a full answer for every held-out frame,
    skeletons inside the uploaded image, six future skeletons, a caption in words."""
    for body in held_out_bodies:
        assert len(body["coords"]) == 13 and len(body["coords_next"][0]) == 6
        xy = np.array([j[:2] for j in body["coords"]], dtype=float)
        assert (xy >= -1).all() and (xy[:, 0] <= body["width"] + 1).all()
        assert (xy[:, 1] <= body["height"] + 1).all()
        assert body["caption"].strip() and body["model_version"]


@pytest.fixture(scope="module")
def held_out_run(client) -> tuple[list, list]:
    return _predict_held_out(client)


@pytest.fixture(scope="module")
def held_out(held_out_run) -> list:
    return held_out_run[0]


@pytest.fixture(scope="module")
def held_out_bodies(held_out_run) -> list:
    return held_out_run[1]


def test_predict_on_held_out_frames_finds_the_figure(held_out):
    hits, total = sum(s[0] for s in held_out), sum(s[1] for s in held_out)
    assert hits / total > PCK_BAR, f"PCK@0.05 {hits / total:.2f} on held-out frames"


def test_predict_on_held_out_frames_marks_hidden_joints(held_out):
    """The visibility flags of the skeleton read from the frame (the pose reader's flag
    head) are right more often than marking every joint visible would be."""
    right = sum(s[3] for s in held_out) / (13 * len(held_out))
    all_visible = sum(s[1] for s in held_out) / (13 * len(held_out))
    assert right > all_visible + FLAG_MARGIN, (
        f"flags right {right:.2f}, all visible {all_visible:.2f}"
    )


def test_predict_on_held_out_frames_names_the_action(held_out):
    """Through the real app, from the frame alone: the caption names the action for at least
    6 of the 10 held-out frames (the demo: 8). This is a small sample; over 256 test-split
    frames `m2 eval` measures 37.9% from the frame alone (the model card)."""
    named = sum(s[2] for s in held_out)
    assert named / len(ACTIONS) >= ACTION_BAR, f"caption named the action {named}/{len(ACTIONS)}"


def test_a_frame_with_nobody_gets_no_caption_and_says_so(client, held_out_bodies):
    """A plain grey frame: the model marks every joint not visible, so there is no caption
    (a confident one of an empty frame was the bug), and a `no_person` warning; none of the
    held-out frames of a person carries that warning."""
    grey = np.full((180, 240, 3), 128, dtype=np.uint8)
    r = client.post("/predict", files={"frame": ("grey.png", _png(grey), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert not any(j[2] for j in body["coords"])
    assert body["caption"] is None
    assert [w["code"] for w in body["warnings"]] == ["out_of_domain", "no_person"]
    assert all(b["warnings"] == [] for b in held_out_bodies)


def test_frames_unlike_the_training_clips_are_warned_and_new_clips_are_not():
    """The bundled in-domain statistics, the way the server scores a frame: frames of
    synthetic clips from a seed the demo never saw are rarely warned (<= 5%), frames of the
    out-of-domain corpus (photos, blank, solid, noise, a screenshot) mostly are. The bar is
    what the demo reaches (docs/in_domain.md: 91% of the corpus, 2.9% of 512 fresh frames),
    short of issue 19's 95%."""
    pytest.importorskip("skimage")
    from ood_corpus import corpus

    from m2core.checkpoint import load_checkpoint
    from m2core.geometry import letterbox
    from m2core.in_domain import DomainCheck, skeleton_features
    from training.eval.domain import read_frames

    check, bundle = DomainCheck.load(DEMO), load_checkpoint(DEMO)
    assert check is not None, "the demo ships in_domain.safetensors"
    clips = [render_clip(sample_spec(HELD_OUT_SEED + 1, i, frames=(40, 40), action=a))
             for i, a in enumerate(ACTIONS)]  # fmt: skip
    frames = [letterbox(Image.fromarray(c.frames[t]))[0] for c in clips for t in (5, 15, 25, 35)]
    names, images = zip(*corpus(), strict=True)
    ood = [letterbox(im)[0] for im in images]
    feats, joints = read_frames(bundle, torch.from_numpy(np.stack(frames + ood)))
    score = check.score(feats, skeleton_features(joints))
    fresh, odd = score[: len(frames)], score[len(frames) :]
    assert np.mean(fresh > 1) <= 0.05, np.round(fresh, 2)
    assert np.mean(odd > 1) >= 0.85, dict(zip(names, np.round(odd, 2), strict=True))
    drawn = [
        s
        for n, s in zip(names, odd, strict=True)
        if n.startswith(("solid", "uniform", "gaussian", "screenshot"))
    ]
    assert min(drawn) > 1  # blank, solid, noise and a screenshot: always


@pytest.mark.slow
def test_eval_on_the_bundled_checkpoint_reproduces_the_model_card(tmp_path):
    from training.data.prepare import PrepareOptions, prepare
    from training.eval.evaluate import evaluate
    from training.synth.synth import generate

    spec = json.loads((DEMO / "reproduce.json").read_text())
    generate(tmp_path / "synth", spec["clips"], seed=spec["seed"], workers=2,
             frames=tuple(spec["frames"]), progress=False)  # fmt: skip
    prepare(PrepareOptions(data=tmp_path / "synth", tokenizer=DEMO, out=tmp_path / "prep",
                           workers=2, all_to="test", device="cpu"))  # fmt: skip
    report = evaluate(DEMO, tmp_path / "prep", tmp_path / "eval", split="test",
                      samples=spec["samples"], gifs=0)  # fmt: skip
    want = spec["report"]
    assert report["samples"] == want["samples"]
    cn, wcn = report["coords_next"], want["coords_next"]
    for key in ("ade", "fde"):
        assert cn[key] == pytest.approx(wcn[key], rel=0.05, abs=2e-3)
        assert cn["zero_velocity"][key] == pytest.approx(wcn["zero_velocity"][key], rel=1e-6)
    assert report["coords"]["pck@0.05"] == pytest.approx(want["coords"]["pck@0.05"], abs=0.03)
    assert report["captions"]["action_accuracy"] == pytest.approx(
        want["captions"]["action_accuracy"], abs=0.05
    )
    assert report["ce"]["mean"] == pytest.approx(want["ce"]["mean"], rel=0.02)
    nxt, wnxt = report["tok_rgb_next"], want["tok_rgb_next"]
    assert nxt["copy_current"]["token_accuracy"] == pytest.approx(
        wnxt["copy_current"]["token_accuracy"], rel=1e-6
    )
    assert nxt["token_accuracy"] == pytest.approx(wnxt["token_accuracy"], abs=2e-3)
    if "from_frame" in wnxt:  # the next key frame as /predict makes it
        assert nxt["from_frame"]["token_accuracy"] == pytest.approx(
            wnxt["from_frame"]["token_accuracy"], abs=2e-3
        )
    if "coords_next_from_frame" in want:  # the forecast as /predict makes it
        ff, wff = report["coords_next_from_frame"], want["coords_next_from_frame"]
        for key in ("ade", "fde"):
            assert ff[key] == pytest.approx(wff[key], rel=0.05, abs=2e-3)
    if "action_accuracy_from_frame" in want["captions"]:
        assert report["captions"]["action_accuracy_from_frame"] == pytest.approx(
            want["captions"]["action_accuracy_from_frame"], abs=0.05
        )
