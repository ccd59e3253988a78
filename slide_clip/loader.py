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
                  "multiprocessing_context": "fork" if _fork_ok() else "spawn"}
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, **kwargs)


def _fork_ok() -> bool:
    import sys

    return sys.platform.startswith("linux") and not torch.cuda.is_initialized()
