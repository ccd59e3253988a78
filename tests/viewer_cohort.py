"""A small real cohort for the viewer's tests, and a real server for it.

Synthetic slides whose textures fill whole grid cells (224 level-0 px at 0.5 µm/px), embedded
with the tiny checkpointed model, zero-shot scored (`tumour`), summarized and clustered: real
stores, real cohort tables. One slide can be given a hostile id (HTML and quotes) to test
escaping: its store folder, its recorded name and its status file are renamed.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from slide_clip.synthetic import Region, Scene, write_slide

T = 224  # tile extent in level-0 pixels (tile_size 224 at target 0.5 µm/px, slide at 0.5 µm/px)
#: A slide id a page must show as text: markup, both quotes and an ampersand (no '/': a file name).
HOSTILE = "<img src=x onerror=\"window.__xss=1\">'&amp;\"<b>"


def cells(c0, r0, c1, r1):
    return (c0 * T, r0 * T, c1 * T, r1 * T)


SCENES = {
    "slide_a": Scene(12 * T, 8 * T, (Region("rect", cells(1, 1, 6, 7), "tissue"),
                                     Region("rect", cells(7, 2, 11, 7), "dense")), seed=1),
    "slide_b": Scene(12 * T, 8 * T, (Region("rect", cells(1, 1, 5, 6), "dense"),
                                     Region("rect", cells(6, 1, 11, 7), "tissue")), seed=2),
    "hostile": Scene(6 * T, 4 * T, (Region("rect", cells(1, 1, 5, 3), "dense"),), seed=3),
}


def texture_at(scene: Scene, x: float, y: float) -> str:
    hit = [r.texture for r in scene.regions if r.contains(np.array([x]), np.array([y]))[0]]
    return hit[0] if hit else "glass"


def rename_slide(out: Path, old: str, new: str) -> None:
    """Give a slide's store and status another slide id (as a store made elsewhere could carry)."""
    import zarr

    src, dst = out / f"{old}.zarr", out / f"{new}.zarr"
    src.rename(dst)
    g = zarr.open_group(str(dst), mode="r+")
    slide = dict(g.attrs["slide"])
    slide["name"] = new
    g.attrs.update({"slide": slide})
    st = json.loads((out / "status" / f"{old}.json").read_text())
    st.update(name=new, store=str(dst))
    (out / "status" / f"{new}.json").write_text(json.dumps(st))
    (out / "status" / f"{old}.json").unlink()


def build_cohort(base: Path, registry: Path, names=("slide_a", "slide_b"), hostile: bool = False,
                 clusters: int | None = None):
    """Embed, score (`tumour`), summarize (and optionally cluster) synthetic slides; returns (out, cfg)."""
    from slide_clip.config import load_config
    from slide_clip.pipeline import embed_slides
    from slide_clip.prompts import load_prompts
    from slide_clip.scoring import summarize_all, zeroshot

    cfg = load_config().with_overrides(encode={"model": "tiny", "registries": (str(registry),),
                                               "batch_size": 32, "num_workers": 0, "device": "cpu"})
    out = base / "out"
    slides = [write_slide(base / "slides" / f"{name}.tif", SCENES[name], 0.5)
              for name in (*names, *(["hostile"] if hostile else []))]
    results = embed_slides(slides, out, cfg, progress=False)  # one model load, status files written
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    if hostile:
        rename_slide(out, "hostile", HOSTILE)
    zeroshot(sorted(out.glob("*.zarr")), load_prompts("tumour"), cfg)
    summarize_all(out)
    if clusters:
        from slide_clip.explore.clusters import cluster

        cluster([out], k=clusters, maps=False, gallery=False)
    return out, cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """The viewer's app under a real uvicorn, in a thread of this process, on a free loopback port."""

    def __init__(self, out: Path, cfg, **kw):
        import uvicorn

        from slide_clip.viewer.app import create_app

        self.app = create_app(out, cfg, **kw)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the viewer's server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class CliServer:
    """`slide-clip view OUT --port 0` as a process; its address read from what it prints.
    ``before``: options before the command (``--storage-options``)."""

    def __init__(self, out: Path, *args: str, env=None, before=()):
        self.proc = subprocess.Popen([sys.executable, "-m", "slide_clip.cli", *before, "view", str(out), "--port", "0",
                                      *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.line = self.proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+)/", self.line)
        if not m:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            self.stop()
            raise RuntimeError(f"slide-clip view printed {self.line!r} {err}")
        self.url = m.group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``out``: (size, mtime ns)."""
    found = {}
    for root, _, files in os.walk(out):
        for f in files:
            p = Path(root) / f
            st = p.stat()
            found[str(p.relative_to(out))] = (st.st_size, st.st_mtime_ns)
    return found
