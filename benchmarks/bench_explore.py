"""Benchmark cohort search: exact streaming search (queries per second, peak memory) and FAISS recall@10.

1. **Cohort.** ``--slides`` stores of ``--tiles`` tiles each (default 100 × 10,240 =
   1,024,000 tiles) of ``--dim``-d embeddings (default 512), written as real slide-clip
   stores (:class:`slide_clip.store.SlideStore`, Zarr v3, Blosc zstd, 2048-row chunks) under
   ``--workdir``, reused by later runs with the same parameters. Embeddings are a seeded
   mixture of 256 Gaussian clusters in the unit sphere (L2-normalised), so neighbours are
   meaningful (``--spread``: the noise's norm around unit centres; 1.0 by default, so a
   tile's neighbours straddle IVF lists); no slide files are needed (search reads only the stores).
2. **Exact search.** :func:`slide_clip.explore.search.search_exact` streams every store
   block by block and keeps the top 10 per query; timed for query batches of several sizes
   (one pass over the stores answers a whole batch). Queries: fresh draws from the same
   mixture. Reported: seconds per pass, queries per second (batch / pass), and the peak
   resident memory of this process (``ru_maxrss``) against the cohort's size.
3. **Approximate search.** :func:`slide_clip.explore.ann.build_index` (FAISS IVF-Flat, inner
   product, ``--nlist`` lists, trained on a seeded sample); recall@10 against the exact
   top 10 and queries per second for several ``nprobe``.

Usage::

    nice .venv/bin/python benchmarks/bench_explore.py                 # 1,024,000 x 512
    .venv/bin/python benchmarks/bench_explore.py --slides 10 --tiles 2048 --json out.json   # a quick check

Timings depend on the machine and on what else runs on it: state both with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np

from slide_clip.store import STATUS_COMPLETE, SlideStore


def mixture(rng, n, centres, spread):
    k, d = centres.shape
    x = centres[rng.integers(0, k, n)] + rng.normal(scale=spread / np.sqrt(d), size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_cohort(workdir: Path, slides: int, tiles: int, dim: int, spread: float, seed: int = 0) -> Path:
    out = workdir / f"cohort-{slides}x{tiles}x{dim}-spread{spread:g}-s{seed}"
    done = out / "complete.json"
    if done.is_file():
        return out
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(256, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    np.save(workdir / f"centres-{dim}-s{seed}.npy", centres)
    side = int(np.ceil(np.sqrt(tiles)))
    prov = {"name": "bench", "arch": "none", "weights_source": "synthetic", "weights_kind": "random",
            "random_weights": True, "weights_sha256": "0" * 64, "checkpoint_sha256": None, "embed_dim": dim,
            "image_size": [224, 224], "precision": "fp32", "logit_scale": 100.0}
    for s in range(slides):
        name = f"slide_{s:04d}"
        st = SlideStore.create(out / f"{name}.zarr", {"name": name, "path": f"/nonexistent/{name}.tif"},
                               {"target_mpp": 0.5, "tile_size": 224})
        rc = np.stack(np.divmod(np.arange(tiles), side), axis=1)
        st.write_tiles(rc[:, ::-1].astype(np.int64) * 224, rc.astype(np.int32), np.ones(tiles, np.float32),
                       {"grid_shape": [side, side], "overlap": 0.0, "tile_extent_level0": [224.0, 224.0],
                        "stride_level0": [224.0, 224.0]})
        w = st.begin_embeddings(prov)
        for a in range(0, tiles, 2048):
            w.append(mixture(rng, min(2048, tiles - a), centres, spread))
        w.flush()
        assert st.group["embeddings/bench"].attrs["status"] == STATUS_COMPLETE
    done.write_text(json.dumps({"slides": slides, "tiles": tiles, "dim": dim}))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides", type=int, default=100)
    ap.add_argument("--tiles", type=int, default=10240)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batches", default="1,16,128", help="query batch sizes of exact search")
    ap.add_argument("--spread", type=float, default=1.0,
                    help="noise around the 256 cluster centres (norm, vs unit centres): larger is harder for IVF")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--nprobe", default="8,32,128")
    ap.add_argument("--recall-queries", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/slideclip-bench-explore"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    from slide_clip.explore import ann
    from slide_clip.explore.cohort import Cohort
    from slide_clip.explore.search import search_exact

    t0 = time.perf_counter()
    out = write_cohort(a.workdir, a.slides, a.tiles, a.dim, a.spread)
    t_write = time.perf_counter() - t0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cohort = Cohort.open([out])
    n = cohort.n_tiles
    centres = np.load(a.workdir / f"centres-{a.dim}-s0.npy")
    rng = np.random.default_rng(1)
    res = {"tiles": n, "dim": a.dim, "spread": a.spread, "nlist": a.nlist, "slides": len(cohort.slides),
           "cohort_gb": n * a.dim * 4 / 1e9,
           "disk_gb": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e9,
           "write_s": round(t_write, 1), "cpus": os.cpu_count(), "exact": [], "faiss": []}
    print(f"cohort: {n} tiles x {a.dim} ({res['cohort_gb']:.2f} GB float32, {res['disk_gb']:.2f} GB on disk), "
          f"{len(cohort.slides)} stores; written/checked in {t_write:.0f} s")
    exact_top = None
    recall_q = mixture(rng, a.recall_queries, centres, a.spread)
    for b in [int(x) for x in a.batches.split(",")]:
        q = mixture(rng, b, centres, a.spread)
        t = time.perf_counter()
        search_exact(cohort, q, top=10)
        dt = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row = {"batch": b, "pass_s": round(dt, 2), "qps": round(b / dt, 2), "peak_rss_mb": round(rss)}
        res["exact"].append(row)
        print(f"exact  batch {b:4d}: {dt:6.2f} s per pass, {b / dt:8.2f} queries/s, peak RSS {rss:.0f} MB "
              f"(before: {rss0:.0f} MB)")
    t = time.perf_counter()
    exact_top = search_exact(cohort, recall_q, top=10)
    res["exact_recall_queries_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    ann.build_index(cohort, nlist=a.nlist, train_size=max(50_000, a.nlist * 40))
    res["faiss_build_s"] = round(time.perf_counter() - t, 1)
    index = ann.load_index(cohort)
    print(f"faiss IVF{a.nlist},Flat built in {res['faiss_build_s']} s")
    off = cohort.offsets
    truth = off[exact_top[1]] + exact_top[2]
    for p in [int(x) for x in a.nprobe.split(",")]:
        t = time.perf_counter()
        s, sl, rw = ann.search_index(cohort, index, recall_q, top=10, nprobe=p)
        dt = time.perf_counter() - t
        got = off[sl] + rw
        recall = np.mean([len(set(g) & set(tr)) / 10 for g, tr in zip(got, truth)])
        res["faiss"].append({"nprobe": p, "recall_at_10": round(float(recall), 4),
                             "qps": round(len(recall_q) / dt, 1)})
        print(f"faiss  nprobe {p:4d}: recall@10 {recall:.4f}, {len(recall_q) / dt:8.1f} queries/s")
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
