"""A format-2 checkpoint through the service: the action it names, per-joint confidence,
the `low_confidence_joints` warning, and the GIF's hollow rings for uncertain joints.

Real, tiny, untrained checkpoint served in-process (no mocks); the renderer is tested on
a hand-made prediction so the pixels to look at are known."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient
from svc_helpers import ACTIONS, make_checkpoint_v2, png_bytes, settings_for, wait_ready

from m2core.draw import LEFT_COLOR
from m2core.modalities import FUTURE_FRAMES, JOINT_NAMES, NUM_JOINTS
from service.app import create_app
from service.render import CANVAS_COLOR, encode_jpeg, render_gif
from service.store import Prediction


@pytest.fixture(scope="module")
def v2_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The real app on a tiny format-2 checkpoint (untrained weights), warmed up."""
    directory = make_checkpoint_v2(tmp_path_factory.mktemp("m2-tiny-v2") / "ckpt")
    with TestClient(create_app(settings_for(directory))) as c:
        wait_ready(c)
        yield c


def _predict(client: TestClient, **data) -> dict:
    files = {"frame": ("frame.png", png_bytes(160, 120, seed=5), "image/png")}
    r = client.post("/predict", files=files, data={k: str(v) for k, v in data.items()})
    assert r.status_code == 200, r.text
    return r.json()


def _low_confidence(d: dict) -> list[dict]:
    return [w for w in d["warnings"] if w["code"] == "low_confidence_joints"]


def test_format2_names_an_action_and_gives_confidence_per_joint(v2_client: TestClient):
    d = _predict(v2_client, steps=2)
    assert d["action"] in ACTIONS
    now = np.asarray(d["confidence"]["coords"])
    future = np.asarray(d["confidence"]["coords_next"])
    assert now.shape == (NUM_JOINTS,) and future.shape == (2, FUTURE_FRAMES, NUM_JOINTS)
    for conf in (now, future):
        assert ((conf >= 0) & (conf <= 1)).all()
    # The warning names exactly the visible joints read from the frame below 0.5.
    unsure = [JOINT_NAMES[j] for j in range(NUM_JOINTS) if d["coords"][j][2] and now[j] < 0.5]
    nobody = any(w["code"] == "no_person" for w in d["warnings"])
    warned = _low_confidence(d)
    if unsure and not nobody:
        assert len(warned) == 1 and warned[0]["message"].endswith(
            f": {', '.join(unsure)} (drawn hollow in the GIF)"
        )
        assert f"{len(unsure)} of " in warned[0]["message"]
    else:
        assert warned == []


def test_given_skeleton_is_sure_and_not_warned_about(v2_client: TestClient):
    joints = [[20 + 10 * i, 30 + 5 * i, 1] for i in range(NUM_JOINTS)]
    d = _predict(v2_client, coords=json.dumps(joints))
    assert d["coords_given"] and d["confidence"]["coords"] == [1.0] * NUM_JOINTS
    assert np.asarray(d["confidence"]["coords_next"]).shape == (1, FUTURE_FRAMES, NUM_JOINTS)
    assert _low_confidence(d) == []


def test_format2_gif_is_a_valid_gif(v2_client: TestClient):
    d = _predict(v2_client, steps=2)
    for link in (d["links"]["gif"], d["links"]["gif_plain"]):
        r = v2_client.get(link)
        assert r.status_code == 200 and r.headers["content-type"] == "image/gif"
        gif = Image.open(io.BytesIO(r.content))
        assert gif.format == "GIF" and gif.n_frames == 2 * (1 + FUTURE_FRAMES)
        assert gif.size == (160, 120)


def test_format1_checkpoint_sends_null_action_and_confidence(client: TestClient):
    d = _predict(client)
    assert d["action"] is None and d["confidence"] is None and _low_confidence(d) == []


# --- the renderer ------------------------------------------------------------------------
# A hand-placed skeleton on a 640 x 480 plain canvas: l_elbow (3) and l_wrist (5) are
# uncertain, l_shoulder (1) is sure; at this size a dot has radius 6.5 and a ring 7.5.
SKELETON = np.array(
    [(320, 100), (280, 160), (360, 160), (240, 220), (400, 210), (220, 280), (430, 170),
     (290, 280), (350, 280), (280, 350), (364, 350), (276, 420), (372, 420)], float,
)  # fmt: skip
L_SHOULDER, L_ELBOW, L_WRIST = 1, 3, 5


def _first_frame(confidence: np.ndarray | None) -> np.ndarray:
    coords = np.concatenate([SKELETON, np.ones((NUM_JOINTS, 1))], axis=1)
    future = np.tile(coords, (1, FUTURE_FRAMES, 1, 1))
    conf = None
    if confidence is not None:
        conf = (confidence, np.ones((1, FUTURE_FRAMES, NUM_JOINTS)))
    background = encode_jpeg(Image.new("RGB", (640, 480), CANVAS_COLOR))
    pred = Prediction(background, 1.0, coords, future, [b""], "v", conf)
    gif = Image.open(io.BytesIO(render_gif(pred, overlay=False)))
    return np.asarray(gif.convert("RGB"), dtype=int)  # frame 0: "now"


def _is(pixels: np.ndarray, color) -> np.ndarray:
    return np.abs(pixels - np.asarray(color)).max(axis=-1) <= 8


def _around(frame: np.ndarray, joint: int, r_min: float, r_max: float) -> np.ndarray:
    """The pixels whose centres lie at distance [r_min, r_max] from the joint."""
    yy, xx = np.mgrid[: frame.shape[0], : frame.shape[1]]
    x, y = SKELETON[joint]
    dist = np.hypot(xx - x, yy - y)
    return frame[(dist >= r_min) & (dist <= r_max)]


def test_uncertain_joint_is_a_hollow_ring_and_a_sure_one_a_filled_dot():
    confidence = np.full(NUM_JOINTS, 0.9)
    confidence[[L_ELBOW, L_WRIST]] = [0.3, 0.1]
    frame = _first_frame(confidence)
    # uncertain: nothing of the joint colour inside the ring, plenty on it
    assert not _is(_around(frame, L_ELBOW, 0, 2.5), LEFT_COLOR).any()
    assert _is(_around(frame, L_ELBOW, 0, 2.5), CANVAS_COLOR).all()
    assert _is(_around(frame, L_ELBOW, 4.5, 6.5), LEFT_COLOR).sum() >= 20
    # sure: filled with the joint colour at its centre
    assert _is(_around(frame, L_SHOULDER, 0, 2.5), LEFT_COLOR).all()
    # the bone between two uncertain joints: thin, faded (never the full colour)
    mid = (SKELETON[L_ELBOW] + SKELETON[L_WRIST]) / 2
    patch = frame[int(mid[1]) - 3 : int(mid[1]) + 4, int(mid[0]) - 3 : int(mid[0]) + 4]
    faded = tuple((c + 128) // 2 for c in LEFT_COLOR)
    assert _is(patch, faded).any() and not _is(patch, LEFT_COLOR).any()
    assert _is(patch, faded).sum() <= 2 * 7  # at most ~2 px wide across the patch


def test_without_confidence_every_joint_is_filled_as_before():
    frame = _first_frame(None)
    for joint in (L_SHOULDER, L_ELBOW, L_WRIST):
        assert _is(_around(frame, joint, 0, 2.5), LEFT_COLOR).all()


def test_action_input_steers_and_is_checked(v2_client: TestClient):
    """A given action reaches the model as an input (the answer carries it instead of the
    one the untrained model reads out for every frame); an unknown name is a 422 that names
    the known ones."""
    for name in ACTIONS:
        assert _predict(v2_client, steps=1, seed=0, action=name)["action"] == name
    files = {"frame": ("frame.png", png_bytes(160, 120, seed=5), "image/png")}
    r = v2_client.post("/predict", files=files, data={"action": "juggling"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["field"] == "action" and ACTIONS[0] in err["message"]
