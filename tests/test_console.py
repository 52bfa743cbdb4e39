"""The web console in a real browser (headless Chromium from Debian, driven by Selenium) against a
running local mesh: search by uploading a grocery val photo, see the query box and the results with
their boxes, search again by clicking a result, and watch an ingestion job finish with its failure.

VISEARCH_SCREENSHOTS=DIR keeps the screenshots (docs/img/console-*.png are made so)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_until
from tests.test_mesh import cli

pytestmark = pytest.mark.mesh
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def product(item_id: str) -> str:
    return item_id.rsplit("_", 1)[0]


@pytest.fixture(scope="module")
def console_mesh(tmp_path_factory, model_repo, grocery):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("chromium and chromedriver are not installed: apt-get install chromium chromium-driver "
                    "(make system-deps)")
    from visearch import mesh
    from visearch.client import Client
    from visearch.demo import write_manifest

    data = tmp_path_factory.mktemp("console-mesh")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISEARCH_")}
    env.update(VISEARCH_DATA_DIR=str(data), VISEARCH_MODEL_REPOSITORY=str(model_repo), VISEARCH_INGEST_MAX_OBJECTS="1")
    cli(env, "up")
    port = free_port()
    state = mesh.load_state(data)
    key = mesh.read_admin_key(data)
    log = open(data / "console.log", "wb")
    # `visearch console`: the console service for the local mesh's gateway (python -m services.console elsewhere).
    proc = subprocess.Popen([sys.executable, "-m", "visearch.cli", "console", "--port", str(port)], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return urllib.request.urlopen(url + "/healthz", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, 60, "console", proc, data / "console.log")
        assert f"{url}/#key={key}" in (data / "console.log").read_text(), "it prints where to open it, with the key"
        # A catalog of 8 products, 12 photos each, through the queue.
        by_product: dict[int, list] = {}
        for p in grocery["train"]:
            if p.is_product:
                by_product.setdefault(p.fine_id, []).append(p)
        chosen = sorted(by_product)[::3][:8]
        photos = [p for f in chosen for p in by_product[f][:12]]
        res = cli(env, "ingest", "--manifest", str(write_manifest(photos, data / "shop.csv")), "--catalog", "shop",
                  "--regions", "float", "--wait", "--json")
        assert '"failed": 0' in res.stdout, res.stdout
        client = Client(state["gateway"], api_key=key, timeout=60)
        yield {"env": env, "url": url, "key": key, "client": client, "products": set(chosen), "data": data}
        client.close()
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
        cli(env, "down", check=False)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400",
                "--disable-gpu", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def shot(driver, name: str) -> None:
    out = os.environ.get("VISEARCH_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(out) / name))


def wait_for(driver, check, timeout: float = 60, what: str = ""):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    try:  # the page re-renders while we look: a stale element means "look again"
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=[StaleElementReferenceException]).until(lambda d: check(d))
    except Exception:
        status = driver.find_element("id", "status").text
        raise AssertionError(f"timed out waiting for {what}; page status: {status!r}") from None


def test_search_page_finds_the_same_product_and_draws_boxes(console_mesh, browser, grocery):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    m = console_mesh
    # A val photo the system answers right (over the API): the console must show the same.
    query, expected = None, None
    for p in (p for p in grocery["val"] if p.fine_id in m["products"]):
        top = m["client"].search(p.path, catalog="shop", top_k=1).hits[0].item_id
        if product(top) == p.fine_name:
            query, expected = p, top
            break
    assert query is not None, "no val photo of the catalog's products is answered right over the API"

    browser.get(f"{m['url']}/#key={m['key']}")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#catalog option"), what="the catalog list")
    assert "#key" not in browser.current_url, "the key leaves the address bar"
    Select(browser.find_element(By.ID, "catalog")).select_by_value("shop")
    browser.find_element(By.ID, "file").send_keys(str(query.path))
    hits = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results .hit"), what="results")
    assert hits[0].get_attribute("data-item-id") == expected, "the console shows what the API answers"
    assert product(hits[0].get_attribute("data-item-id")) == query.fine_name, "the same product comes first"
    # The searched box over the query photo, and each result's stored object box over its thumbnail.
    rect = browser.find_element(By.CSS_SELECTOR, "#query-svg rect.query")
    assert float(rect.get_attribute("width")) > 10 and float(rect.get_attribute("height")) > 10
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit rect.object")) == len(hits),
             what="a box on every result")
    wait_for(browser, lambda d: all(i.get_attribute("naturalWidth") not in (None, "0")
                                    for i in d.find_elements(By.CSS_SELECTOR, "#results .hit img")),
             what="every thumbnail loaded")
    shot(browser, "console-search.png")

    # Region-level re-ranking draws where each result matched (changing it searches the photo again).
    Select(browser.find_element(By.ID, "rerank")).select_by_value("qam")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit rect.region")) >= 3,
             what="matched regions drawn")
    assert "re-rank qam" in browser.find_element(By.ID, "query-info").text
    shot(browser, "console-search-qam.png")

    # Clicking a result searches with it: that catalog photo finds itself first.
    second = browser.find_elements(By.CSS_SELECTOR, "#results .hit")[1]
    clicked = second.get_attribute("data-item-id")
    second.click()
    wait_for(browser, lambda d: (h := d.find_elements(By.CSS_SELECTOR, "#results .hit"))
             and h[0].get_attribute("data-item-id") == clicked, what="the clicked result to come first")

    # With the default re-rank (verify) a photo verifies against itself: the page marks the hit the
    # API flags as a match and draws its verified correspondences on both images. (Not necessarily
    # first: verified photos of the same product rank by the expanded query, and the inlier bonus
    # saturates at VerifyParams.cap, so an exact copy and a verified other photo can swap places.)
    Select(browser.find_element(By.ID, "rerank")).select_by_value("verify")
    own = f"#results .hit.match[data-item-id='{clicked}']"
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, own), what="the clicked result marked as a match")
    assert "re-rank verify" in browser.find_element(By.ID, "query-info").text
    mine = browser.find_element(By.CSS_SELECTOR, own)
    assert "match" in mine.text, "a matched hit carries its badge"
    assert len(mine.find_elements(By.CSS_SELECTOR, "circle.corr")) >= 10, "its correspondences are drawn"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#query-svg circle.corr")) >= 10
    image = m["client"].item_image(clicked, catalog="shop", max_side=1024).image  # what the page searched
    flagged = {h.item_id for h in m["client"].search(image, catalog="shop", top_k=len(hits)).hits if h.match}
    shown = {h.get_attribute("data-item-id") for h in browser.find_elements(By.CSS_SELECTOR, "#results .hit.match")}
    assert shown == flagged, "the page marks exactly the hits the API flags"
    shot(browser, "console-search-verify.png")


def test_jobs_page_follows_an_ingestion_to_its_end_with_failures(console_mesh, browser, grocery):
    from selenium.webdriver.common.by import By

    from visearch.gateway.v1 import gateway_pb2

    m = console_mesh
    photos = [p for p in grocery["train"] if p.is_product][-30:]
    items = [gateway_pb2.IngestItem(item_id=f"new{i}", image=p.path.read_bytes()) for i, p in enumerate(photos)]
    items.append(gateway_pb2.IngestItem(item_id="broken", image=b"\xff\xd8\xff\xe0 truncated jpeg"))
    browser.get(f"{m['url']}/jobs#key={m['key']}")
    job_id = m["client"].ingest(items, catalog="more").job_id
    row = f"#jobs-table tr[data-job-id='{job_id}']"
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row), 30, "the new job's row")
    wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, row).get_attribute("data-state") == "done", 180,
             "the job to finish")
    cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, f"{row} td")]
    assert cells[1] == "more" and cells[3] == "done" and "31/31" in cells[4] and cells[5] == "1", cells
    browser.find_element(By.CSS_SELECTOR, row).click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#failures-table tbody tr"), 20, "the failures")
    failure = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#failures-table tbody tr td")]
    assert failure[0] == "broken" and failure[1], failure  # with its reason
    rows = browser.find_elements(By.CSS_SELECTOR, "#catalogs-table tbody tr")
    catalogs = {r.get_attribute("data-catalog"): r.text for r in rows}
    assert {"shop", "more"} <= set(catalogs), catalogs
    shot(browser, "console-jobs.png")


def test_console_speaks_the_api_auth(console_mesh):
    """No key or a wrong key: 401 with the gateway's reason, never data."""
    import json
    import urllib.error

    m = console_mesh
    for headers in ({}, {"Authorization": "Bearer not-a-key"}):
        req = urllib.request.Request(m["url"] + "/api/catalogs", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 401
        assert json.loads(err.value.read())["error"]["code"] == "UNAUTHENTICATED"
    ok = urllib.request.urlopen(urllib.request.Request(m["url"] + "/api/catalogs",
                                                       headers={"Authorization": f"Bearer {m['key']}"}), timeout=10)
    assert "shop" in {c["name"] for c in json.loads(ok.read())["catalogs"]}
    page = urllib.request.urlopen(m["url"] + "/", timeout=10)
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert "http" not in page.read().decode().replace(m["url"], ""), "no asset from elsewhere (no CDN)"
