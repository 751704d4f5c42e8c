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


@pytest.mark.skipif(bool(MISSING), reason=f"headless browser test: {MISSING}")
def test_mnist_drawings_are_centred_by_centre_of_mass(tmp_path):
    """MNIST digits sit in a 20-pixel box with their centre of mass at the image centre; an L-shaped stroke has its
    mass low and to the left of its bounding box's centre, so bounding-box centring alone would miss by pixels."""
    import numpy as np

    from jemlab.serve.browser import draw_stroke, open_browser, wait_for

    app = create_app(tiny_run(tmp_path, extra=[("data.dataset", "mnist")]), reference_size=64)
    with serving(app) as server:
        driver = open_browser()
        try:
            driver.get(server.url)
            wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready") == "true")
            draw_stroke(driver, [(0.25, 0.15), (0.25, 0.85), (0.75, 0.85)])
            image = np.array(driver.execute_script("return modelInput()"), dtype=float).reshape(28, 28)
            driver.execute_script("document.getElementById('fit').checked = false")
            raw = np.array(driver.execute_script("return modelInput()"), dtype=float).reshape(28, 28)
        finally:
            driver.quit()
    ys, xs = np.mgrid[0:28, 0:28] + 0.5

    def centre(img):
        return (img * xs).sum() / img.sum(), (img * ys).sum() / img.sum()

    cx, cy = centre(image)
    assert abs(cx - 14) <= 0.75 and abs(cy - 14) <= 0.75
    rows, cols = np.nonzero(image > 0.2)
    assert max(np.ptp(rows), np.ptp(cols)) <= 21  # scaled into the 20-pixel box (±1 for anti-aliasing)
    raw_cx, raw_cy = centre(raw)  # without "fit": the drawing as drawn, mass left of and below the centre
    assert raw_cx < 13 and raw_cy > 15
