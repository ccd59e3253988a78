"""Tile readers: slide-clip's ``ReaderPool`` against torch's ``DataLoader``, slide after slide.

Issue 21 asks whether, once the executor is the pool's only consumer, torch's ``DataLoader``
(worker processes, ``prefetch_factor``, ``persistent_workers``) can replace the hand-built
``ReaderPool``. Both read the same batches (:class:`slide_clip.loader.TileJob`, read by
:func:`slide_clip.loader.read_batch`, each worker keeping its slide handles open) of a cohort
of synthetic JPEG slides, with the same number of worker processes started the same way
(:func:`slide_clip.loader.worker_context`). The consumer does nothing but take the batches,
so the numbers are the readers' own.

Modes:

* ``pool``: one ``ReaderPool`` for the run; slide k+1's batches are queued while slide k's are
  read (as the executor's look-ahead does), so the workers go from one slide to the next;
* ``dataloader-per-slide``: one ``DataLoader`` per slide (the executor learns its slides one by
  one; a ``DataLoader``'s dataset is fixed when its workers start, so persistent workers do
  not carry over to the next slide): workers start, and the prefetch fills, again per slide;
* ``dataloader-cohort``: one persistent ``DataLoader`` over every slide's batches, known before
  the run starts: the best a ``DataLoader`` can do, but it needs the whole cohort's grids
  (every slide's tissue detection) before the first tile is read.

Reported per mode: tiles/s over the run, the time to the first batch, and the gap between a
slide's last batch and the next slide's first (median, max). Results are printed as JSON
(``--json`` writes them too); docs/BENCHMARKS.md records them with the machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_datapath as bd  # noqa: E402 - synthetic JPEG slides, the pipeline's grid
import bench_embed as be  # noqa: E402 - machine info

_HANDLES: collections.OrderedDict = collections.OrderedDict()  # a DataLoader worker's open slides


class JobDataset:
    """A map-style dataset of whole batches (``batch_size=None`` in the DataLoader)."""

    def __init__(self, jobs):
        self.jobs = jobs

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, k):
        from slide_clip.loader import read_batch

        return read_batch(self.jobs[k], _HANDLES)


def cohort(work: Path, n: int, tiles: tuple[int, int]) -> list[Path]:
    cx, cy = tiles
    cw, ch = (9 + cx + 2) * be.TILE_L0, (7 + cy + 2) * be.TILE_L0
    return [bd.make_jpeg_slide(work, cw, ch, cx, cy, f"loader_t{cx}x{cy}/s{k:03d}") for k in range(n)]


def _jobs(slides, grids, batch_size):
    import itertools

    from slide_clip.loader import _jobs as loader_jobs

    ids = itertools.count()
    return [loader_jobs(str(s), g, 0, batch_size, None, ids) for s, g in zip(slides, grids)]


def _timeline(batches_per_slide, next_batch) -> dict:
    """Take every batch in order; (tiles/s, first batch s, gaps between slides)."""
    t0 = time.perf_counter()
    first = None
    tiles = 0
    gaps, last_end = [], None
    for n_batches in batches_per_slide:
        for b in range(n_batches):
            idx, _ = next_batch()
            now = time.perf_counter()
            if first is None:
                first = now - t0
            if b == 0 and last_end is not None:
                gaps.append(now - last_end)
            tiles += len(idx)
        last_end = time.perf_counter()
    wall = time.perf_counter() - t0
    return {"tiles": tiles, "wall_s": round(wall, 3), "tiles_per_s": round(tiles / wall, 1),
            "first_batch_s": round(first, 3),
            "gap_between_slides_median_s": round(statistics.median(gaps), 4) if gaps else None,
            "gap_between_slides_max_s": round(max(gaps), 4) if gaps else None}


def mode_pool(jobs, workers, prefetch) -> dict:
    from slide_clip.loader import ReaderPool, TileStream

    with ReaderPool(workers, prefetch=prefetch) as pool:
        def batches():
            streams = [TileStream(jobs[0], pool)]
            for k in range(len(jobs)):
                if k + 1 < len(jobs):  # the look-ahead: the next slide queued behind this one
                    streams.append(TileStream(jobs[k + 1], pool))
                yield from streams[k]

        it = batches()
        return _timeline([len(j) for j in jobs], lambda: next(it))


def _loader(jobs, workers, prefetch, persistent):
    from torch.utils.data import DataLoader

    from slide_clip.loader import worker_context

    return DataLoader(JobDataset(jobs), batch_size=None, shuffle=False, num_workers=workers,
                      prefetch_factor=prefetch, persistent_workers=persistent,
                      multiprocessing_context=worker_context())


def mode_dataloader_per_slide(jobs, workers, prefetch) -> dict:
    state = {"k": -1, "it": None}

    def next_batch():
        while True:
            if state["it"] is not None:
                try:
                    return next(state["it"])
                except StopIteration:
                    pass
            state["k"] += 1
            state["it"] = iter(_loader(jobs[state["k"]], workers, prefetch, persistent=False))

    return _timeline([len(j) for j in jobs], next_batch)


def mode_dataloader_cohort(jobs, workers, prefetch) -> dict:
    it = iter(_loader([j for js in jobs for j in js], workers, prefetch, persistent=True))
    return _timeline([len(j) for j in jobs], lambda: next(it))


MODES = {"pool": mode_pool, "dataloader-per-slide": mode_dataloader_per_slide,
         "dataloader-cohort": mode_dataloader_cohort}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/slideclip-bench-loader"))
    ap.add_argument("--slides", type=int, default=12)
    ap.add_argument("--tiles", default="8x6", help="tissue block of each slide, tiles")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=4, help="batches per worker read ahead (both readers)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    slides = cohort(a.workdir, a.slides, tuple(map(int, a.tiles.split("x"))))
    grids = [bd._grid_of(s) for s in slides]
    jobs = _jobs(slides, grids, a.batch_size)
    res: dict = {"machine": be.machine_info(a.workers), "load_before": os.getloadavg(),
                 "args": {k: str(v) for k, v in vars(a).items()},
                 "tiles_per_slide": [len(g.coords) for g in grids][:3]}
    for mode in a.modes.split(","):
        runs = [MODES[mode](jobs, a.workers, a.prefetch) for _ in range(a.repeats)]
        best = max(runs, key=lambda r: r["tiles_per_s"])
        res[mode] = {**best, "runs_tiles_per_s": [r["tiles_per_s"] for r in runs]}
        print(mode, json.dumps(res[mode]), flush=True)
    res["load_after"] = os.getloadavg()
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
