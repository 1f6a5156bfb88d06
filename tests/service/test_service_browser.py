"""The web page in a real headless browser (Debian's chromium driven by Playwright): load
`/`, pick a frame, see the caption and the GIF appear; a bad file shows the error and marks
the previous result stale; the motion label counts the GIF's frames; a running request
shows its elapsed time; the server's warnings show; a format-2 checkpoint's action and
count of uncertain joints show. Screenshots of the page after a good
and after a failed request are left in the test's tmp_path (see pytest --basetemp)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from svc_helpers import ACTIONS, make_checkpoint_v2, png_bytes, run_server

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--disable-background-networking", "--disable-component-update", "--no-first-run",
    "--disable-sync", "--disable-gpu", "--no-sandbox",
]  # fmt: skip

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"
    ),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        yield b
        b.close()


def _predict(page, frame: Path) -> None:
    """Pick `frame`, press Predict, wait until the GIF of the answer has loaded."""
    page.set_input_files("#file", str(frame))
    page.click("#go")
    _wait_for_answer(page)


def _wait_for_answer(page) -> None:
    page.wait_for_function(
        "() => { const g = document.getElementById('gif'); return !g.hidden && g.complete"
        " && g.naturalWidth > 0 && document.getElementById('progress').hidden; }",
        timeout=20_000,
    )


def test_page_uploads_a_frame_and_shows_caption_gif_and_next_frame(browser, live_server, tmp_path):
    frame = tmp_path / "frame.png"
    frame.write_bytes(png_bytes(160, 120, seed=4))
    page = browser.new_page()
    external = []
    page.on(
        "request",
        lambda r: (
            external.append(r.url)
            if not r.url.startswith(live_server) and not r.url.startswith(("blob:", "data:"))
            else None
        ),
    )
    page.goto(live_server + "/")
    page.set_input_files("#file", str(frame))
    page.click("#go")
    page.wait_for_function(
        "() => { const g = document.getElementById('gif'); return !g.hidden && g.complete && g.naturalWidth > 0; }",
        timeout=20_000,
    )
    page.wait_for_function("() => document.getElementById('next').naturalWidth > 0", timeout=20_000)
    caption = page.text_content("#caption")
    data = page.evaluate("() => JSON.parse(document.getElementById('json').textContent)")
    assert caption == (data["caption"] or "(no caption)")
    assert page.evaluate("() => document.getElementById('gif').naturalWidth") == 160
    assert "rollout.gif?id=" + data["id"] in page.get_attribute("#gif", "src")
    assert page.is_hidden("#error")
    assert page.is_hidden("#warnings")  # an ordinary still frame: nothing to warn about
    assert page.is_hidden("#progress") and page.is_hidden("#stale-note")
    assert page.is_hidden("#action") and page.is_hidden("#uncertain")  # format 1: neither
    assert not external, external  # everything came from the app itself
    page.screenshot(path=str(tmp_path / "after-success.png"), full_page=True)


def test_page_shows_the_servers_error_message(browser, live_server, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("definitely not a picture")
    page = browser.new_page()
    page.goto(live_server + "/")
    page.set_input_files("#file", str(bad))
    page.click("#go")
    page.wait_for_selector("#error", state="visible", timeout=20_000)
    text = page.text_content("#error")
    assert text.startswith("415") and "not an image" in text
    assert page.is_hidden("#stale-note")  # there was no earlier answer to mark


def test_a_failed_request_marks_the_previous_result_stale(browser, live_server, tmp_path):
    good, bad = tmp_path / "frame.png", tmp_path / "notes.png"
    good.write_bytes(png_bytes(160, 120, seed=5))
    bad.write_text("definitely not a picture")
    page = browser.new_page()
    page.goto(live_server + "/")
    _predict(page, good)
    caption = page.text_content("#caption")

    page.set_input_files("#file", str(bad))
    page.click("#go")
    page.wait_for_selector("#error", state="visible", timeout=20_000)
    assert page.text_content("#error").startswith("415")
    # the old answer is still there to compare with, but visibly not this request's
    assert "stale" in page.get_attribute("#result", "class")
    assert page.is_visible("#stale-note")
    assert "previous result" in page.text_content("#stale-note").lower()
    assert page.text_content("#caption") == caption
    opacity = page.evaluate("() => getComputedStyle(document.getElementById('gif')).opacity")
    assert float(opacity) < 0.5
    page.screenshot(path=str(tmp_path / "after-failure.png"), full_page=True)

    _predict(page, good)  # a new answer is not stale
    assert "stale" not in (page.get_attribute("#result", "class") or "")
    assert page.is_hidden("#stale-note") and page.is_hidden("#error")


def test_motion_label_counts_the_gifs_frames_and_steps_stop_at_the_servers_max(
    browser, live_server, tmp_path
):
    frame = tmp_path / "frame.png"
    frame.write_bytes(png_bytes(160, 120, seed=6))
    page = browser.new_page()
    page.goto(live_server + "/")
    # M2_MAX_STEPS (4 by default), read from the server's OpenAPI document
    page.wait_for_function("() => document.getElementById('steps').max !== ''", timeout=10_000)
    assert page.get_attribute("#steps", "max") == "4"
    page.fill("#steps", "3")
    _predict(page, frame)
    gif = httpx.get(live_server + page.get_attribute("#gif", "src"), timeout=20).content
    frames = Image.open(io.BytesIO(gif)).n_frames
    assert frames == 3 * 7  # per step: where it starts and six predicted skeletons
    label = page.text_content("#gif-label")
    assert label == f"predicted motion: 3 roll-out steps × (now, then +1 … +6) = {frames} frames"


def test_a_running_request_shows_its_elapsed_time(browser, live_server, tmp_path):
    frame = tmp_path / "frame.png"
    frame.write_bytes(png_bytes(160, 120, seed=7))
    page = browser.new_page()
    page.goto(live_server + "/")
    held = []  # the real request, held back a while, then sent on to the real server
    page.route("**/predict", lambda route: held.append(route))
    page.set_input_files("#file", str(frame))
    page.click("#go")
    page.wait_for_selector("#progress", state="visible", timeout=5_000)
    page.wait_for_function(
        "() => parseFloat(document.getElementById('elapsed').textContent) >= 0.5", timeout=5_000
    )
    assert re.fullmatch(r"working… \d+\.\d s", page.text_content("#progress").strip())
    assert page.is_disabled("#go")
    assert len(held) == 1
    held[0].continue_()
    _wait_for_answer(page)  # the indicator goes when the answer comes
    assert page.is_hidden("#error")


def test_the_servers_warnings_are_shown(browser, live_server, tmp_path):
    rng = np.random.default_rng(8)
    pictures = [Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)) for _ in "ab"]
    animated = tmp_path / "animated.png"
    pictures[0].save(animated, format="PNG", save_all=True, append_images=pictures[1:])
    page = browser.new_page()
    page.goto(live_server + "/")
    _predict(page, animated)
    assert page.is_visible("#warnings")
    assert "animated image with 2 frames" in page.text_content("#warnings")


def test_format2_action_and_uncertain_joints_are_shown(browser, tmp_path):
    frame = tmp_path / "frame.png"
    frame.write_bytes(png_bytes(160, 120, seed=5))
    with run_server(make_checkpoint_v2(tmp_path / "ckpt-v2")) as url:
        page = browser.new_page()
        page.goto(url + "/")
        _predict(page, frame)
        data = page.evaluate("() => JSON.parse(document.getElementById('json').textContent)")
        assert data["action"] in ACTIONS
        assert page.is_visible("#action")
        assert page.text_content("#action") == data["action"].replace("_", " ")
        visible = [j[2] == 1 for j in data["coords"]]
        low = sum(v and c < 0.5 for v, c in zip(visible, data["confidence"]["coords"], strict=True))
        want = (
            f"{low} of {sum(visible)} visible joints uncertain (drawn hollow)"
            if low
            else f"all {sum(visible)} visible joints confident"
        )
        assert page.is_visible("#uncertain") and page.text_content("#uncertain") == want
        page.screenshot(path=str(tmp_path / "format2.png"), full_page=True)


def test_a_real_photo_shows_the_out_of_domain_warning(browser, tmp_path):
    """The bundled demo was trained on synthetic clips: a real photo (scikit-image's coffee
    cup) gets the out_of_domain warning, shown on the page."""
    pytest.importorskip("skimage")
    from ood_corpus import photo_dir

    demo = Path(__file__).resolve().parents[2] / "checkpoints" / "m2-demo"
    with run_server(demo) as url:
        page = browser.new_page()
        page.goto(url + "/")
        _predict(page, photo_dir() / "coffee.png")
        data = page.evaluate("() => JSON.parse(document.getElementById('json').textContent)")
        assert data["domain_score"] > 1
        assert page.is_visible("#warnings")
        assert "unlike the frames the model was trained on" in page.text_content("#warnings")
        assert page.text_content("#caption").startswith("guess: ")  # not shown as an answer
        assert "doubtful" in page.get_attribute("#result", "class")
        page.screenshot(path=str(tmp_path / "photo-warning.png"), full_page=True)
