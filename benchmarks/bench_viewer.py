"""Benchmark the viewer: Deep Zoom tiles against OpenSlide's DeepZoomGenerator, and a slide's first view.

Sections (``--sections``, comma-separated; all by default):

* ``tiles``: the same Deep Zoom tiles produced by the viewer (:class:`slide_clip.viewer.deepzoom.DeepZoomSlide`:
  the pipeline's reader, tifffile + imagecodecs for tiled JPEG TIFF/SVS levels) and by
  ``openslide.deepzoom.DeepZoomGenerator`` on an OpenSlide handle, each tile encoded as the
  viewer serves it (JPEG, quality 90), in one process, alternating A/B rounds, a fresh handle
  per round (cold caches, no encoded-tile cache). Tiles: a seeded sample of the four deepest
  Deep Zoom levels (what a user zooming in fetches). Also checks every sampled tile is
  pixel-identical between the two. Slides: a synthetic JPEG TIFF (``--large``), the real
  CMU-1-Small-Region SVS and its DICOM copy (``--svs``, ``--dicom``) where present.
* ``http``: the same comparison over HTTP: one uvicorn/Starlette app serving both
  ``/viewer/{level}/{col}_{row}.jpeg`` (the viewer's :class:`SlidePool` with its tile cache
  off) and ``/dzg/...`` (DeepZoomGenerator), fetched by 4 client threads; tiles/s.
* ``firstview``: ``slide-clip view`` on a folder holding one embedded slide (the README's demo
  slide, the tiny test architecture with random weights from a checkpoint file), a fresh
  server and a fresh headless Chromium each time; from clicking the slide in the cohort list
  to OpenSeadragon reporting the view fully loaded (``window.viewerTiming.fullyLoaded``, in the
  page), best and median of ``--repeats``.

Usage::

    .venv/bin/python benchmarks/bench_viewer.py --json /tmp/viewer.json

Timings depend on the machine and on what else runs on it: state both with the numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def synthetic(workdir: Path, size: str) -> Path:
    from slide_clip.synthetic import Region, Scene, write_slide

    w, h = (int(v) for v in size.split("x"))
    path = workdir / f"viewer-bench-{w}x{h}-jpeg.tif"
    if not path.is_file():
        scene = Scene(w, h, (Region("ellipse", (w * 0.05, h * 0.05, w * 0.95, h * 0.95), "tissue"),
                             Region("rect", (w * 0.55, h * 0.3, w * 0.8, h * 0.7), "dense")))
        tmp = path.with_suffix(".part.tif")
        write_slide(tmp, scene, 0.5, levels=4, compression="jpeg")
        tmp.replace(path)
    return path


def sample_tiles(dz, n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for level in range(dz.level_count - 4, dz.level_count):
        cols, rows = dz.level_tiles[level]
        out += [(level, c, r) for c in range(cols) for r in range(rows)]
    rng.shuffle(out)
    return out[:n]


def jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "jpeg", quality=90)
    return buf.getvalue()


def bench_tiles(slides: dict, n: int, rounds: int) -> dict:
    import numpy as np
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    from slide_clip.slide import resolve_slide_path
    from slide_clip.viewer.deepzoom import DeepZoomSlide

    results = {}
    for name, path in slides.items():
        file = str(resolve_slide_path(path))
        ref = DeepZoomGenerator(openslide.OpenSlide(file), 254, 1)
        tiles = sample_tiles(ref, n)
        ours = DeepZoomSlide(path)
        same = sum(np.array_equal(np.asarray(ours.tile(*t)), np.asarray(ref.get_tile(t[0], t[1:]))) for t in tiles)
        ours.close()
        times = {"viewer": [], "deepzoomgenerator": []}
        for _ in range(rounds):
            for who in ("deepzoomgenerator", "viewer"):
                if who == "viewer":
                    s = DeepZoomSlide(path)
                    t0 = time.perf_counter()
                    for t in tiles:
                        jpeg(s.tile(*t))
                    times[who].append(time.perf_counter() - t0)
                    s.close()
                else:
                    osr = openslide.OpenSlide(file)
                    dz = DeepZoomGenerator(osr, 254, 1)
                    t0 = time.perf_counter()
                    for t in tiles:
                        jpeg(dz.get_tile(t[0], t[1:]))
                    times[who].append(time.perf_counter() - t0)
                    osr.close()
        results[name] = {"tiles": len(tiles), "identical": int(same),
                         "reader": type(DeepZoomSlide(path).reader).__name__,
                         **{f"{k}_tiles_per_s": [round(len(tiles) / v, 1) for v in ts] for k, ts in times.items()}}
        print(name, json.dumps(results[name]), flush=True)
    return results


def bench_http(slides: dict, n: int, rounds: int, threads: int = 4) -> dict:
    import http.client

    import openslide
    import uvicorn
    from openslide.deepzoom import DeepZoomGenerator
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from slide_clip.slide import resolve_slide_path
    from slide_clip.viewer.deepzoom import SlidePool

    results = {}
    for name, path in slides.items():
        file = str(resolve_slide_path(path))
        state = {}

        def fresh():
            if "pool" in state:
                state["pool"].close()
                state["osr"].close()
            state["pool"] = SlidePool(cache_bytes=0)
            state["osr"] = openslide.OpenSlide(file)
            state["dz"] = DeepZoomGenerator(state["osr"], 254, 1)

        fresh()

        def viewer_tile(req):
            p = req.path_params
            return Response(state["pool"].jpeg(str(path), int(p["level"]), int(p["col"]), int(p["row"])),
                            media_type="image/jpeg")

        def dzg_tile(req):
            p = req.path_params
            return Response(jpeg(state["dz"].get_tile(int(p["level"]), (int(p["col"]), int(p["row"])))),
                            media_type="image/jpeg")

        app = Starlette(routes=[Route("/viewer/{level}/{col}_{row}.jpeg", viewer_tile),
                                Route("/dzg/{level}/{col}_{row}.jpeg", dzg_tile)])
        import socket

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        th = threading.Thread(target=server.run, daemon=True)
        th.start()
        while not server.started:
            time.sleep(0.05)
        tiles = sample_tiles(DeepZoomGenerator(openslide.OpenSlide(file), 254, 1), n)

        def fetch_all(prefix):
            chunks = [tiles[i::threads] for i in range(threads)]

            def worker(chunk):
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                for level, col, row in chunk:
                    c.request("GET", f"/{prefix}/{level}/{col}_{row}.jpeg")
                    r = c.getresponse()
                    assert r.status == 200
                    r.read()
                c.close()

            ts = [threading.Thread(target=worker, args=(ch,)) for ch in chunks]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            return time.perf_counter() - t0

        times = {"viewer": [], "dzg": []}
        for _ in range(rounds):
            for who in ("dzg", "viewer"):
                fresh()
                times[who].append(fetch_all(who))
        server.should_exit = True
        th.join(timeout=10)
        results[name] = {"tiles": len(tiles), "client_threads": threads,
                         **{f"{k}_tiles_per_s": [round(len(tiles) / v, 1) for v in ts] for k, ts in times.items()}}
        print("http", name, json.dumps(results[name]), flush=True)
    return results


def demo_cohort(workdir: Path) -> tuple[Path, Path]:
    """The README's demo slide embedded with the tiny test architecture (random weights from a checkpoint)."""
    out = workdir / "viewer-demo-out"
    reg = workdir / "viewer-tiny" / "models.yaml"
    if (out / "demo.zarr").is_dir() and reg.is_file():
        return out, reg
    import open_clip
    import torch

    from slide_clip.synthetic import demo_scene, write_slide

    arch = REPO / "tests" / "assets" / "slideclip-tiny-test.json"
    open_clip.add_model_config(arch)
    torch.manual_seed(0)
    reg.parent.mkdir(parents=True, exist_ok=True)
    torch.save(open_clip.create_model("slideclip-tiny-test", pretrained=None).state_dict(), reg.parent / "tiny.pt")
    reg.write_text(f"models:\n  tiny:\n    arch: slideclip-tiny-test\n    arch_config: {arch}\n"
                   f"    checkpoint: {reg.parent / 'tiny.pt'}\n    description: random weights (not a trained model)\n")
    slide = write_slide(workdir / "viewer-demo.tif", demo_scene(0.5), 0.5)
    cli = [sys.executable, "-m", "slide_clip.cli"]
    subprocess.run([*cli, "embed", str(slide), "--out", str(out), "--model", "tiny", "--models", str(reg)], check=True,
                   capture_output=True)
    subprocess.run([*cli, "zeroshot", str(out), "--prompts", "tumour"], check=True, capture_output=True)
    subprocess.run([*cli, "summarize", str(out)], check=True, capture_output=True)
    return out, reg


def bench_firstview(workdir: Path, repeats: int) -> dict:
    import re

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    out, reg = demo_cohort(workdir)
    loaded = []
    for _ in range(repeats):
        proc = subprocess.Popen([sys.executable, "-m", "slide_clip.cli", "view", str(out), "--port", "0", "--models",
                                 str(reg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        url = re.search(r"http://127\.0\.0\.1:\d+/", proc.stdout.readline()).group(0)
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for a in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,900", f"--user-data-dir={tempfile.mkdtemp()}"]:
            opts.add_argument(a)
        drv = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        try:
            drv.get(url)
            while not drv.execute_script("return window.viewerReady === true"):
                time.sleep(0.05)
            drv.execute_script("document.querySelector('#cohort-table tbody tr').click()")
            t0 = time.monotonic()
            while drv.execute_script("return window.viewerTiming.fullyLoaded") is None:
                if time.monotonic() - t0 > 60:
                    raise RuntimeError("the slide did not load in 60 s")
                time.sleep(0.02)
            timing = drv.execute_script("return window.viewerTiming")
            n = drv.execute_script("return performance.getEntriesByType('resource')"
                                   ".filter(e => e.name.includes('/api/slide/dz/')).length")
            loaded.append((timing["fullyLoaded"] / 1000, timing["open"] / 1000, n))
        finally:
            drv.quit()
            proc.terminate()
            proc.wait()
    full = [x[0] for x in loaded]
    r = {"seconds_to_fully_loaded": [round(v, 3) for v in full], "best": round(min(full), 3),
         "median": round(statistics.median(full), 3), "seconds_to_open": [round(x[1], 3) for x in loaded],
         "tiles_fetched": [x[2] for x in loaded]}
    print("firstview", json.dumps(r), flush=True)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="tiles,http,firstview")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "slide-clip-bench")
    ap.add_argument("--large", default="20000x15000", help="synthetic JPEG TIFF, level-0 px")
    ap.add_argument("--svs", type=Path, default=REPO.parent.parent / "shared" / "data" / "slides" /
                    "CMU-1-Small-Region.svs")
    ap.add_argument("--dicom", type=Path, default=REPO.parent.parent / "shared" / "data" / "slides" /
                    "CMU-1-Small-Region-dicom")
    ap.add_argument("--tiles", type=int, default=300, help="tiles sampled per slide")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5, help="first views measured")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    sections = set(a.sections.split(","))
    slides = {"synthetic-jpeg-" + a.large: synthetic(a.workdir, a.large)} if sections & {"tiles", "http"} else {}
    for name, p in (("cmu-svs", a.svs), ("cmu-dicom", a.dicom)):
        if p.exists():
            slides[name] = p
    result = {"machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()}}
    if "tiles" in sections:
        result["tiles"] = bench_tiles(slides, a.tiles, a.rounds)
    if "http" in sections:
        result["http"] = bench_http(slides, a.tiles, a.rounds)
    if "firstview" in sections:
        result["firstview"] = bench_firstview(a.workdir, a.repeats)
    result["machine"]["load_after"] = os.getloadavg()
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["machine"]))


if __name__ == "__main__":
    main()
