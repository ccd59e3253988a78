"""Benchmark the survival stages on synthetic embeddings: time and peak memory (CPU by default).

A cohort of ``--patients`` patients (a third with two slides) whose slides hold ``--tiles``
tiles of ``--dim``-d L2-normalised random embeddings is written straight into real slide
stores (no slide files and no encoder: only the embeddings matter here); a patient's
hazard grows with the share of its tiles drawn around a second direction. Each stage then
runs in a fresh child process, so its peak memory (``ru_maxrss``) is its own:

* ``pooled``: the per-slide and per-patient pooled tables (reads every embedding once);
* ``coxnet``: the elastic-net Cox baseline (mean embedding), 5 folds with inner penalty selection;
* ``abmil``: gated-attention MIL, 5 folds, ``--epochs`` epochs, with the bag cache off, so
  every epoch streams the bags from the stores (the memory a cohort too big for RAM needs).

The cohort's embeddings are ``patients * 4/3 * tiles * dim * 4`` bytes (printed first);
peak memory of the streaming stages should stay far below that.

Usage::

    .venv/bin/python benchmarks/bench_survival.py                       # 300 patients x 2000 tiles, 512-d
    .venv/bin/python benchmarks/bench_survival.py --patients 100 --tiles 1000 --epochs 2
    .venv/bin/python benchmarks/bench_survival.py --device cuda --json results.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import queue
import resource
import shutil
import time
from pathlib import Path

import numpy as np


def make_cohort(root: Path, patients: int, tiles: int, dim: int, seed: int = 0) -> tuple[Path, Path]:
    """Write the stores and a clinical table; returns (out folder, clinical CSV)."""
    import pandas as pd

    from slide_clip.manifest import CohortSlide, record_patients
    from slide_clip.store import SlideStore

    out = root / "out"
    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(seed)
    base = rng.normal(size=dim)
    second = rng.normal(size=dim)
    side = int(np.ceil(np.sqrt(tiles)))
    slides, frac = [], {}
    for p in range(patients):
        pid = f"P{p:04d}"
        share = []
        for k in range(2 if p % 3 == 0 else 1):
            sid = f"{pid}_{k}"
            f = float(rng.uniform(0, 0.8))
            share.append(f)
            st = SlideStore.create(out / f"{sid}.zarr", {"name": sid, "path": f"/nonexistent/{sid}.tif",
                                                        "fingerprint": f"bench:{sid}", "mpp_x": 0.5, "mpp_y": 0.5},
                                   {"target_mpp": 0.5, "tile_size": 224, "overlap": 0.0})
            st.write_tissue(np.ones((side, side), bool), np.full((side, side, 3), 200, np.uint8),
                            {"downsample": [224.0, 224.0], "mpp": 112.0, "tissue_area_mm2": tiles * 0.0125})
            rc = np.stack(np.divmod(np.arange(tiles), side), 1)
            st.write_tiles(rc[:, ::-1] * 224, rc, np.ones(tiles, np.float32),
                           {"tile_extent_level0": [224.0, 224.0], "stride_level0": [224.0, 224.0],
                            "grid_shape": [side, side], "read_level": 0, "read_downsample": 1.0})
            w = st.begin_embeddings({"name": "bench", "arch": "none", "weights_sha256": "bench", "embed_dim": dim,
                                     "logit_scale": 100.0})
            for start in range(0, tiles, 2048):
                n = min(2048, tiles - start)
                second_tile = rng.uniform(size=n) < f
                x = base + np.where(second_tile[:, None], second, 0) * 0.5 + rng.normal(size=(n, dim))
                w.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
            w.flush()
            slides.append(CohortSlide(f"/nonexistent/{sid}.tif", patient_id=pid))
        frac[pid] = float(np.mean(share))
    record_patients(out, slides)
    pids = sorted(frac)
    f = np.array([frac[p] for p in pids])
    T = rng.exponential(1 / (0.1 * np.exp(4 * f)))
    C = rng.uniform(0, 2 * np.quantile(T, 0.9), len(pids))
    clinical = root / "clinical.csv"
    pd.DataFrame({"patient_id": pids, "time": np.minimum(T, C), "event": (T <= C).astype(int)}).to_csv(
        clinical, index=False)
    return out, clinical


def _stage(name: str, out: str, clinical: str, epochs: int, device: str, q) -> None:
    import torch

    from slide_clip.survival import SurvivalSettings, open_cohort, run_survival, write_pooled_tables

    t0 = time.perf_counter()
    result = {}
    if name == "pooled":
        write_pooled_tables(open_cohort(out))
    else:
        s = SurvivalSettings(baselines=(name,), n_boot=200, name="bench", heatmaps="none", gallery_patients=0,
                             abmil={"epochs": epochs, "device": device, "cache_mb": 0})
        rep = run_survival(out, clinical, "time", "event", settings=s, log=lambda m: None)[name]
        result = {"harrell_mean_over_folds": rep["headline"]["harrell"]["mean"],
                  "uno_mean_over_folds": rep["headline"]["uno"]["mean"]}
    result.update({"stage": name, "seconds": round(time.perf_counter() - t0, 2),
                   "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   "torch_threads": torch.get_num_threads()})
    if device.startswith("cuda") and torch.cuda.is_available():
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    q.put(result)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=300)
    ap.add_argument("--tiles", type=int, default=2000, help="tiles per slide")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stages", default="pooled,coxnet,abmil")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/slideclip-bench-survival"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    out, clinical = make_cohort(a.workdir, a.patients, a.tiles, a.dim)
    n_slides = len(list(out.glob("*.zarr")))
    gib = n_slides * a.tiles * a.dim * 4 / 2**30
    print(f"cohort: {a.patients} patients, {n_slides} slides x {a.tiles} tiles x {a.dim}-d = {gib:.2f} GiB of "
          f"embeddings (written in {time.perf_counter() - t0:.0f} s)", flush=True)
    ctx = mp.get_context("spawn")
    rows = []
    for name in a.stages.split(","):
        q = ctx.Queue()
        p = ctx.Process(target=_stage, args=(name, str(out), str(clinical), a.epochs, a.device, q))
        p.start()
        while True:
            try:
                r = q.get(timeout=5)
                break
            except queue.Empty:
                if not p.is_alive():
                    raise SystemExit(f"stage {name} failed (exit code {p.exitcode})") from None
        p.join()
        rows.append(r)
        print(json.dumps(r), flush=True)
    result = {"machine": {"platform": platform.platform(), "cpus": mp.cpu_count()},
              "cohort": {"patients": a.patients, "slides": n_slides, "tiles_per_slide": a.tiles, "dim": a.dim,
                         "embeddings_gib": round(gib, 3)}, "epochs": a.epochs, "device": a.device, "stages": rows}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
