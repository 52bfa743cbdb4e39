"""The web console in a real browser (headless Chromium from Debian, driven by Selenium) against a
running local mesh: search by uploading a grocery val photo, see the query box and the results with
their boxes, search again by clicking a result, and watch an ingestion job finish with its failure;
in the catalog browser, add dropped photos and a CSV of paths, page through a catalog, delete an
item, and see why a key without those actions is refused.

VISEARCH_SCREENSHOTS=DIR keeps the screenshots (docs/img/console-*.png are made so)."""

from __future__ import annotations

import json
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
    # Beside the admin key `up` makes: a key that may read and search every catalog, nothing more.
    from visearch.auth import KeyStore, hash_key, new_key

    keys_file, _ = mesh.ensure_credentials(data)
    viewer = new_key()
    KeyStore.write(keys_file, [*json.loads(keys_file.read_text())["keys"],
                               {"id": "viewer", "sha256": hash_key(viewer), "catalogs": ["*"],
                                "actions": ["read", "search"]}])
    # The grocery photos may be ingested by path (the catalog page's CSV).
    cli(env, "up", "--ingest-root", str(grocery["root"]))
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
        yield {"env": env, "url": url, "key": key, "client": client, "products": set(chosen), "data": data,
               "viewer": viewer}
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


def open_page(driver, url: str) -> None:
    driver.get("about:blank")  # a new document, so the key in the fragment is read again
    driver.get(url)


def items_shown(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    return [c.get_attribute("data-item-id") for c in driver.find_elements(By.CSS_SELECTOR, "#items .item")]


def page_shown(driver, catalog: str, page: int) -> bool:
    from selenium.webdriver.common.by import By

    grid = driver.find_element(By.ID, "items")
    return grid.get_attribute("data-catalog") == catalog and grid.get_attribute("data-page") == str(page)


def thumbnails_loaded(driver) -> bool:
    from selenium.webdriver.common.by import By

    imgs = driver.find_elements(By.CSS_SELECTOR, "#items .item img")
    return bool(imgs) and all(i.get_attribute("naturalWidth") not in (None, "0") for i in imgs)


def drop_files(driver, target: str, paths) -> None:
    """Drop files on an element as a user's drag and drop does: a drop event whose DataTransfer holds
    them (the files are read from disk through a file input the test adds, the only way a page gets
    a file's bytes)."""
    from selenium.webdriver.common.by import By

    driver.execute_script("const i = document.createElement('input'); i.type = 'file'; i.multiple = true; "
                          "i.id = 'test-files'; document.body.append(i);")
    driver.find_element(By.ID, "test-files").send_keys("\n".join(str(p) for p in paths))
    driver.execute_script("""
        const input = document.getElementById('test-files');
        const dt = new DataTransfer();
        for (const f of input.files) dt.items.add(f);
        input.remove();
        document.querySelector(arguments[0]).dispatchEvent(
            new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));""", target)


def confirm_dialog(driver) -> str:
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    alert = WebDriverWait(driver, 10).until(expected_conditions.alert_is_present())
    text = alert.text
    alert.accept()
    return text


def job_followed(driver, after: str = "") -> str | None:
    """The id of the job the ingest panel shows once it is done (and not the one `after`)."""
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "ingest-progress")
    job_id = box.get_attribute("data-job-id")
    return job_id if box.get_attribute("data-state") == "done" and job_id and job_id != after else None


def test_catalog_page_adds_dropped_photos_and_a_csv_of_paths(console_mesh, browser, grocery, tmp_path):
    from selenium.webdriver.common.by import By

    m = console_mesh
    others = [p for p in grocery["train"] if p.is_product and p.fine_id not in m["products"]]
    photos, listed = others[:3], others[-4:]
    open_page(browser, f"{m['url']}/catalog#key={m['key']}")
    wait_for(browser, lambda d: d.find_element(By.ID, "items").get_attribute("data-page") == "1", what="a first page")
    for field, value in (("ingest-catalog", "dropped"), ("ingest-prefix", "d-")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)

    # Three photos dropped: one job, followed to its end, and the new catalog's items shown.
    drop_files(browser, "#ingest-drop", [p.path for p in photos])
    job_id = wait_for(browser, job_followed, 180, "the dropped photos' job to finish")
    job = m["client"].job(job_id)
    assert (job.catalog, job.submitted, job.done, job.failed) == ("dropped", 3, 3, 0), job
    text = browser.find_element(By.ID, "ingest-progress").text
    assert "3/3" in text and "3 done, 0 failed" in text, text
    dropped = sorted(f"d-{p.path.stem}" for p in photos)
    wait_for(browser, lambda d: page_shown(d, "dropped", 1) and items_shown(d) == dropped, 30, "the dropped items")
    wait_for(browser, thumbnails_loaded, 30, "their thumbnails")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#items .item rect.object")) >= 3, "each with its object's box"
    assert [i.item_id for i in m["client"].items("dropped")] == dropped

    # A CSV of paths with metadata: the gateway reads them inside its ingest roots.
    manifest = tmp_path / "listed.csv"
    manifest.write_text("item_id,path,brand\n" + "".join(f"c-{p.path.stem},{p.path.resolve()},{p.fine_name}\n"
                                                         for p in listed))
    browser.find_element(By.ID, "ingest-csv").send_keys(str(manifest))
    job_id = wait_for(browser, lambda d: job_followed(d, job_id), 180, "the CSV's job to finish")
    assert m["client"].job(job_id).done == 4
    every = sorted(dropped + [f"c-{p.path.stem}" for p in listed])
    wait_for(browser, lambda d: items_shown(d) == every, 30, "the CSV's items beside the dropped ones")
    card = browser.find_element(By.CSS_SELECTOR, f"#items .item[data-item-id='c-{listed[0].path.stem}']")
    assert f"brand: {listed[0].fine_name}" in card.text, card.text
    assert "Added 4 items to dropped." in browser.find_element(By.ID, "status").text

    # A path the gateway may not read: nothing is queued, and the page says why.
    outside = tmp_path / "outside.csv"
    outside.write_text(f"item_id,path\nx,{m['data'] / 'console.log'}\n")
    browser.find_element(By.ID, "ingest-csv").send_keys(str(outside))
    wait_for(browser, lambda d: "outside the gateway's ingest roots" in d.find_element(By.ID, "status").text, 30,
             "the refusal's reason")
    assert "INVALID_ARGUMENT" in browser.find_element(By.ID, "status").text
    assert [i.item_id for i in m["client"].items("dropped")] == every


def test_catalog_page_pages_through_every_item_exactly_once(console_mesh, browser):
    """96 items, 12 a page: 8 full pages, Next off on the last (no empty ninth), every item once and
    in id order, the same as the SDK's (sync and async) with other page sizes; Previous goes back."""
    import asyncio

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from visearch import mesh
    from visearch.client import AsyncClient

    m = console_mesh
    open_page(browser, f"{m['url']}/catalog?catalog=shop#key={m['key']}")
    wait_for(browser, lambda d: page_shown(d, "shop", 1) and len(items_shown(d)) == 24, what="the first page of 24")
    Select(browser.find_element(By.ID, "page-size")).select_by_value("12")
    wait_for(browser, lambda d: len(items_shown(d)) == 12, what="a page of 12")
    pages = [items_shown(browser)]
    while browser.find_element(By.ID, "next-page").is_enabled():
        browser.find_element(By.ID, "next-page").click()
        wait_for(browser, lambda d: page_shown(d, "shop", len(pages) + 1), what=f"page {len(pages) + 1}")
        pages.append(items_shown(browser))
    seen = [i for p in pages for i in p]
    assert [len(p) for p in pages] == [12] * 8, [len(p) for p in pages]
    assert len(set(seen)) == len(seen) == 96 and seen == sorted(seen)
    assert seen == [i.item_id for i in m["client"].items("shop", page_size=7)]
    assert "page 8: items 85–96" in browser.find_element(By.ID, "page-info").text
    assert not browser.find_element(By.ID, "next-page").is_enabled()

    async def every_item():
        async with AsyncClient(mesh.load_state(m["data"])["gateway"], api_key=m["key"]) as avs:
            return [i.item_id async for i in avs.items("shop", page_size=50)]

    assert asyncio.run(every_item()) == seen
    browser.find_element(By.ID, "prev-page").click()
    wait_for(browser, lambda d: page_shown(d, "shop", 7) and items_shown(d) == pages[6], what="page 7 again")
    wait_for(browser, thumbnails_loaded, 30, "the page's thumbnails")
    shot(browser, "console-catalog.png")


def test_catalog_page_deletes_an_item(console_mesh, browser, grocery):
    import grpc
    from selenium.webdriver.common.by import By

    from visearch.gateway.v1 import gateway_pb2

    m = console_mesh
    photos = [p for p in grocery["train"] if p.is_product][100:103]
    ids = ["keep-1", "gone-é 'x'", "keep-2"]  # an id the page must quote right
    items = [gateway_pb2.IngestItem(item_id=i, image=p.path.read_bytes()) for i, p in zip(ids, photos, strict=True)]
    job = m["client"].ingest(items, catalog="doomed")
    assert m["client"].wait(job.job_id, timeout=180).done == 3
    open_page(browser, f"{m['url']}/catalog?catalog=doomed#key={m['key']}")
    wait_for(browser, lambda d: page_shown(d, "doomed", 1) and len(items_shown(d)) == 3, what="the three items")
    card = next(c for c in browser.find_elements(By.CSS_SELECTOR, "#items .item")
                if c.get_attribute("data-item-id") == ids[1])
    card.find_element(By.CSS_SELECTOR, "button.delete").click()
    assert ids[1] in confirm_dialog(browser), "the page asks first, naming the item"
    wait_for(browser, lambda d: items_shown(d) == sorted([ids[0], ids[2]]), 30, "the item gone from the page")
    assert f"Deleted {ids[1]}." in browser.find_element(By.ID, "status").text
    with pytest.raises(grpc.RpcError) as err:
        m["client"].get(ids[1], catalog="doomed")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert m["client"].get(ids[0], catalog="doomed").item_id == ids[0]


def test_catalog_page_shows_why_a_key_may_not_ingest_or_delete(console_mesh, browser, grocery):
    """A key that may read and search: it browses, but adding and deleting are refused with the
    gateway's reason on the page, and nothing changes."""
    from selenium.webdriver.common.by import By

    m = console_mesh
    before = [i.item_id for i in m["client"].items("shop")]
    open_page(browser, f"{m['url']}/catalog?catalog=shop#key={m['viewer']}")
    wait_for(browser, lambda d: page_shown(d, "shop", 1) and len(items_shown(d)) == 24, what="the first page")
    drop_files(browser, "#ingest-drop", [grocery["val"][0].path])
    wait_for(browser, lambda d: "PERMISSION_DENIED" in d.find_element(By.ID, "status").text, 30, "the refusal")
    assert "key 'viewer' may not ingest on catalog 'shop'" in browser.find_element(By.ID, "status").text
    assert not browser.find_element(By.ID, "ingest-progress").is_displayed(), "no job was started"
    first = items_shown(browser)[0]
    browser.find_element(By.CSS_SELECTOR, "#items .item button.delete").click()
    confirm_dialog(browser)
    wait_for(browser, lambda d: "may not delete" in d.find_element(By.ID, "status").text, 30, "the refusal")
    assert "Not deleted: PERMISSION_DENIED: key 'viewer' may not delete on catalog 'shop'" in \
        browser.find_element(By.ID, "status").text
    assert items_shown(browser)[0] == first
    assert [i.item_id for i in m["client"].items("shop")] == before


def test_catalog_api_says_what_is_wrong_with_a_request(console_mesh):
    """The JSON API behind the page: a bad token, page size, body or item id is a 400 with the reason."""
    import urllib.error

    m = console_mesh

    def call(path: str, body: bytes | None = None, ctype: str = "application/octet-stream"):
        req = urllib.request.Request(m["url"] + path, data=body, method="POST" if body is not None else "GET",
                                     headers={"Authorization": f"Bearer {m['key']}", "Content-Type": ctype})
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                return res.status, json.loads(res.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())["error"]

    status, page = call("/api/items?catalog=shop&page_size=5")
    assert status == 200 and len(page["items"]) == 5 and page["next_page_token"] and page["total_items"] >= 96
    assert page["items"][0]["objects"][0]["box"] and page["items"][0]["model_version"]
    status, nxt = call(f"/api/items?catalog=shop&page_size=5&page_token={page['next_page_token']}")
    assert nxt["items"][0]["item_id"] > page["items"][-1]["item_id"]
    for path, body, ctype, code, words in [
        ("/api/items?catalog=shop&page_token=garbage", None, "", 400, "page_token"),
        ("/api/items?catalog=shop&page_size=501", None, "", 400, "page size 501"),
        ("/api/items?catalog=no_such_catalog", None, "", 404, "does not exist"),
        ("/api/ingest?catalog=shop", b"\xff\xd8", "image/jpeg", 400, "no item id"),
        ("/api/ingest?catalog=shop&item_id=a%23b", b"\xff\xd8", "image/jpeg", 400, "no '#'"),
        ("/api/ingest?catalog=shop", b"path,item\n", "text/csv", 400, "item_id and path"),
        ("/api/delete?catalog=shop", b'{"ids": ["a"]}', "application/json", 400, "item_ids"),
        ("/api/delete?catalog=shop", b'{"item_ids": []}', "application/json", 400, "item_ids"),
    ]:
        status, error = call(path, body, ctype)
        assert status == code and words in error["message"], (path, status, error)
