"""The web page in a real headless browser (Debian's chromium driven by Playwright): load
`/`, pick a frame, see the caption and the GIF appear; a bad file shows the error."""

from __future__ import annotations

from pathlib import Path

import pytest
from svc_helpers import png_bytes

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
    assert not external, external  # everything came from the app itself


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
