"""The web page in a real browser: Debian's chromium, headless, driven by Selenium through
Debian's chromium-driver, against the app served by uvicorn on a free loopback port."""

import base64
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from imgsim.web.app import create_app

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
LOADED = """const images = [...document.querySelectorAll('.results img')];
return images.length === arguments[0] && images.every(i => i.complete && i.naturalWidth > 0);"""


@pytest.fixture
def served(pipeline_db, tmp_path):
    """The app on a copy of the pipeline database, served on a free port of 127.0.0.1."""
    db = tmp_path / "web.db"
    shutil.copy(pipeline_db[0], db)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(f"sqlite:///{db}"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.exists() and DRIVER.exists()):
        pytest.fail("Debian's chromium and chromium-driver are not installed "
                    "(tests/install_postgres.sh installs them)")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run", "--window-size=1280,1000",
                     f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    yield driver
    driver.quit()


def wait_for_results(driver, k: int):
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(LOADED, k))


def query_of(driver) -> dict:
    """The current URL's query parameters, empty ones too."""
    return parse_qs(urlparse(driver.current_url).query, keep_blank_values=True)


def screenshot(driver, path: Path) -> Path:
    """The whole page, beyond the window, as a PNG."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(height + 140, 600))  # lazy images are then loaded
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return [...document.images].every(i => i.complete)"))
    driver.save_screenshot(str(path))
    return path


def test_upload_then_similar_to_this_then_the_results(served, browser, texture_folder,
                                                      tmp_path, capsys):
    browser.get(served + "/")
    k = browser.find_element(By.NAME, "k")
    k.clear()
    k.send_keys("6")
    browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(
        str(texture_folder / "zebra" / "zebra_003.jpg"))  # sent as soon as it is chosen
    wait_for_results(browser, 6)
    panel = browser.find_element(By.CSS_SELECTOR, ".asked").text
    assert "uploaded" in panel and "zebra, probability" in panel
    cards = browser.find_elements(By.CSS_SELECTOR, ".results .card")
    first = [cards[0].find_element(By.CLASS_NAME, name).text
             for name in ("rank", "distance", "path")]
    assert first == ["#1", "0", "zebra/zebra_003.jpg"]  # the very image: distance 0

    link = cards[1].find_element(By.LINK_TEXT, "similar to this")
    target = urlparse(link.get_attribute("href"))
    image_id = int(target.path.rsplit("/", 1)[1])
    link.click()
    WebDriverWait(browser, 30).until(lambda d: urlparse(d.current_url).path == target.path)
    wait_for_results(browser, 6)
    assert query_of(browser) == {"k": ["6"], "space": ["combined"]}
    assert f"#{image_id}" in browser.find_element(By.CSS_SELECTOR, ".asked").text
    shown = [urlparse(a.get_attribute("href")).path for a in
             browser.find_elements(By.CSS_SELECTOR, ".results a.similar")]
    assert len(shown) == 6 and f"/similar/{image_id}" not in shown  # itself left out
    search_png = screenshot(browser, tmp_path / "web-search.png")

    k = browser.find_element(By.NAME, "k")
    k.clear()
    k.send_keys("4")
    browser.find_element(By.XPATH, "//button[text()='Search again']").click()
    wait_for_results(browser, 4)  # the same image, a shorter URL: empty fields left out
    assert urlparse(browser.current_url).path == target.path
    assert query_of(browser) == {"k": ["4"], "space": ["combined"]}

    browser.find_element(By.LINK_TEXT, "Results").click()
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "const c = document.querySelector('img.chart'); return c && c.naturalWidth > 0"))
    page = browser.find_element(By.TAG_NAME, "main").text
    assert "Confusion matrix" in page and "Ranking accuracy (classifier scores" in page
    results_png = screenshot(browser, tmp_path / "web-results.png")

    if os.environ.get("IMGSIM_SCREENSHOTS"):  # a folder to keep them in (the README's)
        shutil.copy(search_png, Path(os.environ["IMGSIM_SCREENSHOTS"]) / "web-search.png")
    with capsys.disabled():
        print(f"\nscreenshots: {search_png} {results_png}")


def test_a_dropped_or_pasted_image_is_searched(served, browser, texture_folder):
    """The page's script: a file dropped on the zone, or pasted, is sent as the upload."""
    jpeg = base64.b64encode((texture_folder / "dotted" / "dotted_002.jpg").read_bytes()).decode()
    for event in ("new DragEvent('drop', {dataTransfer: files, bubbles: true})",
                  "new ClipboardEvent('paste', {clipboardData: files, bubbles: true})"):
        browser.get(served + "/")
        browser.execute_script(f"""
            const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
            const files = new DataTransfer();
            files.items.add(new File([bytes], 'query.jpg', {{type: 'image/jpeg'}}));
            document.getElementById('drop').dispatchEvent({event});""", jpeg)
        wait_for_results(browser, 10)
        assert "dotted, probability" in browser.find_element(By.CSS_SELECTOR, ".asked").text
