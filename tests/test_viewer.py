"""The viewer in a real headless browser: Debian's chromium through chromium-driver (Selenium), against
`slide-clip view OUT` started as a process on a free loopback port.

One server and one browser session for the module; the tests run in order, as a user would:
open the cohort, sort it, open a slide, zoom, toggle heatmaps, search by text and open a hit,
label three tiles, re-score and see the new overlay. Assertions are on the page's state and
on screenshot pixels (the overlay colour under a known tile), with expected values from zarr,
numpy and matplotlib, never from the viewer. A missing browser fails with one line.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time

import numpy as np
import pandas as pd
import pytest

from viewer_cohort import HOSTILE, SCENES, T, CliServer, build_cohort, snapshot, texture_at

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = "the viewer's browser tests need Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,900", "--force-device-scale-factor=1", "--hide-scrollbars"]


@pytest.fixture(scope="module", autouse=True)
def browser_bins():
    """Debian's chromium and chromium-driver, checked before anything is built: missing, one line."""
    chromium = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    driver = shutil.which("chromedriver") or (DRIVER if os.path.exists(DRIVER) else None)
    if not chromium or not driver:
        pytest.fail(INSTALL, pytrace=False)
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("the viewer's browser tests need selenium: pip install -e '.[dev]'", pytrace=False)
    return chromium, driver


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, tiny_registry):
    out, cfg = build_cohort(tmp_path_factory.mktemp("viewer_ui"), tiny_registry, hostile=True, clusters=3)
    return out, cfg


@pytest.fixture(scope="module")
def server(cohort):
    out, _ = cohort
    srv = CliServer(out)  # the text side is rebuilt from what the stores recorded (checkpoint file)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(server, browser_bins):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_bin = browser_bins
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="slide-clip-chromium-")
    for a in FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(driver_bin), options=opts)
    drv.set_script_timeout(60)
    try:
        drv.get(server.url + "/")
        wait(drv, "window.viewerReady === true")
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(drv, condition: str, timeout: float = 60.0):
    """Wait until the JS expression is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        v = drv.execute_script(f"return ({condition});")
        if v:
            return v
        status = drv.execute_script("return document.getElementById('status').textContent")
        if time.monotonic() > deadline or status.startswith("error"):
            raise AssertionError(f"timed out waiting for {condition} (page status: {status!r})")
        time.sleep(0.1)


def store(out, slide_id):
    import zarr

    return zarr.open_group(str(out / f"{slide_id}.zarr"), mode="r")


def open_slide(drv, slide_id):
    drv.execute_script("""
        const row = Array.from(document.querySelectorAll('#cohort-table tbody tr'))
            .find(r => r.dataset.slide === arguments[0]);
        row.click();""", slide_id)
    wait(drv, f"window.viewerTiming.slide === {slide_id!r} && window.viewerTiming.fullyLoaded !== null")


def screen_xy(drv, x, y):
    """Page (screenshot) pixel of level-0 point (x, y) of the open slide, via OpenSeadragon's own transform."""
    return drv.execute_script("""
        const p = viewer.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(arguments[0], arguments[1]));
        const r = document.getElementById('viewer').getBoundingClientRect();
        return [Math.round(r.left + p.x), Math.round(r.top + p.y)];""", x, y)


def pixel(drv, xy, half: int = 5):
    """Mean colour of the screenshot's (2 half + 1)² pixels around ``xy`` (the slide's texture is finer than a
    pixel at this zoom, so a single slide pixel depends on sub-pixel placement; an overlay cell is flat)."""
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(drv.get_screenshot_as_png())).convert("RGB")).astype(float)
    return img[xy[1] - half:xy[1] + half + 1, xy[0] - half:xy[0] + half + 1].reshape(-1, 3).mean(0)


def settle(drv):
    """Wait until OpenSeadragon has finished animating (0.6 s) and loading, and the overlay is redrawn."""
    time.sleep(0.8)
    wait(drv, "viewer.world.getItemAt(0).getFullyLoaded()")
    drv.execute_script("window.redrawMarks();")
    time.sleep(0.2)


def select_overlay(drv, set_name, cls=None):
    drv.execute_script("""
        const sel = document.getElementById('overlay-select');
        const opt = Array.from(sel.options).find(o => o.value && JSON.parse(o.value).set === arguments[0]
                                                   && (arguments[1] === null || JSON.parse(o.value).cls === arguments[1]));
        sel.value = opt.value; sel.dispatchEvent(new Event('change'));""", set_name, cls)
    wait(drv, f"window.viewerState.overlay && window.viewerState.overlay.set === {set_name!r}")


def set_opacity(drv, v):
    drv.execute_script("const o = document.getElementById('opacity'); o.value = arguments[0];"
                       "o.dispatchEvent(new Event('input'));", v)


def viridis(p):
    from matplotlib import colormaps

    return (np.asarray(colormaps["viridis"](float(p))[:3]) * 255).round().astype(int)


# ----------------------------------------------------------------------------- the tests, in order
def test_view_prints_its_loopback_address(server):
    assert server.line.startswith("slide-clip viewer of ") and "http://127.0.0.1:" in server.line


def test_cohort_lists_every_slide_and_sorts_by_score(browser, cohort):
    out, _ = cohort
    table = pd.read_csv(out / "cohort-tumour-tiny.csv")
    ids = browser.execute_script(
        "return Array.from(document.querySelectorAll('#cohort-table tbody tr')).map(r => r.dataset.slide)")
    assert sorted(ids) == sorted(table["slide_id"])
    header = browser.execute_script("""
        const th = Array.from(document.querySelectorAll('#cohort-table th')).find(t => t.dataset.col === 'slide_prob:tumour');
        th.click(); return th.textContent;""")
    assert header == "P(tumour)"
    shown = browser.execute_script(
        "return Array.from(document.querySelectorAll('#cohort-table tbody tr')).map(r => r.dataset.slide)")
    assert shown == list(table.sort_values("slide_prob__tumour", ascending=False)["slide_id"])
    predicted = browser.execute_script("""
        return Object.fromEntries(Array.from(document.querySelectorAll('#cohort-table tbody tr'))
            .map(r => [r.dataset.slide, r.children[3].textContent]));""")
    assert predicted == dict(zip(table["slide_id"], table["predicted"]))


def test_slide_ids_are_shown_as_text_never_as_markup(browser):
    assert browser.execute_script("return window.__xss") is None
    assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"], b').length") == 0
    cells = browser.execute_script(
        "return Array.from(document.querySelectorAll('#cohort-table tbody tr td:first-child')).map(c => c.textContent)")
    assert HOSTILE in cells
    open_slide(browser, HOSTILE)
    assert browser.execute_script("return document.getElementById('slide-title').textContent") == HOSTILE
    assert browser.execute_script("return window.__xss") is None


def test_open_a_slide_and_zoom(browser):
    open_slide(browser, "slide_a")
    assert browser.execute_script("return document.getElementById('slide-title').textContent") == "slide_a"
    timing = browser.execute_script("return window.viewerTiming")
    assert timing["fullyLoaded"] > 0

    deepest = """Math.max(...performance.getEntriesByType('resource').map(e => e.name)
        .filter(n => n.includes('/api/slide/dz/') && n.includes('slide=slide_a'))
        .map(n => parseInt(n.split('/api/slide/dz/')[1])))"""

    zoom0, level0 = browser.execute_script(f"return [viewer.viewport.getZoom(), {deepest}]")
    browser.find_element("css selector", "div[title='Zoom in']").click()
    try:
        wait(browser, f"viewer.viewport.getZoom() > {zoom0} * 1.5")
        # sharper Deep Zoom tiles are fetched for the closer view (during the zoom's animation: the
        # old level stays "fully loaded" until the animation needs the next one)
        wait(browser, f"{deepest} > {level0}", timeout=30)
        wait(browser, "viewer.world.getItemAt(0).getFullyLoaded()")
        assert browser.execute_script(f"return {deepest}") == level0 + 1
    finally:  # the next tests start from the whole slide in view
        browser.execute_script("viewer.viewport.goHome(true);")
        settle(browser)


def test_heatmap_toggles_and_draws_the_tile_probability(browser, cohort):
    out, _ = cohort
    g = store(out, "slide_a")
    coords, probs = g["tiles/coords"][:], g["scores/tiny/tumour/probs"][:]
    r = int(np.argmax(probs[:, 0]))
    centre = screen_xy(browser, coords[r, 0] + T / 2, coords[r, 1] + T / 2)
    select_overlay(browser, "tumour", "tumour")
    set_opacity(browser, 1)
    settle(browser)
    assert browser.execute_script("return document.getElementById('colorbar-box').hidden") is False
    assert np.abs(pixel(browser, centre) - viridis(probs[r, 0])).max() <= 3
    select_overlay(browser, "tumour", "non-tumour")
    settle(browser)
    assert np.abs(pixel(browser, centre) - viridis(probs[r, 1])).max() <= 3
    set_opacity(browser, 0)
    settle(browser)
    bare = pixel(browser, centre)
    assert np.abs(bare - viridis(probs[r, 1])).max() > 20   # the slide's own pixel shows through
    set_opacity(browser, 0.5)
    settle(browser)
    assert np.abs(pixel(browser, centre) - (bare + viridis(probs[r, 1])) / 2).max() <= 10  # the slider blends
    browser.execute_script("const s = document.getElementById('overlay-select'); s.value = '';"
                           "s.dispatchEvent(new Event('change'));")
    wait(browser, "window.viewerState.overlay === null")
    settle(browser)
    off = pixel(browser, centre)   # overlay off: the slide again (redrawn: sub-pixel texture, not bit-equal)
    assert np.abs(off - bare).max() <= 15 and np.abs(off - viridis(probs[r, 1])).max() > 40


def test_cluster_overlay_in_the_cluster_map_colours(browser, cohort):
    from slide_clip.pictures import category_colours

    out, _ = cohort
    g = store(out, "slide_a")
    coords, onehot = g["tiles/coords"][:], g["scores/tiny/clusters-k3/probs"][:]
    table = category_colours(3).astype(int)  # the one table: the cluster maps' and the map legends' colours
    select_overlay(browser, "clusters-k3")
    set_opacity(browser, 1)
    settle(browser)
    legend = browser.execute_script(
        "return Array.from(document.querySelectorAll('#legend span:not(.swatch)')).map(s => s.textContent)")
    assert legend == ["cluster_0", "cluster_1", "cluster_2"]
    shot = None
    for r in (0, len(coords) // 2, len(coords) - 1):
        xy = screen_xy(browser, coords[r, 0] + T / 2, coords[r, 1] + T / 2)
        if shot is None:
            from PIL import Image

            shot = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")).astype(int)
        assert np.abs(shot[xy[1], xy[0]] - table[int(np.argmax(onehot[r]))]).max() <= 3


def test_tile_grid_and_tile_details(browser, cohort):
    out, _ = cohort
    g = store(out, "slide_a")
    coords = g["tiles/coords"][:]
    browser.find_element("id", "grid-toggle").click()
    wait(browser, "window.viewerState.tiles !== null")
    assert browser.execute_script("return window.viewerState.tiles.length") == len(coords)
    r = 7
    xy = screen_xy(browser, coords[r, 0] + T / 2, coords[r, 1] + T / 2)
    click_at(browser, xy)
    wait(browser, f"window.viewerState.selected && window.viewerState.selected.row === {r}")
    info = browser.find_element("id", "tile-info").text
    assert f"x {coords[r, 0] * 0.5:.1f}, y {coords[r, 1] * 0.5:.1f} (112.0 × 112.0 µm)" in info
    wait(browser, "document.querySelectorAll('#neighbours li').length === 6")


def click_at(drv, xy):
    """A real mouse click at page pixel ``xy``."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    actions = ActionBuilder(drv)
    actions.pointer_action.move_to_location(int(xy[0]), int(xy[1])).click()
    actions.perform()


def test_text_search_lists_the_explore_hits_and_opens_one(browser, cohort):
    from slide_clip.explore.retrieval import search

    out, cfg = cohort
    box = browser.find_element("id", "search-text")
    box.clear()
    box.send_keys("tumour")
    browser.find_element("id", "search-button").click()
    wait(browser, "document.querySelectorAll('#hits li').length === 20")
    shown = browser.execute_script("return Array.from(document.querySelectorAll('#hits li')).map(l => l.textContent)")
    want = search([out], cfg, texts=["tumour"], top=20, name="check", gallery=False)["table"]
    shutil.rmtree(out / "explore", ignore_errors=True)
    assert shown == [f"{s} ({x}, {y})  {v:.3f}" for s, x, y, v in zip(want.slide_id, want.x, want.y, want.score)]
    hit = next(h for h in want.itertuples() if h.slide_id == "slide_b")
    browser.execute_script("""
        const b = Array.from(document.querySelectorAll('#hits li button'))
            .find(x => x.textContent.startsWith(arguments[0]));
        b.click();""", f"slide_b ({hit.x}, {hit.y})")
    wait(browser, f"window.viewerState.selected && window.viewerState.selected.slide_id === 'slide_b'"
                  f" && window.viewerState.selected.row === {hit.tile}")
    assert browser.execute_script("return document.getElementById('slide-title').textContent") == "slide_b"
    cx, cy = browser.execute_script("const c = viewer.viewport.viewportToImageCoordinates(viewer.viewport.getCenter(true));"
                                    "return [c.x, c.y];")
    assert hit.x <= cx <= hit.x + T and hit.y <= cy <= hit.y + T   # the slide opened at the tile


def test_label_three_tiles_rescore_and_see_the_new_overlay(browser, cohort):
    import csv

    out, _ = cohort
    before = snapshot(out)
    open_slide(browser, "slide_a")
    g = store(out, "slide_a")
    coords, feats = g["tiles/coords"][:], g["embeddings/tiny/features"][:]
    tex = [texture_at(SCENES["slide_a"], x + T / 2, y + T / 2) for x, y in coords]
    pick = [tex.index("dense"), len(tex) - 1 - tex[::-1].index("dense"), tex.index("tissue")]
    browser.find_element("id", "label-mode").click()
    for i in pick:
        name = browser.find_element("id", "label-name")
        name.clear()
        name.send_keys(tex[i])
        n = browser.execute_script("return window.viewerState.labels.length")
        click_at(browser, screen_xy(browser, coords[i, 0] + T / 2, coords[i, 1] + T / 2))
        wait(browser, f"window.viewerState.labels.length === {n + 1}")
    with open(out / "labels" / "labels.csv", newline="") as f:
        rows = [(r["slide_id"], int(r["x"]), int(r["y"]), r["label"]) for r in csv.DictReader(f)]
    assert rows == [("slide_a", int(coords[i, 0]), int(coords[i, 1]), tex[i]) for i in pick]

    browser.find_element("id", "rescore").click()
    wait(browser, "window.viewerTiming.rescored === 'fewshot-labels'", timeout=120)
    wait(browser, "window.viewerState.overlay && window.viewerState.overlay.set === 'fewshot-labels'")
    assert browser.execute_script("return window.viewerState.overlay.cls") == "dense"
    # the new scores, computed here from the stored embeddings: prototypes, logit scale, softmax
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    protos = np.stack([f[[i for i in pick if tex[i] == c]].mean(0) for c in ("dense", "tissue")])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    z = g["embeddings/tiny"].attrs["logit_scale"] * f @ protos.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.allclose(store(out, "slide_a")["scores/tiny/fewshot-labels/probs"][:], p, atol=1e-5)
    browser.find_element("id", "label-mode").click()
    set_opacity(browser, 1)
    settle(browser)
    r = tex.index("tissue") + 1   # a tile nobody labelled
    xy = screen_xy(browser, coords[r, 0] + T / 2, coords[r, 1] + T / 2)
    assert np.abs(pixel(browser, xy) - viridis(p[r, 0])).max() <= 3
    # the cohort list gained the new set's table
    assert browser.execute_script(
        "return Array.from(document.querySelectorAll('#table-select option')).some(o => o.value === 'tiny/fewshot-labels')")
    changed = {q for q, v in snapshot(out).items() if before.get(q) != v}
    allowed = ("labels/labels.csv", "summaries/tiny/fewshot-labels/", "cohort-fewshot-labels-tiny.")
    for q in changed:   # only the label set and the score set the user asked for
        assert q.startswith(allowed) or "/scores/tiny/fewshot-labels/" in q or q.endswith(".zarr.lock"), q
