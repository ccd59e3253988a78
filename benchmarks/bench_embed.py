"""Benchmark ``slide-clip embed``: pipeline throughput vs the bare encoder, and peak memory (CPU by default, ``--device cuda`` on a GPU).

Two questions, answered in one run:

1. **Throughput ratio.** End-to-end tiles/s of the real command line (``slide-clip embed``,
   run as a subprocess) divided by the tiles/s of the encoder alone on the *same* tiles
   (read and preprocessed into memory first; only ``Encoder.encode_images`` is timed).
   Same model (``random:ViT-B-32``, fp32, CPU), same batch size, same torch intra-op thread
   count (the subprocess gets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set to the count the
   benchmark process uses). Three pipeline timings are reported for each run:

   * ``cli_wall``: the whole ``slide-clip embed`` command, process start to exit
     (Python/torch imports, model build and weight hashing, thumbnail, tissue mask,
     tile grid, encode loop, Zarr writes, worker shutdown);
   * ``slide_s``: the per-slide seconds the CLI itself reports (``embed_slide``: thumbnail,
     tissue mask, tile grid, the encode loop and -- since the encoder is loaded lazily, on
     the first slide that needs it -- the model build and weight hashing);
   * ``encode_loop``: from the creation of the store's ``features`` array (just before the
     DataLoader starts its workers) to the last write of the embedding group's metadata
     (status ``complete``), from file modification times (ns resolution). This is the
     part that should run at the encoder's speed.

   The target is ``encode_loop`` ratio >= 0.9. Other processes on a shared machine slow a run
   down: each run reports ``foreign_cpu_frac``, the share of the machine's CPU time used by
   processes outside the benchmark while it ran; with ``--repeats`` the best run counts.

2. **Peak memory flatness.** Peak RSS of the command (main process and DataLoader worker
   children) on synthetic slides of increasing size with the *same* tissue (the same number
   of tiles): memory must not grow with the slide's pixel count. Measured by polling
   ``/proc`` (per-process ``VmHWM``, the sum of ``VmRSS`` over the process tree and the sum
   of ``Pss`` from ``smaps_rollup`` -- forked workers share the parent's pages, so summed
   RSS double-counts and summed PSS is the tree's real footprint) and cross-checked with
   ``os.wait4``'s ``ru_maxrss`` (the largest single process of the tree).

Slides are written with :func:`slide_clip.synthetic.write_slide` under ``--workdir``
(default ``/tmp/slideclip-bench``) and reused by later runs when their parameters match.

Usage::

    .venv/bin/python benchmarks/bench_embed.py                      # defaults: ~5 min on 2 cores
                                                                    # (+1.5 min to write the slides once)
    .venv/bin/python benchmarks/bench_embed.py --sizes 10000x7500 --workers 0,1,2
    .venv/bin/python benchmarks/bench_embed.py --json /tmp/slideclip-bench/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: Tile side in level-0 pixels at 0.5 µm/px (224 px at 0.5 µm/px target).
TILE_L0 = 224


# ----------------------------------------------------------------------------- machine
def machine_info(threads: int) -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    versions = {}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("torch", "open_clip_torch", "openslide-python", "openslide-bin", "zarr", "numpy", "pillow"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_kib / 2**20, 1) if mem_kib else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_parallel": torch.__config__.parallel_info().splitlines()[-1].strip(),
        "versions": versions,
    }


# ----------------------------------------------------------------------------- slides
def bench_scene(width: int, height: int, tiles_x: int, tiles_y: int):
    """A glass slide with one tissue block of ``tiles_x`` x ``tiles_y`` tiles (grid-aligned).

    The block sits at the same level-0 place whatever the slide's size, so every size
    yields (nearly) the same tiles. A dense ellipse inside it adds a second texture.
    """
    from slide_clip.synthetic import Region, Scene

    x0, y0 = 9 * TILE_L0, 7 * TILE_L0
    x1, y1 = x0 + tiles_x * TILE_L0, y0 + tiles_y * TILE_L0
    if x1 > width or y1 > height:
        raise SystemExit(f"tissue block {x1}x{y1} does not fit a {width}x{height} slide")
    cx0, cy0 = x0 + (x1 - x0) // 4, y0 + (y1 - y0) // 4
    cx1, cy1 = x1 - (x1 - x0) // 4, y1 - (y1 - y0) // 4
    return Scene(width, height, (
        Region("rect", (x0, y0, x1, y1), "tissue"),
        Region("ellipse", (cx0, cy0, cx1, cy1), "dense"),
    ), seed=1)


def make_slide(workdir: Path, width: int, height: int, tiles_x: int, tiles_y: int, levels: int,
               mpp: float) -> tuple[Path, float | None]:
    """Write (or reuse) a synthetic slide; returns its path and the seconds spent writing."""
    from slide_clip.synthetic import write_slide

    scene = bench_scene(width, height, tiles_x, tiles_y)
    name = f"bench_{width}x{height}_t{tiles_x}x{tiles_y}_l{levels}_mpp{mpp:g}"
    path = workdir / "slides" / f"{name}.tif"
    meta = path.with_suffix(".json")
    key = {"scene": repr(scene), "levels": levels, "mpp": mpp}
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()) == key:
        return path, None
    tmp = path.with_name(path.stem + ".partial.tif")
    t0 = time.perf_counter()
    write_slide(tmp, scene, mpp, levels=levels)
    tmp.replace(path)
    meta.write_text(json.dumps(key))
    return path, time.perf_counter() - t0


# ----------------------------------------------------------------------------- /proc polling
def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def _status(pid: int, pss: bool) -> dict:
    d = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                d[k] = int(v.split()[0])  # KiB
            elif k in ("Threads", "PPid"):
                d[k] = int(v.split()[0])
            elif k == "Name":
                d[k] = v.strip()
        if pss:  # smaps_rollup walks the page tables: costly on a 2 GB process, so read it rarely
            d["Pss"] = int(re.search(r"^Pss:\s+(\d+)", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.M).group(1))
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        tick = os.sysconf("SC_CLK_TCK")
        d["cpu_s"] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    except (OSError, AttributeError, ValueError, IndexError):
        return {}
    return d


def system_busy_s() -> float:
    """CPU seconds all processes on this machine have used since boot (user+nice+sys+irq+softirq+steal)."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(v[:3]) + sum(v[5:8])) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class TreeMonitor:
    """Polls a process tree's memory, threads and CPU time until stopped.

    Per-process peaks come from the kernel's own high-water mark (``VmHWM``), so a slow poll
    loses nothing there; the tree sums (RSS every poll, PSS every ``pss_every`` polls) are
    sampled. The poll is kept cheap: it runs on the cores being measured.
    """

    def __init__(self, pid: int, interval: float = 0.5, pss_every: int = 4):
        self.pid, self.interval = pid, interval
        self.procs: dict[int, dict] = {}  # pid -> peak HWM, peak threads, last cpu, role
        self.peak_rss_sum = 0
        self.peak_pss_sum = 0
        self.pss_every = pss_every
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._t.start()
        return self

    def stop(self):
        self._stop.set()
        self._t.join()

    def _run(self):
        n = 0
        while not self._stop.is_set():
            rss = pss = 0
            want_pss = n % self.pss_every == 0
            n += 1
            for p in _tree(self.pid):
                s = _status(p, want_pss)
                if not s:
                    continue
                rec = self.procs.setdefault(p, {"role": "main" if p == self.pid else "worker", "hwm_kib": 0,
                                                "threads": 0, "cpu_s": 0.0, "name": s.get("Name")})
                rec["hwm_kib"] = max(rec["hwm_kib"], s.get("VmHWM", 0))
                rec["threads"] = max(rec["threads"], s.get("Threads", 0))
                rec["cpu_s"] = max(rec["cpu_s"], s.get("cpu_s", 0.0))
                rss += s.get("VmRSS", 0)
                pss += s.get("Pss", 0)
            self.peak_rss_sum = max(self.peak_rss_sum, rss)
            self.peak_pss_sum = max(self.peak_pss_sum, pss)
            self._stop.wait(self.interval)


# ----------------------------------------------------------------------------- the CLI run
_SLIDE_LINE = re.compile(r"^ok\s+\S+\s+(\d+) tiles, (\d+) encoded, ([\d.]+) s", re.M)


def encode_loop_seconds(store: Path, model: str) -> tuple[float | None, dict]:
    """Encode loop duration from the store's files (see the module docstring)."""
    from slide_clip.store import SlideStore, model_key

    grp = store / "embeddings" / model_key(model)
    start = (grp / "features" / "zarr.json").stat().st_mtime_ns
    end = (grp / "zarr.json").stat().st_mtime_ns
    attrs = SlideStore.open(store).embedding_attrs(model)
    return (end - start) / 1e9, {k: attrs.get(k) for k in ("status", "rows_written", "started", "finished")}


def run_cli(slide: Path, out: Path, *, model: str, batch_size: int, workers: int, threads: int,
            poll: float, device: str = "cpu", precision: str = "fp32") -> dict:
    exe = Path(sys.executable).with_name("slide-clip")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = [str(exe), "embed", str(slide), "--out", str(out), "--model", model, "--batch-size", str(batch_size),
           "--workers", str(workers), "--device", device, "--precision", precision, "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log_out, log_err = out / "stdout.txt", out / "stderr.txt"
    with open(log_out, "wb") as fo, open(log_err, "wb") as fe:
        busy0, self0 = system_busy_s(), self_cpu_s()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env)
        mon = TreeMonitor(proc.pid, poll).start()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        mon.stop()
        busy, own = system_busy_s() - busy0, self_cpu_s() - self0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = log_err.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}\n{log_out.read_text()}")
    m = _SLIDE_LINE.search(err)
    n_tiles, encoded, slide_s = (int(m.group(1)), int(m.group(2)), float(m.group(3))) if m else (None, None, None)
    store = next(out.glob("*.zarr"))
    loop_s, attrs = encode_loop_seconds(store, model)
    main = mon.procs.get(proc.pid, {})
    workers_seen = [v for p, v in mon.procs.items() if p != proc.pid]
    return {
        "slide": slide.name,
        "workers": workers,
        "command": " ".join(cmd),
        "env": {"OMP_NUM_THREADS": env["OMP_NUM_THREADS"], "MKL_NUM_THREADS": env["MKL_NUM_THREADS"]},
        "n_tiles": n_tiles,
        "encoded": encoded,
        "cli_wall_s": round(wall, 3),
        "slide_s": slide_s,
        "encode_loop_s": round(loop_s, 3),
        "tiles_per_s": {
            "cli_wall": round(encoded / wall, 3),
            "slide_s": round(encoded / slide_s, 3) if slide_s else None,
            "encode_loop": round(encoded / loop_s, 3),
        },
        "store_attrs": attrs,
        "memory": {
            "main_peak_rss_mib": round(main.get("hwm_kib", 0) / 1024, 1),
            "worker_peak_rss_mib": [round(w["hwm_kib"] / 1024, 1) for w in workers_seen],
            "tree_peak_rss_sum_mib": round(mon.peak_rss_sum / 1024, 1),
            "tree_peak_pss_sum_mib": round(mon.peak_pss_sum / 1024, 1),
            "wait4_maxrss_mib": round(ru.ru_maxrss / 1024, 1),
        },
        "cpu": {
            "tree_user_s": round(ru.ru_utime, 2),
            "tree_sys_s": round(ru.ru_stime, 2),
            "main_cpu_s_polled": round(main.get("cpu_s", 0.0), 2),
            "worker_cpu_s_polled": [round(w["cpu_s"], 2) for w in workers_seen],
            "main_os_threads_max": main.get("threads"),
            "worker_os_threads_max": [w["threads"] for w in workers_seen],
            # CPU used on this machine by processes outside the benchmark during the run:
            # other users' work competing for the same cores (makes a run slower, not the code).
            "foreign_cpu_s": round(max(0.0, busy - (ru.ru_utime + ru.ru_stime) - own), 2),
            "bench_poll_cpu_s": round(own, 2),  # the benchmark's own CPU while it watched the run
            "foreign_cpu_frac": round(max(0.0, busy - (ru.ru_utime + ru.ru_stime) - own)
                                      / (wall * len(os.sched_getaffinity(0))), 3),
        },
        "store": str(store),
    }


def probe_cli_threads(threads: int) -> dict:
    """torch's thread counts in a fresh interpreter with the environment the CLI gets."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    code = ("import torch, slide_clip.cli; "
            "print(torch.get_num_threads(), torch.get_num_interop_threads())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    intra, inter = map(int, out.stdout.split()[-2:])
    return {"main_intra_op": intra, "main_inter_op": inter,
            "dataloader_workers_intra_op": 1}  # torch/utils/data/_utils/worker.py sets 1 in workers


# ----------------------------------------------------------------------------- encoder alone
def encoder_alone(store: Path, slide: Path, *, model: str, batch_size: int, warmup: int, repeats: int,
                  device: str = "cpu", precision: str = "fp32") -> dict:
    """Read and preprocess the store's tiles into memory, then time ``encode_images`` alone."""
    import numpy as np
    import openslide
    import torch

    from slide_clip.encoders import load_encoder, resolve_model
    from slide_clip.stages import grid_from_store
    from slide_clip.store import SlideStore
    from slide_clip.tiling import read_tile

    t0 = time.perf_counter()
    enc = load_encoder(resolve_model(model), device=device, precision=precision)
    load_s = time.perf_counter() - t0
    grid = grid_from_store(SlideStore.open(store))
    osr = openslide.OpenSlide(str(slide))
    read_s = prep_s = 0.0
    tensors = []
    for x, y in grid.coords:
        a = time.perf_counter()
        tile = read_tile(osr, int(x), int(y), grid)
        b = time.perf_counter()
        tensors.append(enc.preprocess(tile))
        prep_s += time.perf_counter() - b
        read_s += b - a
    osr.close()
    pixels = torch.stack(tensors)
    del tensors
    n = pixels.shape[0]
    batches = [pixels[i:i + batch_size] for i in range(0, n, batch_size)]
    for _ in range(warmup):
        enc.encode_images(batches[0])
    times, foreign = [], []
    for _ in range(repeats):
        busy0, self0 = system_busy_s(), self_cpu_s()
        t = time.perf_counter()
        for b in batches:
            feats = enc.encode_images(b)
        times.append(time.perf_counter() - t)
        foreign.append(round(max(0.0, system_busy_s() - busy0 - (self_cpu_s() - self0))
                             / (times[-1] * len(os.sched_getaffinity(0))), 3))
    assert np.isfinite(feats).all()
    best = min(times)
    return {
        "n_tiles": n,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "warmup_batches": warmup,
        "encode_s": [round(t, 3) for t in times],
        "foreign_cpu_frac": foreign,
        "tiles_per_s": round(n / best, 3),
        "tiles_per_s_mean": round(n * len(times) / sum(times), 3),
        "model_load_s": round(load_s, 2),
        "read_tile_ms_per_tile": round(1000 * read_s / n, 2),
        "preprocess_ms_per_tile": round(1000 * prep_s / n, 2),
    }


# ----------------------------------------------------------------------------- main
def _size(s: str) -> tuple[int, int]:
    w, h = s.lower().split("x")
    return int(w), int(h)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/slideclip-bench"),
                    help="slides and stores go here (default /tmp/slideclip-bench)")
    ap.add_argument("--json", type=Path, default=None,
                    help="results JSON (default WORKDIR/results.json)")
    ap.add_argument("--sizes", default="10000x7500,40000x30000",
                    help="level-0 slide sizes, comma-separated WxH; the first is the throughput slide")
    ap.add_argument("--tissue-tiles", default="20x20",
                    help="tissue block in tiles, CxR (same for every size; default 20x20 = ~400 tiles)")
    ap.add_argument("--levels", type=int, default=3, help="pyramid levels written (default 3)")
    ap.add_argument("--mpp", type=float, default=0.5, help="slide resolution, µm/px (default 0.5)")
    ap.add_argument("--model", default="random:ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (both sides; default cpu)")
    ap.add_argument("--precision", default="fp32", help="fp32, fp16 or bf16 (autocast on CUDA; default fp32)")
    ap.add_argument("--workers", default="1,2", help="DataLoader worker counts, comma-separated (default 1,2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for both sides (default: torch's default here)")
    ap.add_argument("--encoder-repeats", type=int, default=2, help="timed passes of the encoder alone (best counts)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="pipeline runs per worker count on the throughput slide (best counts for the ratio)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed encoder batches before timing")
    ap.add_argument("--poll", type=float, default=0.5, help="/proc polling interval, s (PSS every 4th poll)")
    ap.add_argument("--target", type=float, default=0.9, help="throughput ratio target")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    json_path = args.json or args.workdir / "results.json"
    args.workdir.mkdir(parents=True, exist_ok=True)
    sizes = [_size(s) for s in args.sizes.split(",")]
    tx, ty = _size(args.tissue_tiles)
    worker_counts = [int(w) for w in args.workers.split(",")]

    info = machine_info(threads)
    info["cli_threads"] = probe_cli_threads(threads)
    print("machine:", json.dumps(info, indent=1), flush=True)
    results: dict = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                     "slides": [], "runs": [], "encoder_alone": None}

    # Slides first (the big one takes minutes to write).
    slides = []
    for w, h in sizes:
        print(f"slide {w}x{h}: writing or reusing ...", flush=True)
        path, wrote = make_slide(args.workdir, w, h, tx, ty, args.levels, args.mpp)
        slides.append(path)
        results["slides"].append({"size": f"{w}x{h}", "megapixels": round(w * h / 1e6, 1), "path": str(path),
                                  "file_mib": round(path.stat().st_size / 2**20, 1),
                                  "write_s": round(wrote, 1) if wrote else "reused"})
        print(f"  {path} ({results['slides'][-1]['file_mib']} MiB, write {results['slides'][-1]['write_s']} s)",
              flush=True)

    # Pipeline runs: every size x every worker count.
    for i, (path, (w, h)) in enumerate(zip(slides, sizes)):
        for nw, rep in [(nw, rep) for rep in range(args.repeats if i == 0 else 1) for nw in worker_counts]:
            out = args.workdir / "out" / f"{w}x{h}_w{nw}"
            print(f"embed {w}x{h} workers={nw} (run {rep + 1}) ...", flush=True)
            r = run_cli(path, out, model=args.model, batch_size=args.batch_size, workers=nw, threads=threads,
                        device=args.device, precision=args.precision,
                        poll=args.poll)
            r["size"] = f"{w}x{h}"
            r["repeat"] = rep
            results["runs"].append(r)
            print(f"  {r['encoded']} tiles: wall {r['cli_wall_s']} s, slide {r['slide_s']} s, "
                  f"loop {r['encode_loop_s']} s; peak main {r['memory']['main_peak_rss_mib']} MiB, "
                  f"workers {r['memory']['worker_peak_rss_mib']} MiB; foreign CPU {r['cpu']['foreign_cpu_frac']:.0%}",
                  flush=True)

    # Encoder alone on the throughput slide's tiles (the first size's first run's store).
    first = results["runs"][0]
    print("encoder alone ...", flush=True)
    ea = encoder_alone(Path(first["store"]), slides[0], model=args.model, batch_size=args.batch_size,
                       device=args.device, precision=args.precision,
                       warmup=args.warmup, repeats=args.encoder_repeats)
    results["encoder_alone"] = ea
    for r in results["runs"]:
        if r["size"] == first["size"] and r["n_tiles"] == ea["n_tiles"]:
            r["ratio"] = {k: round(v / ea["tiles_per_s"], 3) for k, v in r["tiles_per_s"].items()}

    best = {}
    for r in results["runs"]:
        if "ratio" in r:
            b = best.get(r["workers"])
            if b is None or r["encode_loop_s"] < b["encode_loop_s"]:
                best[r["workers"]] = r
    results["summary"] = {
        "encoder_alone_tiles_per_s": ea["tiles_per_s"],
        "target": args.target,
        "best_ratio_by_workers": {str(k): v["ratio"] for k, v in sorted(best.items())},
        "meets_target_encode_loop": {str(k): v["ratio"]["encode_loop"] >= args.target for k, v in sorted(best.items())},
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    report(results, args.target)
    print(f"\nJSON: {json_path}")
    return 0


def report(res: dict, target: float) -> None:
    m = res["machine"]
    print("\n=== machine")
    print(f"{m['cpu_model']}, {m['cpu_count']} CPUs ({m['cpu_affinity']} usable), {m['ram_gib']} GiB RAM; "
          f"python {m['python']}, torch {m['versions'].get('torch')}, open_clip {m['versions'].get('open_clip_torch')}")
    ct = m["cli_threads"]
    print(f"torch intra-op threads: benchmark {m['torch_threads']}, CLI main {ct['main_intra_op']}, "
          f"DataLoader workers {ct['dataloader_workers_intra_op']}")
    ea = res["encoder_alone"]
    print("\n=== encoder alone (same tiles, in memory; only encode_images timed)")
    print(f"{ea['n_tiles']} tiles, batch {ea['batch_size']}, {ea['torch_threads']} threads: "
          f"{ea['tiles_per_s']} tiles/s best (passes {ea['encode_s']} s, foreign CPU {ea['foreign_cpu_frac']}); "
          f"read_tile {ea['read_tile_ms_per_tile']} ms/tile, preprocess {ea['preprocess_ms_per_tile']} ms/tile "
          f"(one thread)")
    print(f"\n=== pipeline throughput (slide-clip embed); ratio = pipeline tiles/s / encoder-alone tiles/s, "
          f"target >= {target}")
    hdr = ["slide", "workers", "run", "tiles", "wall_s", "slide_s", "loop_s", "t/s wall", "t/s slide", "t/s loop",
           "ratio wall", "ratio slide", "ratio loop", "cpu main", "cpu workers", "foreign cpu"]
    rows = []
    for r in res["runs"]:
        rat = r.get("ratio", {})
        rows.append([r["size"], r["workers"], r.get("repeat", 0) + 1, r["encoded"], r["cli_wall_s"], r["slide_s"], r["encode_loop_s"],
                     r["tiles_per_s"]["cli_wall"], r["tiles_per_s"]["slide_s"], r["tiles_per_s"]["encode_loop"],
                     rat.get("cli_wall", "-"), rat.get("slide_s", "-"), rat.get("encode_loop", "-"),
                     r["cpu"]["main_cpu_s_polled"], "+".join(map(str, r["cpu"]["worker_cpu_s_polled"])) or "-",
                     f"{r['cpu']['foreign_cpu_frac']:.0%}"])
    _table(hdr, rows)
    sm = res.get("summary", {})
    for k, v in sm.get("best_ratio_by_workers", {}).items():
        ok = "meets" if v["encode_loop"] >= target else "BELOW"
        print(f"best of runs, workers={k}: ratio encode_loop {v['encode_loop']} ({ok} target {target}), "
              f"slide_s {v['slide_s']}, cli_wall {v['cli_wall']}")
    print("\n=== peak memory (MiB)")
    hdr = ["slide", "Mpx", "workers", "tiles", "main RSS", "worker RSS", "tree RSS sum", "tree PSS sum",
           "wait4 maxrss"]
    mpx = {s["size"]: s["megapixels"] for s in res["slides"]}
    rows = [[r["size"], mpx[r["size"]], r["workers"], r["encoded"], r["memory"]["main_peak_rss_mib"],
             "/".join(map(str, r["memory"]["worker_peak_rss_mib"])) or "-", r["memory"]["tree_peak_rss_sum_mib"],
             r["memory"]["tree_peak_pss_sum_mib"], r["memory"]["wait4_maxrss_mib"]] for r in res["runs"]]
    _table(hdr, rows)


def _table(header, rows):
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    raise SystemExit(main())
