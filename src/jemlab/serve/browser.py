"""Driving the demo page in headless Chromium, for the end-to-end test and the README screenshot.

Needs selenium (``pip install -e ".[test]"``) and a system Chromium with its driver (Debian: ``apt-get install
chromium chromium-driver``). selenium talks to chromedriver over the W3C WebDriver protocol; it downloads nothing
when the driver's path is given, which is how it is used here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> tuple[str | None, str | None, str]:
    """(browser path, driver path, reason when either is missing). ``$CHROMIUM``/``$CHROMEDRIVER`` override."""
    browser = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path]
    hint = "Debian: apt-get install -y chromium chromium-driver"
    reason = f"{' and '.join(missing)} not found ({hint})" if missing else ""
    return browser, driver, reason


def open_browser(width: int = 1400, height: int = 900) -> Any:
    """A headless Chromium WebDriver (the caller quits it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver, reason = find_chromium()
    if reason:
        raise RuntimeError(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--mute-audio"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def wait_for(driver: Any, condition: Any, timeout: float = 30.0) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def draw_stroke(driver: Any, points: list[tuple[float, float]]) -> None:
    """Drag the mouse over the drawing canvas through points given as fractions (0..1) of its size."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "draw")
    width, height = canvas.size["width"], canvas.size["height"]

    def offset(p: tuple[float, float]) -> tuple[int, int]:  # selenium offsets are from the element's centre
        return round((p[0] - 0.5) * width), round((p[1] - 0.5) * height)

    actions = ActionChains(driver, duration=20)
    actions.move_to_element_with_offset(canvas, *offset(points[0])).click_and_hold()
    previous = offset(points[0])
    for p in points[1:]:
        current = offset(p)
        actions.move_by_offset(current[0] - previous[0], current[1] - previous[1])
        previous = current
    actions.release().perform()


def page_state(driver: Any) -> dict[str, str]:
    """What the page shows: predicted class, energy, verdict and typicality texts."""
    from selenium.webdriver.common.by import By

    def text(element_id: str) -> str:
        return driver.find_element(By.ID, element_id).text

    predicted = driver.find_element(By.ID, "bars").get_attribute("data-predicted") or ""
    return {
        "predicted": predicted,
        "energy": text("energy"),
        "verdict": text("verdict"),
        "percentile": text("percentile"),
        "error": text("error"),
    }


def demo_session(url: str, screenshot: str | Path, *, chain_ticks: int = 0, refine: bool = False) -> dict[str, str]:
    """Load the page, draw a stroke, wait for the prediction (optionally refine and run chains), screenshot it.

    Returns:
        ``page_state`` after drawing (before any refinement).
    """
    from selenium.webdriver.common.by import By

    driver = open_browser()
    try:
        driver.get(url)
        wait_for(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        # A trouser-like shape: two legs joined at the waist.
        draw_stroke(driver, [(0.35, 0.85), (0.40, 0.15), (0.60, 0.15), (0.65, 0.85)])
        draw_stroke(driver, [(0.50, 0.2), (0.50, 0.5)])
        wait_for(driver, lambda d: page_state(d)["energy"] not in ("", "–"))
        state = page_state(driver)
        if chain_ticks:
            driver.find_element(By.ID, "chain-mode").send_keys("p(x|y)")
            driver.find_element(By.ID, "chain-run").click()
            wait_for(driver, lambda d: int(d.find_element(By.ID, "chain-step").text or 0) >= 5 * chain_ticks, 120)
            driver.find_element(By.ID, "chain-run").click()
        if refine:
            driver.find_element(By.ID, "refine").click()
            wait_for(driver, lambda d: d.find_element(By.ID, "refine").is_enabled(), 120)
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        return state
    finally:
        driver.quit()
