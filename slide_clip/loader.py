"""Batches of preprocessed tiles from a slide, read in DataLoader worker processes.

Each worker opens the slide once (lazily, in the worker) and keeps the handle; only paths
and small arrays cross process boundaries.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from slide_clip.tiling import TileGrid, read_tile


class TileDataset(Dataset):
    """Tiles ``start:`` of a grid, as (index, preprocessed tensor) pairs."""

    def __init__(self, slide_file: str, grid: TileGrid, preprocess: Callable, start: int = 0):
        self.slide_file = slide_file
        self.grid = grid
        self.coords = np.asarray(grid.coords[start:])
        self.start = start
        self.preprocess = preprocess
        self._osr = None

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def _slide(self):
        if self._osr is None:
            import openslide

            self._osr = openslide.OpenSlide(self.slide_file)
        return self._osr

    def __getitem__(self, i: int):
        x, y = self.coords[i]
        tile = read_tile(self._slide(), int(x), int(y), self.grid)
        return self.start + i, self.preprocess(tile)

    def __getstate__(self):  # never pickle an open slide handle
        state = self.__dict__.copy()
        state["_osr"] = None
        return state


def make_loader(
    slide_file: str,
    grid: TileGrid,
    preprocess: Callable,
    *,
    start: int = 0,
    batch_size: int = 64,
    num_workers: int = 2,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over tiles ``start:`` in grid order (never shuffled: rows follow tiles)."""
    ds = TileDataset(slide_file, grid, preprocess, start)
    kwargs = {}
    if num_workers > 0:
        kwargs = {"persistent_workers": False, "prefetch_factor": 4,
                  "multiprocessing_context": worker_context()}
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, **kwargs)


def resolve_workers(num_workers, device) -> int:
    """Loader worker processes for ``num_workers`` (an int, or ``"auto"``) on ``device``.

    ``auto`` reads tiles in the calling process on a CPU: there the model costs ~40x more
    than reading and preprocessing a tile, and a worker process would preempt torch's own
    threads (measured in docs/BENCHMARKS.md). On a GPU, decoding dominates: ``min(8,
    cores - 1)`` workers.
    """
    import os

    if num_workers != "auto":
        return int(num_workers)
    if getattr(device, "type", str(device)) == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def worker_context():
    """How loader workers start: a fork server on Linux, ``spawn`` elsewhere.

    Workers are never forked from the calling process itself: it runs other threads (Zarr's
    I/O loop, an orchestrator's event loop, thread pools) and holds file locks, and a forked
    child would inherit both. The fork server imports torch and OpenSlide once, so workers
    forked from it start in a fraction of a second; :func:`start_worker_server` starts it
    early so that import overlaps other work.
    """
    import multiprocessing as mp
    import sys

    if not sys.platform.startswith("linux"):
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchvision", "openslide", "slide_clip.loader"])
    return ctx


def start_worker_server(num_workers: int) -> None:
    """Start the fork server in the background (no wait) if loader workers will be needed."""
    if num_workers > 0:
        ctx = worker_context()
        if ctx.get_start_method() == "forkserver":
            from multiprocessing import forkserver

            forkserver.ensure_running()
