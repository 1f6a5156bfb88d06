"""The out_of_domain warning end to end on the tiny checkpoint: `m2 calibrate-domain` reads
held-out synthetic frames and writes in_domain.safetensors; the server then scores every frame
(`domain_score`) and warns for a solid black one, while a checkpoint without the file
answers with a null score; bad calibration input is one error line and no file."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient
from svc_helpers import make_checkpoint, settings_for, wait_ready

from service.app import create_app
from training.eval import domain
from training.synth.synth import generate, render_clip, sample_spec


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("domain")
    data = root / "synth"
    generate(data, clips=24, seed=3, frames=(70, 70), progress=False)
    ckpt = make_checkpoint(root / "ckpt")
    assert domain.main(["--checkpoint", str(ckpt), "--data", str(data), "--frames", "256"]) == 0
    return ckpt, data


def _png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def _post(client, frame: np.ndarray) -> dict:
    r = client.post(
        "/predict", files={"frame": ("f.png", _png(frame), "image/png")}, data={"seed": "0"}
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_calibration_writes_both_views_from_held_out_frames(calibrated):
    ckpt, data = calibrated
    check = domain.DomainCheck.load(ckpt)
    assert check is not None and check.threshold > 0 and check.bank.shape[1] == 2 * 2 + 4 + 16
    assert str(data) in check.source and check.frames >= 192


def test_a_black_frame_is_out_of_domain_and_a_synthetic_one_has_a_score(calibrated):
    ckpt, _ = calibrated
    with TestClient(create_app(settings_for(ckpt))) as client:
        wait_ready(client)
        black = _post(client, np.zeros((120, 160, 3), np.uint8))
        assert black["domain_score"] > 1
        codes = [w["code"] for w in black["warnings"]]
        assert codes[0] == "out_of_domain", codes
        assert "unlike the frames the model was trained on" in black["warnings"][0]["message"]
        clip = render_clip(sample_spec(77, 0, frames=(4, 4)))
        drawn = _post(client, clip.frames[2])
        assert isinstance(drawn["domain_score"], float)


def test_a_checkpoint_without_statistics_gives_a_null_score(calibrated, tmp_path):
    ckpt, _ = calibrated
    bare = shutil.copytree(ckpt, tmp_path / "bare")
    (bare / "in_domain.safetensors").unlink()
    with TestClient(create_app(settings_for(bare))) as client:
        wait_ready(client)
        body = _post(client, np.zeros((120, 160, 3), np.uint8))
        assert body["domain_score"] is None
        assert "out_of_domain" not in [w["code"] for w in body["warnings"]]


def test_a_damaged_statistics_file_stops_the_server_with_its_name(calibrated, tmp_path):
    ckpt, _ = calibrated
    bad = shutil.copytree(ckpt, tmp_path / "bad")
    (bad / "in_domain.safetensors").write_bytes(b"{")
    with (
        pytest.raises(Exception, match=r"in_domain\.safetensors: cannot read"),
        TestClient(create_app(settings_for(bad))),
    ):
        pass


def test_calibration_without_enough_held_out_frames_is_one_error_line(calibrated, tmp_path, capsys):
    ckpt, _ = calibrated
    small = tmp_path / "small"
    generate(small, clips=2, seed=4, frames=(5, 5), progress=False)
    target = shutil.copytree(ckpt, tmp_path / "c")
    (target / "in_domain.safetensors").unlink()
    assert domain.main(["--checkpoint", str(target), "--data", str(small)]) == 2
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert err.startswith("m2 calibrate-domain: error:") and "need at least 192" in err
    assert not (target / "in_domain.safetensors").exists()
