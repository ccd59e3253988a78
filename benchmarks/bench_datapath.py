"""Benchmark the data path: decode limit, end-to-end tiles/s, a cohort of small slides, the
compute regime, peak memory and the fixed cost of a command (CPU; ``--device cuda`` on a GPU).

Sections (``--sections``, comma-separated; all by default on a CPU):

* ``decode``: the decode limit. The large slide's tiles read with
  :func:`slide_clip.reading.read_tiles` (strips) through the loader's handle
  (``open_for_reading``: tifffile for these JPEG TIFFs) and turned into uint8 tensors, as fast as
  possible, by 1 and by 2 processes (each reads its share of batches of 64; nothing is sent
  back). Also one process with ``read_tile`` tile by tile (the old path), for scale.
* ``e2e``: ``slide-clip embed LARGE --model tiny --workers W`` (the tiny open_clip test
  architecture, weights from a checkpoint file: the cheapest encoder there is), tiles/s from
  process start to exit (``wall``) and over the encode loop (``loop``, from the store's
  file times); ratio to the 2-process decode limit (target >= 0.8). Also the tiny model's
  own CPU time per tile (uint8 batches in memory, normalised and encoded, one thread) and the
  ceiling it leaves two cores, ``2 / (decode s + encode s)`` tiles/s.
* ``cohort``: the same command over a folder of ``--cohort`` small slides with the same
  total number of tiles; tiles/s (wall) vs the large slide's (target within 0.8).
* ``flow``: the same cohort through ``slide-clip run`` (the Prefect cohort flow, a temporary
  server, ``--concurrency 3 --no-heatmaps``, the tiny model scored with the ``tumour``
  prompts), tiles/s (wall includes the server's start) and in the encode loop.
* ``compute``: ``random:ViT-B-32`` fp32 end to end vs the bare encoder on the same tiles
  (``benchmarks/bench_embed.py``'s method; target >= 0.95).
* ``startup``: process start -> first encoded batch (``slide-clip embed`` of the
  40,000 x 30,000 slide with the tiny model), best of ``--repeats``; and the time a bare
  interpreter takes to ``import torch`` and ``import open_clip`` (the floor under it).
* ``refused`` (only when named): a slide refused at its checks (2 µm/px, coarser than the
  0.5 µm/px target), ``slide-clip embed --model random:ViT-B-32``: seconds from process start
  to exit; and a good small slide's first encoded batch with the same model (the start-up
  overlap of the model build with tissue detection), each of ``--repeats`` runs.
* Peak RSS of the command's process tree for ``e2e`` and ``cohort`` (``/proc`` polling).
* ``codec`` (only when named): OpenSlide ``read_region`` strips vs tifffile + imagecodecs
  decoding the same JPEG tiles (:mod:`slide_clip.jpeg_tiff`), both cut by ``read_tiles``: tiles/s by
  1 and 2 processes and how many tiles are bit-identical, on the large slide and any
  ``--codec-slides`` (e.g. the real SVS).
* ``--device cuda``: ``gpu`` only: ``ViT-B-16`` bf16 end to end vs encoder only, GPU
  utilisation sampled with ``nvidia-smi`` every 200 ms during the end-to-end run.

Slides are synthetic pyramidal TIFFs with JPEG tiles (``slide_clip.synthetic``, needs
``imagecodecs``), written once under ``--workdir`` and reused.

    .venv/bin/python benchmarks/bench_datapath.py --json /tmp/dp.json     # ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_datapath.py --device cuda --sections gpu --tissue-tiles 60x60

To measure another version of the code (before/after), run from a folder that is not the
checkout with ``PYTHONPATH=/path/to/old/tree``: the commands it starts then import that
``slide_clip`` (the benchmark's own decode timing always uses this checkout's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_embed as be  # noqa: E402 - the /proc monitor, CPU accounting and encoder-alone timing

TINY_ARCH = "slideclip-tiny-test"


# ----------------------------------------------------------------------------- inputs
def make_jpeg_slide(workdir: Path, width: int, height: int, tiles_x: int, tiles_y: int, name: str) -> Path:
    from slide_clip.synthetic import write_slide

    scene = be.bench_scene(width, height, tiles_x, tiles_y)
    path = workdir / "slides" / f"{name}.tif"
    meta = workdir / "slides-meta" / f"{name}.json"  # beside the slides' folder: a scan never meets it
    key = {"scene": repr(scene), "compression": "jpeg"}
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()) == key:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.tif")
    write_slide(tmp, scene, 0.5, levels=3, compression="jpeg")
    tmp.replace(path)
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(key))
    return path


def tiny_registry(workdir: Path) -> Path:
    """A registry naming the tiny test architecture, weights saved to a checkpoint file."""
    import open_clip
    import torch

    d = workdir / "tiny_model"
    reg = d / "models.yaml"
    if reg.is_file():
        return reg
    d.mkdir(parents=True, exist_ok=True)
    arch = REPO / "tests" / "assets" / f"{TINY_ARCH}.json"
    open_clip.add_model_config(arch)
    torch.manual_seed(0)
    torch.save(open_clip.create_model(TINY_ARCH, pretrained=None).state_dict(), d / "tiny.pt")
    reg.write_text(f"models:\n  tiny:\n    arch: {TINY_ARCH}\n    arch_config: {arch}\n    checkpoint: {d / 'tiny.pt'}\n")
    return reg


# ----------------------------------------------------------------------------- decode limit
def _grid_of(slide: Path):
    """The tile grid ``embed`` lays (thumbnail, tissue mask and grid as in the pipeline)."""
    import openslide

    from slide_clip.config import load_config
    from slide_clip.slide import open_slide
    from slide_clip.tiling import make_grid
    from slide_clip.tissue import read_thumbnail, tissue_mask

    cfg = load_config()
    osr, info = open_slide(slide)
    thumb = read_thumbnail(osr, cfg.tissue.thumbnail_max_side, info.mpp)
    mask = tissue_mask(thumb.image, thumb.mpp, cfg.tissue)
    grid = make_grid(osr.dimensions, (info.mpp, info.mpp), osr.level_downsamples, mask, thumb.downsample,
                     target_mpp=0.5, tile_size=224, min_tissue=cfg.tiling.min_tissue)
    osr.close()
    assert isinstance(osr, openslide.OpenSlide)
    return grid


def _decode_share(slide: str, grid, ranges, strips: bool, method: str = "tifffile") -> int:
    import numpy as np
    import torch

    from slide_clip.reading import open_for_reading, read_tiles
    from slide_clip.tiling import read_tile

    torch.set_num_threads(1)
    osr = open_for_reading(slide, decoder="auto" if method == "tifffile" else "openslide")
    n = 0
    for i, j in ranges:
        if strips:
            t = torch.from_numpy(read_tiles(osr, grid.coords[i:j], grid))
        else:
            t = torch.from_numpy(np.stack([np.asarray(read_tile(osr, int(x), int(y), grid))
                                           for x, y in grid.coords[i:j]]))
        n += t.shape[0]
    osr.close()
    return n


def decode_limit(slide: Path, procs: int, strips: bool = True, batch: int = 64, method: str = "tifffile",
                 grid=None) -> dict:
    import multiprocessing as mp

    grid = grid if grid is not None else _grid_of(slide)
    batches = [(i, min(i + batch, len(grid))) for i in range(0, len(grid), batch)]
    shares = [batches[k::procs] for k in range(procs)]  # round robin, like the reader pool
    with ProcessPoolExecutor(procs, mp_context=mp.get_context("forkserver")) as ex:
        args = [[str(slide)] * procs, [grid] * procs, [[(0, 1)]] * procs, [strips] * procs, [method] * procs]
        list(ex.map(_decode_share, *args))
        busy0 = be.system_busy_s()
        t0 = time.perf_counter()
        args[2] = shares
        n = sum(ex.map(_decode_share, *args))
        dt = time.perf_counter() - t0
        busy = be.system_busy_s() - busy0
    name = "read_tiles (strips)" if strips else "read_tile (per tile)"
    return {"procs": procs, "method": f"{name}, {method}", "tiles": n,
            "seconds": round(dt, 3), "tiles_per_s": round(n / dt, 1),
            "machine_busy_frac": round(busy / (dt * len(os.sched_getaffinity(0))), 3)}


def tiny_alone(slide: Path, registry: Path, batch: int = 64, repeats: int = 3) -> dict:
    """The main process's own work per tile in ``e2e``, without reading: the large slide's tiles
    read into memory as uint8 batches, then normalised and encoded by the tiny model
    (``encode_uint8``, one torch thread: CPU seconds per tile) as fast as possible; best of
    ``repeats``."""
    import torch

    from slide_clip.encoders import load_encoder, resolve_model
    from slide_clip.reading import open_for_reading, read_tiles

    grid = _grid_of(slide)
    osr = open_for_reading(str(slide))
    batches = [torch.from_numpy(read_tiles(osr, grid.coords[i:i + batch], grid)) for i in range(0, len(grid), batch)]
    osr.close()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    enc = load_encoder(resolve_model("tiny", (str(registry),)), device="cpu", precision="fp32")
    norm = enc.pixel_norm(int(batches[0].shape[1]))
    enc.encode_uint8(batches[0], norm)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for b in batches:
            enc.encode_uint8(b, norm)
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(threads)
    n = sum(len(b) for b in batches)
    return {"tiles": n, "torch_threads": 1, "seconds": round(best, 3), "tiles_per_s": round(n / best, 1),
            "ms_per_tile": round(1000 * best / n, 3)}


def import_floor(repeats: int) -> dict:
    """Seconds a bare interpreter takes to import torch, and open_clip (with torchvision and
    transformers, which it imports): the part of start-up no pipeline change removes."""
    out = {}
    for mod in ("torch", "open_clip"):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"import {mod}"], check=True, capture_output=True)
            times.append(time.perf_counter() - t)
        out[f"import_{mod}_s"] = round(min(times), 2)
    return out


def codec_section(slides: list[Path], repeats: int = 2) -> list[dict]:
    """OpenSlide ``read_region`` strips vs tifffile + imagecodecs decoding the same JPEG tiles,
    through the same ``read_tiles`` cutting code: tiles/s (1 and 2 processes, best of
    ``repeats``) and whether every tile is bit-identical."""
    import numpy as np

    from slide_clip.reading import open_for_reading, read_tiles

    rows = []
    for slide in slides:
        grid = _grid_of(slide)
        osr, alt = open_for_reading(str(slide), decoder="openslide"), open_for_reading(str(slide))
        assert type(alt).__name__ == "JpegTiffReader", f"{slide}: no level decoded by tifffile"
        same, worst = 0, 0
        for i in range(0, len(grid), 64):
            a = read_tiles(osr, grid.coords[i:i + 64], grid)
            b = read_tiles(alt, grid.coords[i:i + 64], grid)
            eq = (a == b).reshape(len(a), -1).all(axis=1)
            same += int(eq.sum())
            worst = max(worst, int(np.abs(a.astype(np.int16) - b).max()))
        osr.close()
        alt.close()
        row = {"slide": slide.name, "tiles": len(grid), "read_level": grid.read_level,
               "resized": not (float(grid.read_downsample) == 1.0 and grid.extent[0] == grid.tile_size),
               "identical_tiles": same, "max_abs_diff": worst}
        for method in ("openslide", "tifffile"):
            for procs in (1, 2):
                runs = [decode_limit(slide, procs, method=method, grid=grid) for _ in range(repeats)]
                row[f"{method}_{procs}p_tiles_per_s"] = max(r["tiles_per_s"] for r in runs)
                row[f"{method}_{procs}p_busy"] = max(r["machine_busy_frac"] for r in runs)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ----------------------------------------------------------------------------- command runs
def run_embed(inputs: list[Path], out: Path, args: list[str], poll: float = 0.25, threads: int = 2,
              verb: str = "embed") -> dict:
    """``slide-clip embed`` (or ``run``, the Prefect cohort flow) as a subprocess, with the /proc
    monitor; tiles/s by wall and loop."""
    import shutil

    from slide_clip.store import SlideStore

    exe = Path(sys.executable).with_name("slide-clip")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = [str(exe), verb, *map(str, inputs), "--out", str(out), *(["--no-progress"] if verb == "embed" else []),
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if verb == "run":  # a temporary Prefect server of its own, offline
        env.update({"PREFECT_HOME": str(out / "prefect_home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "DO_NOT_TRACK": "1"})
        env.pop("PREFECT_API_URL", None)
    busy0, self0 = be.system_busy_s(), be.self_cpu_s()
    t0 = time.perf_counter()
    with open(out / "stderr.txt", "wb") as fe:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fe, env=env)
        mon = be.TreeMonitor(proc.pid, poll).start()
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    mon.stop()
    busy, own = be.system_busy_s() - busy0, be.self_cpu_s() - self0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(out / 'stderr.txt').read_text()[-5000:]}")
    stores = sorted(out.glob("*.zarr"))
    model = args[args.index("--model") + 1]
    n = sum(SlideStore.open(s).n_tiles for s in stores)
    from slide_clip.store import model_key

    starts = [(s / "embeddings" / model_key(model) / "features" / "zarr.json").stat().st_mtime_ns for s in stores]
    ends = [(s / "embeddings" / model_key(model) / "zarr.json").stat().st_mtime_ns for s in stores]
    loop = (max(ends) - min(starts)) / 1e9
    foreign = max(0.0, busy - (ru.ru_utime + ru.ru_stime) - own)
    return {"command": " ".join(cmd), "slides": len(stores), "tiles": n, "wall_s": round(wall, 2),
            "loop_s": round(loop, 2), "tiles_per_s_wall": round(n / wall, 1), "tiles_per_s_loop": round(n / loop, 1),
            "peak_rss_tree_sum_mib": round(mon.peak_rss_sum / 1024, 1),
            "peak_pss_tree_sum_mib": round(mon.peak_pss_sum / 1024, 1),
            "peak_rss_largest_process_mib": round(ru.ru_maxrss / 1024, 1),
            "reader_processes_seen": sum(1 for p in mon.procs.values() if p["role"] == "worker"),
            "foreign_cpu_frac": round(foreign / (wall * len(os.sched_getaffinity(0))), 3)}


_FIRST_BATCH = """
import sys, time
t_import = time.time()
from slide_clip.encoders.base import Encoder
mark = sys.argv.pop(1)
def once(name):
    orig = getattr(Encoder, name)
    def wrapped(self, *a, **k):
        out = orig(self, *a, **k)
        if not getattr(Encoder, "_seen", False):
            Encoder._seen = True
            open(mark, "w").write(repr(time.time()))
        return out
    setattr(Encoder, name, wrapped)
[once(n) for n in ("encode_uint8", "encode_images") if hasattr(Encoder, n)]
from slide_clip.cli import main
sys.argv[0] = "slide-clip"
main()
"""


def startup(slide: Path, out: Path, args: list[str], repeats: int) -> dict:
    """Seconds from process start to the first encoded batch, and to exit (best of ``repeats``)."""
    import shutil

    firsts, walls = [], []
    for _ in range(repeats):
        if out.exists():
            shutil.rmtree(out)
        mark = out.with_suffix(".first")
        mark.unlink(missing_ok=True)
        t0 = time.time()
        subprocess.run([sys.executable, "-c", _FIRST_BATCH, str(mark), "embed", str(slide), "--out", str(out),
                        "--no-progress", *args], check=True, capture_output=True)
        walls.append(time.time() - t0)
        firsts.append(float(mark.read_text()) - t0)
    return {"first_batch_s": [round(v, 2) for v in firsts], "exit_s": [round(v, 2) for v in walls],
            "first_batch_best_s": round(min(firsts), 2)}


def refused(work: Path, repeats: int) -> dict:
    """A refused slide's wall time to exit, and a good slide's first batch, with random:ViT-B-32."""
    import shutil

    from slide_clip.synthetic import write_slide

    coarse = work / "slides" / "coarse_2mpp.tif"
    if not coarse.is_file():
        coarse.parent.mkdir(parents=True, exist_ok=True)
        write_slide(coarse, be.bench_scene(15 * be.TILE_L0, 13 * be.TILE_L0, 4, 4), 2.0, levels=2)
    exe = Path(sys.executable).with_name("slide-clip")
    args = ["--model", "random:ViT-B-32", "--device", "cpu", "--precision", "fp32", "--batch-size", "32"]
    walls = []
    for _ in range(repeats):
        out = work / "out_refused"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        p = subprocess.run([str(exe), "embed", str(coarse), "--out", str(out), "--no-progress", *args],
                           capture_output=True, text=True)
        walls.append(round(time.perf_counter() - t0, 2))
        if p.returncode != 1 or "coarser than the target" not in p.stdout + p.stderr:
            raise SystemExit(f"the coarse slide was not refused:\n{p.stdout}\n{p.stderr}")
    good = make_jpeg_slide(work, 20 * be.TILE_L0, 16 * be.TILE_L0, 4, 4, "small_t4x4")
    first = startup(good, work / "out_refused_good", args + ["--workers", "auto"], repeats)
    return {"refused_exit_s": walls, "refused_exit_best_s": min(walls), "good_first_batch_s": first["first_batch_s"],
            "good_first_batch_best_s": first["first_batch_best_s"], "good_exit_s": first["exit_s"]}


# ----------------------------------------------------------------------------- GPU
class GpuSampler:
    def __init__(self, interval_ms: int = 200):
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits", f"-lms={interval_ms}"],
                                     stdout=subprocess.PIPE, text=True)
        self.samples: list[tuple[float, float]] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                u, m = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((u, m))

    def stop(self) -> dict:
        self.proc.terminate()
        self.proc.wait()
        self._t.join(timeout=2)
        u = [s[0] for s in self.samples]
        return {"samples": len(u), "util_mean_pct": round(sum(u) / len(u), 1) if u else None,
                "util_median_pct": sorted(u)[len(u) // 2] if u else None,
                "mem_used_max_mib": max((s[1] for s in self.samples), default=None)}


def gpu_section(slide: Path, work: Path, batch: int) -> dict:
    """ViT-B-16 bf16: end to end (GPU utilisation sampled) vs the encoder alone."""
    args = ["--model", "random:ViT-B-16", "--batch-size", str(batch), "--device", "cuda", "--precision", "bf16",
            "--workers", "auto"]
    sampler = GpuSampler()
    e2e = run_embed([slide], work / "out_gpu", args, threads=max(1, (os.cpu_count() or 2) // 2))
    e2e["gpu"] = sampler.stop()
    store = next((work / "out_gpu").glob("*.zarr"))
    alone = be.encoder_alone(store, slide, model="random:ViT-B-16", batch_size=batch, warmup=2, repeats=3,
                             device="cuda", precision="bf16")
    return {"e2e": e2e, "encoder_alone": alone,
            "ratio_loop": round(e2e["tiles_per_s_loop"] / alone["tiles_per_s"], 3),
            "ratio_wall": round(e2e["tiles_per_s_wall"] / alone["tiles_per_s"], 3)}


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/slideclip-bench-dp"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--sections", default=None, help="decode,e2e,cohort,compute,startup (cpu) or gpu; "
                    "codec (OpenSlide vs tifffile on the large slide and --codec-slides) and refused (a refused "
                    "slide's exit, a good slide's first batch, random:ViT-B-32) run only when named")
    ap.add_argument("--codec-slides", nargs="*", type=Path, default=[],
                    help="more JPEG TIFF/SVS slides for the codec section (level 0 tiled)")
    ap.add_argument("--large", default="40000x30000", help="large slide, level-0 px")
    ap.add_argument("--tissue-tiles", default="30x30", help="tissue block of the large slide, tiles")
    ap.add_argument("--cohort", type=int, default=20, help="small slides in the cohort")
    ap.add_argument("--cohort-tiles", default="9x5", help="tissue block of each small slide, tiles")
    ap.add_argument("--compute-tiles", default="16x16", help="tissue block for the ViT-B-32 run, tiles")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="reader processes for e2e and cohort")
    ap.add_argument("--repeats", type=int, default=2, help="start-up measurements")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    sections = (a.sections or ("gpu" if a.device.startswith("cuda") else "decode,e2e,cohort,compute,startup")).split(",")
    w = a.workdir
    w.mkdir(parents=True, exist_ok=True)
    tx, ty = map(int, a.tissue_tiles.split("x"))
    lw, lh = map(int, a.large.split("x"))
    large = make_jpeg_slide(w, lw, lh, tx, ty, f"large_{lw}x{lh}_t{tx}x{ty}")
    res: dict = {"machine": be.machine_info(2), "load_before": os.getloadavg(), "args": vars(a) | {"workdir": str(w)}}
    reg = tiny_registry(w)
    tiny = ["--models", str(reg), "--model", "tiny", "--batch-size", str(a.batch_size), "--device", "cpu",
            "--precision", "fp32"]
    if "decode" in sections:
        res["decode"] = [decode_limit(large, 1, strips=False), decode_limit(large, 1), decode_limit(large, 2)]
        print(json.dumps(res["decode"], indent=1), flush=True)
    if "codec" in sections:
        res["codec"] = codec_section([large, *a.codec_slides], a.repeats)
    if "e2e" in sections:
        res["e2e"] = {wk: run_embed([large], w / f"out_large_w{wk}", tiny + ["--workers", str(wk)])
                      for wk in sorted({0, a.workers})}
        res["e2e_tiny_alone"] = tiny_alone(large, reg, a.batch_size)
        if "decode" in res:
            lim = res["decode"][-1]["tiles_per_s"]
            for r in res["e2e"].values():
                r["ratio_to_decode2_wall"] = round(r["tiles_per_s_wall"] / lim, 3)
                r["ratio_to_decode2_loop"] = round(r["tiles_per_s_loop"] / lim, 3)
            # what 2 cores allow when every tile is decoded (d CPU s, one process in strips) and
            # normalised + encoded (m CPU s, one thread) once: 2 / (d + m) tiles/s, both cores busy
            d, m = 1 / res["decode"][1]["tiles_per_s"], 1 / res["e2e_tiny_alone"]["tiles_per_s"]
            res["e2e_ceiling_2_cores"] = {"tiles_per_s": round(2 / (d + m), 1),
                                          "ratio_to_decode2": round(2 / (d + m) / lim, 3)}
        print(json.dumps(res["e2e"], indent=1), flush=True)
    if "cohort" in sections:
        cx, cy = map(int, a.cohort_tiles.split("x"))
        cw, ch = (9 + cx + 2) * be.TILE_L0, (7 + cy + 2) * be.TILE_L0
        folder = w / "slides" / f"cohort_{a.cohort}_t{cx}x{cy}"
        for k in range(a.cohort):
            p = make_jpeg_slide(w, cw, ch, cx, cy, f"cohort_{a.cohort}_t{cx}x{cy}/s{k:02d}")
            assert p.parent == folder
        res["cohort"] = run_embed([folder], w / "out_cohort", tiny + ["--workers", str(a.workers)])
        if "e2e" in res:
            big = res["e2e"][a.workers]["tiles_per_s_wall"]
            res["cohort"]["ratio_to_large_wall"] = round(res["cohort"]["tiles_per_s_wall"] / big, 3)
        print(json.dumps(res["cohort"], indent=1), flush=True)
    if "flow" in sections:
        cx, cy = map(int, a.cohort_tiles.split("x"))
        folder = w / "slides" / f"cohort_{a.cohort}_t{cx}x{cy}"
        res["flow"] = run_embed([folder], w / "out_flow", tiny + ["--workers", str(a.workers), "--no-heatmaps",
                                                                  "--concurrency", "3"], verb="run")
        print(json.dumps(res["flow"], indent=1), flush=True)
    if "compute" in sections:
        cx, cy = map(int, a.compute_tiles.split("x"))
        small = make_jpeg_slide(w, 10000, 7500, cx, cy, f"compute_t{cx}x{cy}")
        args = ["--model", "random:ViT-B-32", "--batch-size", "32", "--device", "cpu", "--precision", "fp32",
                "--workers", "auto"]
        e2e = run_embed([small], w / "out_compute", args)
        store = next((w / "out_compute").glob("*.zarr"))
        alone = be.encoder_alone(store, small, model="random:ViT-B-32", batch_size=32, warmup=1, repeats=2)
        res["compute"] = {"e2e": e2e, "encoder_alone": alone,
                          "ratio_loop": round(e2e["tiles_per_s_loop"] / alone["tiles_per_s"], 3),
                          "ratio_wall": round(e2e["tiles_per_s_wall"] / alone["tiles_per_s"], 3)}
        print(json.dumps(res["compute"], indent=1), flush=True)
    if "startup" in sections:
        res["startup"] = startup(large, w / "out_startup", tiny + ["--workers", "auto"], a.repeats)
        res["startup"].update(import_floor(a.repeats))
        print(json.dumps(res["startup"], indent=1), flush=True)
    if "refused" in sections:
        res["refused"] = refused(w, a.repeats)
        print(json.dumps(res["refused"], indent=1), flush=True)
    if "gpu" in sections:
        res["gpu"] = gpu_section(large, w, a.batch_size)
        print(json.dumps(res["gpu"], indent=1), flush=True)
    res["load_after"] = os.getloadavg()
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
