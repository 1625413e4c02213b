"""The search page in a real browser: headless Chromium (Debian's chromium and
chromium-driver, which .ci/run installs) drives dplg-search-server's page."""

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import free_ports, small_dplg

from dplg_tf import images
from dplg_tf.export import export as export_lib

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _jpeg(path, seed, h=120, w=160):
    from PIL import Image

    Image.fromarray(images.facade_image(h, w, seed)).save(path, "JPEG", quality=92)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """dplg-search-server (the command) over 10 indexed photos."""
    from dplg_tf.retrieval.describers import Describer
    from dplg_tf.search.index import DescriptorIndex

    root = tmp_path_factory.mktemp("page")
    base = str(root / "models" / "dplg")
    export_lib.export(small_dplg(0), base)
    photos = root / "photos"
    photos.mkdir()
    names = [f"landmark_{i // 2}_view_{i % 2}.jpg" for i in range(10)]
    for i, name in enumerate(names):
        _jpeg(photos / name, 300 + i)
    describer = Describer(model=base)
    rows = describer.describe_bytes([(photos / n).read_bytes() for n in names])
    index = DescriptorIndex(rows.shape[1], "exact", describer.probe())
    index.add(rows, names)
    index.save(str(root / "idx"))
    port = free_ports()[0]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dplg_tf.cli.search_server",
                             f"--index_dir={root / 'idx'}", f"--model={base}",
                             f"--image_root={photos}", f"--port={port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
        try:
            urllib.request.urlopen(url + "/v1/health", timeout=5).read()
            break
        except OSError:
            time.sleep(0.3)
    yield {"url": url, "photos": photos, "names": names, "root": root}
    proc.terminate()
    assert proc.wait(60) == 0
    log.close()
    assert "dplg-search-server: stopped" in (root / "server.log").read_text()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("no headless Chromium here: install Debian's chromium and "
                    "chromium-driver (.ci/run does) to run the browser test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-proxy-server"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_the_page_uploads_an_image_and_shows_the_ranked_names(site, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(site["url"] + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "10 images indexed" in d.find_element(By.ID, "info").text)
    info = browser.find_element(By.ID, "info").text
    assert "model dplg version 1" in info and str(site["root"]) not in info
    # keyboard: the first Tab reaches the file picker
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "file"
    query = site["names"][7]
    _slow_searches(browser)
    browser.find_element(By.ID, "file").send_keys(str(site["photos"] / query))
    # the search starts by itself, and the drop zone says so
    wait.until(ec.text_to_be_present_in_element((By.ID, "drop-text"), "searching"))
    assert query in browser.find_element(By.ID, "drop-text").text
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "results in"))
    drop = browser.find_element(By.ID, "drop-text").text
    assert "drop another image" in drop and "press Search" not in drop
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .name")]
    scores = [float(e.text) for e in browser.find_elements(By.CSS_SELECTOR,
                                                            "#results .score")]
    assert len(names) == 10 and names[0] == query and sorted(names) == sorted(site["names"])
    assert scores[0] == pytest.approx(1.0, abs=1e-3) and scores == sorted(scores, reverse=True)
    # the thumbnails and the attention map are real pictures
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && "
        "i.naturalWidth > 0) && document.getElementById('query-attention').naturalWidth > 0"))
    # fewer results through the keyboard-usable select
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "top_k")).select_by_visible_text("5")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == 5)
    shot = os.environ.get("DPLG_SCREENSHOT") or str(tmp_path / "page.png")
    Select(browser.find_element(By.ID, "top_k")).select_by_visible_text("10")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == 10)
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && "
        "i.naturalWidth > 0)"))
    assert browser.save_screenshot(shot) and os.path.getsize(shot) > 10_000
    # the re-ranking check box searches again with "rerank": the scores change
    first = browser.find_element(By.CSS_SELECTOR, "#results .score").text
    assert not browser.find_element(By.ID, "rerank").is_selected()   # the server's default
    browser.find_element(By.ID, "rerank").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#results .score").text != first)
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .name")]
    assert len(names) == 10 and sorted(names) == sorted(site["names"])


def _slow_searches(browser, ms=1500):
    """Searches of this page wait `ms` before they go out (to see what it says meanwhile)."""
    browser.execute_script(
        "const send = window.fetch; window.fetch = (url, options) => url === '/v1/search' ? "
        f"new Promise((r) => setTimeout(r, {ms})).then(() => send(url, options)) : "
        "send(url, options);")


@pytest.mark.slow
def test_the_page_shows_the_servers_refusal_in_place_of_the_results(site, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(site["url"] + "/")
    browser.find_element(By.ID, "file").send_keys(str(site["photos"] / site["names"][2]))
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "results in"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results li")) == 10
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a JPEG")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "refused"))
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
    # the previous results and query are gone: only the error is shown
    assert browser.find_elements(By.CSS_SELECTOR, "#results li") == []
    assert not browser.find_element(By.ID, "query").is_displayed()
    drop = browser.find_element(By.ID, "drop-text").text
    assert "broken.jpg" in drop and "drop another image" in drop
    shot = os.environ.get("DPLG_SCREENSHOT")
    shot = shot.replace(".png", "-refused.png") if shot else str(tmp_path / "refused.png")
    assert browser.save_screenshot(shot)
    assert urllib.request.urlopen(site["url"] + "/v1/health", timeout=10).status == 200
