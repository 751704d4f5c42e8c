"""End to end in headless Chromium: the page loads, a drawn stroke gets a prediction and an energy, screenshot.

Skips with the reason when selenium, Chromium or chromedriver is missing. The screenshot goes to
$JEMLAB_SCREENSHOT (default: the test's temporary folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jemlab.serve import create_app
from jemlab.serve.browser import find_chromium
from serve_support import serving, tiny_run

pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
_, _, MISSING = find_chromium()


@pytest.mark.skipif(bool(MISSING), reason=f"headless browser test: {MISSING}")
def test_draw_predict_and_screenshot(tmp_path):
    from jemlab.serve.browser import demo_session

    app = create_app(tiny_run(tmp_path), reference_size=64)
    screenshot = Path(os.environ.get("JEMLAB_SCREENSHOT") or tmp_path / "serve-screenshot.png")
    with serving(app) as server:
        state = demo_session(server.url, screenshot, chain_ticks=2)
    assert state["error"] == ""
    assert state["predicted"] in app.actions.class_names
    assert float(state["energy"]) == pytest.approx(float(state["energy"]))  # a number, not a placeholder
    assert state["verdict"].split(" ")[0] in ("in-distribution", "out-of-distribution")
    assert screenshot.stat().st_size > 10_000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
