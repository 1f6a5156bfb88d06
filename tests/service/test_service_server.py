"""`m2 serve` as a real subprocess, spoken to over HTTP (and raw sockets for the body cap);
`m2 predict` against it and locally; startup failures as one line."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from PIL import Image
from svc_helpers import REPO, m2_command, png_bytes, server_env

from service.predict_cli import main as predict_main


def _predict(url: str, **data) -> httpx.Response:
    files = {"frame": ("f.png", png_bytes(120, 90), "image/png")}
    return httpx.post(url + "/predict", files=files, data=data, timeout=60)


def _raw(url: str, head: bytes, body_chunks, chunk_limit: int) -> tuple[bytes, int]:
    """Send a request by hand; stop when the server answers or closes. -> (answer, bytes sent)."""
    u = urlparse(url)
    sent = 0
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(head)
        s.settimeout(0.0)
        answer = b""
        for i, chunk in enumerate(body_chunks):
            if i >= chunk_limit:
                break
            with contextlib.suppress(BlockingIOError):
                answer += s.recv(65536)
            if answer:
                break
            try:
                s.settimeout(5)
                s.sendall(chunk)
                sent += len(chunk)
                s.settimeout(0.0)
            except (BrokenPipeError, ConnectionResetError):
                break
        s.settimeout(5)
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                more = s.recv(65536)
                if not more:
                    break
                answer += more
        except (ConnectionResetError, TimeoutError):
            pass
    return answer, sent


def test_server_predicts_over_http(live_server: str):
    r = _predict(live_server, steps="2", seed="5")
    assert r.status_code == 200, r.text
    d = r.json()
    assert len(d["coords_next"]) == 2 and d["device"] == "cpu"
    gif = httpx.get(live_server + d["links"]["gif"], timeout=30)
    assert (
        gif.status_code == 200
        and gif.headers["content-type"] == "image/gif"
        and "etag" in gif.headers
    )
    png = httpx.get(live_server + d["links"]["next_frame"], timeout=30)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert httpx.get(live_server + "/rollout.gif?id=unknown").status_code == 404
    assert "m2_requests_total" in httpx.get(live_server + "/metrics").text


def test_oversize_bodies_are_cut_off_over_the_wire(live_server: str):
    mib = b"\0" * (1 << 20)
    host = urlparse(live_server).netloc.encode()
    # 1) Content-Length says 200 MB: refused before the body is read.
    head = (b"POST /predict HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: multipart/form-data; "
            b"boundary=x\r\nContent-Length: " + str(200 << 20).encode() + b"\r\n\r\n")  # fmt: skip
    t0 = time.monotonic()
    answer, sent = _raw(live_server, head, iter(lambda: mib, None), chunk_limit=200)
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer, answer[:300]
    assert sent <= 8 << 20 and time.monotonic() - t0 < 10
    # 2) Chunked, no length: counted while streaming, cut at the cap (16 MiB).
    head = (b"POST /predict HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: multipart/form-data; "
            b"boundary=x\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    part = b'--x\r\nContent-Disposition: form-data; name="frame"; filename="a.png"\r\n\r\n'
    chunks = (b"%x\r\n%s\r\n" % (len(c), c) for c in [part, *([mib] * 200)])
    answer, sent = _raw(live_server, head, chunks, chunk_limit=201)
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer, answer[:300]
    assert sent < 40 << 20  # nowhere near 200 MB
    assert _predict(live_server).status_code == 200  # and the next normal request is fine


def test_m2_predict_via_url_and_locally_give_the_same_answer(live_server, checkpoint_dir, tmp_path):
    frame = tmp_path / "frame.png"
    frame.write_bytes(png_bytes(100, 80, seed=9))
    remote, local = tmp_path / "remote", tmp_path / "local"
    assert (
        predict_main([str(frame), "--url", live_server, "--out", str(remote), "--seed", "3"]) == 0
    )
    assert (
        predict_main(
            [str(frame), "--checkpoint", str(checkpoint_dir), "--out", str(local), "--seed", "3"]
        )
        == 0
    )
    a, b = (json.loads((d / "prediction.json").read_text()) for d in (remote, local))
    drop = ("id", "links", "timings_ms")
    assert {k: v for k, v in a.items() if k not in drop} == {
        k: v for k, v in b.items() if k not in drop
    }
    for d in (remote, local):
        assert Image.open(d / "rollout.gif").n_frames == 7
        assert Image.open(d / "next_frame.png").format == "PNG"


def test_m2_predict_reports_bad_input_in_one_line(live_server, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert predict_main([str(bad), "--url", live_server, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2 predict: error:") and "415" in err and "\n" not in err
    assert predict_main([str(tmp_path / "missing.png"), "--url", live_server]) == 2


@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_serve_with_a_bad_checkpoint_exits_with_one_line(damage, checkpoint_dir, tmp_path):
    target = tmp_path / "ckpt"
    if damage == "damaged":
        target.mkdir()
        for f in checkpoint_dir.iterdir():
            if f.is_file():
                (target / f.name).write_bytes(f.read_bytes())
        (target / "config.json").write_text("{ not json")
    cmd = [*m2_command(), "serve", "--checkpoint", str(target), "--port", "0", "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=server_env(), cwd=REPO)
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("m2 serve: error:"), p.stderr
    assert str(Path(target)) in errors[0] and "Traceback" not in p.stderr
