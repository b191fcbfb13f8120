"""Render a local HTML file in real headless Chromium (helper for tests, not a test).

Uses Debian's ``chromium`` + ``chromium-driver`` (see scripts/install_browser.sh)
driven by the ``selenium`` package. The driver path is passed explicitly, so
Selenium Manager never runs and nothing is downloaded.

    from browser import browser_available, render   # tests/ is on sys.path, like checkpoints
    reason = browser_available()
    if reason:
        pytest.skip(reason)
    info = render(Path("report.html"), tmp_path / "report.png")
    assert not info["console_errors"]
    assert all(img["natural_width"] > 0 for img in info["images"])

Environment overrides: LAYERSCOPE_CHROMIUM, LAYERSCOPE_CHROMEDRIVER (paths).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

MAX_HEIGHT = 12000  # cap for full-page screenshots, in CSS pixels
_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find(env: str, names: tuple[str, ...]) -> str | None:
    path = os.environ.get(env)
    if path:
        return path if os.access(path, os.X_OK) else None
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_available() -> str | None:
    """None if a headless render can be attempted, else the reason it can't."""
    missing = []
    if _find("LAYERSCOPE_CHROMIUM", _BROWSERS) is None:
        missing.append("chromium")
    if _find("LAYERSCOPE_CHROMEDRIVER", ("chromedriver",)) is None:
        missing.append("chromedriver")
    if importlib.util.find_spec("selenium") is None:
        missing.append("the 'selenium' Python package (pip install selenium)")
    if missing:
        return ("headless browser unavailable: missing " + ", ".join(missing)
                + " (run scripts/install_browser.sh)")
    return None


def _short(src: str, limit: int = 80) -> str:
    if src.startswith("data:"):
        return f"{src.split(',', 1)[0]},...({len(src)} chars)"
    return src if len(src) <= limit else src[: limit - 3] + "..."


_IMAGES_JS = """
return Array.from(document.images).map(i => ({
    src: i.currentSrc || i.src || '', complete: i.complete, natural_width: i.naturalWidth}));
"""
_HEIGHT_JS = """
const d = document.documentElement, b = document.body;
return Math.max(d.scrollHeight, d.offsetHeight, b ? b.scrollHeight : 0, b ? b.offsetHeight : 0);
"""


def render(html_path: Path, screenshot_path: Path, width: int = 1280,
           timeout: float = 30.0) -> dict:
    """Open ``html_path`` (file://) in headless Chromium and save a full-page PNG.

    Returns {"console_errors": [str], "images": [{"src", "natural_width"}],
             "title": str, "page_height": int}.
    console_errors holds every SEVERE browser log entry: console.error(), uncaught
    exceptions, and failed resource loads (a broken <img> shows up here too).
    """
    reason = browser_available()
    if reason:
        raise RuntimeError(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = _find("LAYERSCOPE_CHROMIUM", _BROWSERS)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--hide-scrollbars",
                "--force-device-scale-factor=1", f"--window-size={width},2000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Profile and chromium's socket dirs go into one temp dir removed afterwards
    # (otherwise every run leaves org.chromium.Chromium.* dirs behind in /tmp).
    with tempfile.TemporaryDirectory(prefix="layerscope-chromium-") as tmp:
        opts.add_argument(f"--user-data-dir={tmp}/profile")
        service = Service(executable_path=_find("LAYERSCOPE_CHROMEDRIVER", ("chromedriver",)),
                          env={**os.environ, "TMPDIR": tmp})
        driver = webdriver.Chrome(options=opts, service=service)
        try:
            return _render(driver, Path(html_path), Path(screenshot_path), width, timeout)
        finally:
            driver.quit()


def _render(driver, html_path: Path, screenshot_path: Path, width: int, timeout: float) -> dict:
    driver.set_page_load_timeout(timeout)
    driver.get(html_path.resolve().as_uri())  # waits for the load event
    # Set the viewport exactly through CDP: in headless=new the window size
    # includes ~140px of (invisible) browser UI. Measure with a tiny viewport
    # first (scrollHeight is never below the viewport height), then grow it to
    # the page; measure again in case the layout depends on the viewport (vh).
    def set_viewport(h: int) -> None:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": max(1, min(h, MAX_HEIGHT)),
            "deviceScaleFactor": 1, "mobile": False})

    height = 100
    for _ in range(3):
        set_viewport(height)
        new_height = int(driver.execute_script(_HEIGHT_JS))
        if new_height == height:
            break
        height = new_height
    else:  # layout keeps growing with the viewport (e.g. 100vh + margin)
        set_viewport(height)
    # Lazy images brought into view by the resize: give them time to settle.
    deadline = time.monotonic() + timeout
    images = driver.execute_script(_IMAGES_JS)
    while not all(i["complete"] for i in images) and time.monotonic() < deadline:
        time.sleep(0.1)
        images = driver.execute_script(_IMAGES_JS)
    screenshot_path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(screenshot_path)):
        raise RuntimeError(f"screenshot failed: {screenshot_path}")
    errors = [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    return {
        "console_errors": errors,
        "images": [{"src": _short(i["src"]), "natural_width": int(i["natural_width"])}
                   for i in images],
        "title": driver.title,
        "page_height": height,
    }
