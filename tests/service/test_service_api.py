"""The HTTP API in-process: the real app, the real (tiny, untrained) checkpoint, no mocks."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient
from svc_helpers import png_bytes, settings_for, wait_ready

from m2core.modalities import FUTURE_FRAMES, NUM_JOINTS, POSE_BINS
from m2core.tokenizers.image import ImageTokenizer
from service.app import StartupError, create_app


def predict(client: TestClient, frame: bytes | None = None, **data) -> dict:
    files = {"frame": ("frame.png", frame or png_bytes(), "image/png")}
    r = client.post("/predict", files=files, data={k: str(v) for k, v in data.items()})
    assert r.status_code == 200, r.text
    return r.json()


def _answer(d: dict) -> dict:
    """The prediction itself: everything but the id, the links and the timings."""
    return {k: v for k, v in d.items() if k not in ("id", "links", "timings_ms")}


def test_predict_returns_a_full_prediction_in_upload_pixels(client: TestClient):
    d = predict(client, png_bytes(200, 100), steps=2)
    assert (d["width"], d["height"]) == (200, 100)
    assert len(d["coords"]) == NUM_JOINTS and all(len(j) == 3 for j in d["coords"])
    assert np.asarray(d["coords_next"]).shape == (2, FUTURE_FRAMES, NUM_JOINTS, 3)
    tok = np.asarray(d["tok_rgb_next"])
    assert (
        tok.shape == (2, 16, 16) and tok.min() >= 0 and tok.max() < 16
    )  # tiny tokenizer: 4x4 levels
    xy = np.asarray(d["coords_next"])[..., :2]
    # Frame units [0, 1] map to the letterboxed square around the 200x100 upload.
    assert xy[..., 0].min() >= -1 and xy[..., 0].max() <= 200
    assert xy[..., 1].min() >= -51 and xy[..., 1].max() <= 151
    assert {j[2] for j in d["coords"]} <= {0, 1}
    assert isinstance(d["caption"], str) and not d["caption_given"] and not d["coords_given"]
    assert (
        d["device"] == "cpu"
        and d["dtype"] == "float32"
        and re.fullmatch(r"[0-9a-f]{12}", d["model_version"])
    )
    t = d["timings_ms"]
    assert t["total"] >= t["model"] > 0 and t["batch_size"] >= 1
    assert len(d["id"]) >= 22 and d["id"] != predict(client)["id"]  # 128-bit random ids


def test_same_request_and_seed_same_answer_other_seed_differs(client: TestClient):
    frame = png_bytes(seed=3)
    a, b = (predict(client, frame, seed=7, temperature=1.0) for _ in range(2))
    assert _answer(a) == _answer(b) and a["id"] != b["id"]
    c = predict(client, frame, seed=8, temperature=1.0)
    assert c["coords_next"] != a["coords_next"]
    # the default is the most likely forecast (temperature 0): the seed does not matter
    d, e = predict(client, frame, seed=1), predict(client, frame, seed=2)
    assert d["temperature"] == 0.0 and d["coords_next"] == e["coords_next"]


def test_given_skeleton_and_caption_are_used_and_returned(client: TestClient):
    joints = [[20 + 10 * i, 30 + 5 * i, i % 2] for i in range(NUM_JOINTS)]
    d = predict(client, png_bytes(160, 120), coords=json.dumps(joints), caption="a person waving")
    assert d["coords_given"] and d["caption_given"] and d["caption"] == "a person waving"
    # Back in upload pixels within one pose bin (1/8192 of the 160-px letterbox side).
    got = np.asarray(d["coords"], dtype=float)
    assert np.abs(got[:, :2] - np.asarray(joints)[:, :2]).max() <= 160 / POSE_BINS + 0.01
    assert got[:, 2].tolist() == [j[2] for j in joints]


@pytest.mark.parametrize("blank", ["", " ", "null"])
def test_an_empty_or_null_optional_field_means_not_given(client: TestClient, blank: str):
    """An HTML form sends empty inputs; JavaScript's FormData sends a null as "null"."""
    frame = png_bytes(seed=4)
    fields = {"coords": blank, "caption": blank, "temperature": blank, "seed": blank}
    d = predict(client, frame, **fields)
    assert _answer(d) == _answer(predict(client, frame))
    assert not d["coords_given"] and not d["caption_given"] and d["temperature"] == 0.0


def test_gif_has_seven_frames_per_step_loops_and_caches(client: TestClient):
    d = predict(client, png_bytes(300, 200), steps=2)
    r = client.get(d["links"]["gif"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/gif"
    gif = Image.open(io.BytesIO(r.content))
    assert gif.n_frames == 2 * 7 and gif.info.get("loop") == 0 and gif.info["duration"] >= 50
    assert gif.size == (300, 200)  # under gif_max_side: the upload's own size
    assert "max-age=" in r.headers["cache-control"]
    again = client.get(d["links"]["gif"], headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and not again.content
    plain = client.get(d["links"]["gif_plain"])
    assert plain.status_code == 200 and plain.content != r.content
    side = Image.open(io.BytesIO(client.get(d["links"]["gif"] + "&side_by_side=true").content))
    assert side.size[0] > 300 and side.size[1] == 200


def test_next_frame_png_is_the_decoded_key_frame_in_the_uploads_aspect(client, checkpoint_dir):
    d = predict(client, png_bytes(320, 160), steps=2)
    decoder = ImageTokenizer.from_pretrained(checkpoint_dir)
    for step in (1, 2):
        r = client.get(d["links"]["next_frame"] + f"&step={step}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        got = np.asarray(Image.open(io.BytesIO(r.content)))
        assert got.shape == (128, 256, 3)  # the letterbox padding is cut away
        ids = torch.tensor(d["tok_rgb_next"][step - 1])[None]
        assert np.array_equal(got, decoder.decode(ids)[0, 64:192].numpy())
    missing = client.get(d["links"]["next_frame"] + "&step=3")  # a 2-step prediction
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_step"
    assert client.get(d["links"]["next_frame"] + "&step=0").status_code == 422


@pytest.mark.parametrize("route", ["/rollout.gif", "/next_frame.png"])
def test_unknown_id_is_404_with_a_json_error(client: TestClient, route: str):
    r = client.get(route, params={"id": "nope-not-an-id"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_id"
    assert client.get(route).status_code == 422  # no id at all


def test_health_ready_metrics_docs_and_page(client: TestClient):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["device"] == "cpu"
    predict(client)
    m = client.get("/metrics").text
    assert re.search(r'm2_requests_total\{method="POST",route="/predict",status="200"\} \d', m)
    for name in ("m2_request_duration_seconds_bucket", "m2_queue_depth", "m2_batch_size_bucket",
                 "m2_model_seconds_bucket", "m2_queue_seconds_bucket"):  # fmt: skip
        assert name in m
    spec = client.get("/openapi.json").json()
    documented = spec["paths"]["/predict"]["post"]["responses"]
    assert {"200", "413", "415", "422", "503", "504"} <= set(documented)
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page.text)  # no external assets


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_their_assets_from_the_service_not_a_cdn(client: TestClient, page: str):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", r.text)  # works on a machine without internet
    urls = re.findall(r"(?:src|href|spec-url)=\"([^\"]+)\"", r.text)
    assets = [u for u in urls if u != "/openapi.json"]
    assert all(u.startswith("/docs-static/") for u in assets), assets
    scripts = [u for u in assets if u.endswith(".js")]
    assert scripts and any(u.endswith(".css") or u.endswith(".png") for u in assets)
    for url in assets:
        got = client.get(url)
        assert got.status_code == 200 and len(got.content) > 1000, url
    js = client.get(scripts[0])
    assert "javascript" in js.headers["content-type"] and len(js.content) > 500_000
    if page == "/docs":  # FastAPI writes OpenAPI 3.1, which Swagger UI renders from v5 on
        assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
        assert b"isOAS31" in js.content


def test_api_key_guards_everything_but_health(checkpoint_dir):
    app = create_app(settings_for(checkpoint_dir, api_key="s3cret", warmup=False))
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        for path in ("/", "/metrics", "/docs", "/docs-static/swagger-ui.css", "/rollout.gif?id=x"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", path
        files = {"frame": ("f.png", png_bytes(), "image/png")}
        assert c.post("/predict", files=files).status_code == 401
        assert c.post("/predict", files=files, headers={"X-API-Key": "wrong"}).status_code == 401
        basic = "Basic " + base64.b64encode(b"me:s3cret").decode()
        for headers in (
            {"X-API-Key": "s3cret"},
            {"Authorization": "Bearer s3cret"},
            {"Authorization": basic},
        ):
            assert c.post("/predict", files=files, headers=headers).status_code == 200


def test_cors_is_off_unless_configured(client: TestClient, checkpoint_dir):
    assert (
        "access-control-allow-origin"
        not in client.get("/healthz", headers={"Origin": "http://x.test"}).headers
    )
    app = create_app(settings_for(checkpoint_dir, cors_origins=["http://x.test"], warmup=False))
    with TestClient(app) as c:
        r = c.get("/healthz", headers={"Origin": "http://x.test"})
        assert r.headers["access-control-allow-origin"] == "http://x.test"


def test_missing_or_damaged_checkpoint_fails_startup_with_one_line(tmp_path, checkpoint_dir):
    missing = create_app(settings_for(tmp_path / "missing"))
    with pytest.raises(StartupError, match="checkpoint directory not found"), TestClient(missing):
        pass
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in checkpoint_dir.rglob("*"):
        if f.is_file():
            (damaged / f.relative_to(checkpoint_dir)).parent.mkdir(parents=True, exist_ok=True)
            (damaged / f.relative_to(checkpoint_dir)).write_bytes(f.read_bytes())
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(StartupError) as info, TestClient(create_app(settings_for(damaged))):
        pass
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_readyz_is_503_until_the_warm_up_prediction_passed(checkpoint_dir):
    with TestClient(create_app(settings_for(checkpoint_dir))) as c:
        first = c.get("/readyz")
        if first.status_code == 503:  # caught before the warm-up finished
            assert first.json()["error"]["code"] == "not_ready"
        wait_ready(c)
        m = c.get("/metrics").text
        # The warm-up went through the real batch path.
        assert re.search(r"m2_batch_size_count \d", m) and "m2_batch_size_count 0.0" not in m
