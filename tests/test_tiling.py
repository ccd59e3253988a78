"""Tile grids at an exact physical resolution, and tiles read from real slides."""

import math

import numpy as np
import openslide
import pytest
from PIL import Image

from slide_clip.tiling import choose_read_level, make_grid, read_tile, tile_extent, tissue_fraction


def _full_mask(shape=(100, 150)):
    return np.ones(shape, dtype=bool)


@pytest.mark.parametrize("mpp", [0.25, 0.263, 0.5])
@pytest.mark.parametrize("target,size", [(0.5, 224), (1.0, 256), (0.5, 512)])
def test_extent_and_stride_are_exact(mpp, target, size):
    dims = (20000, 15000)
    grid = make_grid(dims, (mpp, mpp), (1.0, 4.0, 16.0), _full_mask(), (dims[0] / 150, dims[1] / 100),
                     target_mpp=target, tile_size=size, min_tissue=0.5)
    expected = size * target / mpp
    assert grid.extent == (expected, expected)
    assert grid.stride == (expected, expected)
    n_cols = math.floor((dims[0] - expected) / expected) + 1
    n_rows = math.floor((dims[1] - expected) / expected) + 1
    assert grid.shape == (n_rows, n_cols) and len(grid) == n_rows * n_cols
    # coords are the rounded multiples of the exact stride: no drift across the slide
    assert np.all(np.abs(grid.coords[:, 0] - grid.grid[:, 1] * expected) <= 0.5)
    assert np.all(np.abs(grid.coords[:, 1] - grid.grid[:, 0] * expected) <= 0.5)
    # every tile lies inside the slide
    assert np.all(grid.coords[:, 0] + expected <= dims[0] + 0.5)
    assert np.all(grid.coords[:, 1] + expected <= dims[1] + 0.5)


def test_overlap_shrinks_the_stride():
    grid = make_grid((5000, 5000), (0.5, 0.5), (1.0,), _full_mask(), (50, 50), target_mpp=0.5,
                     tile_size=200, overlap=0.25)
    assert grid.extent == (200.0, 200.0) and grid.stride == (150.0, 150.0)
    assert grid.shape[1] == math.floor((5000 - 200) / 150) + 1


def test_read_level_is_coarsest_still_fine_enough():
    ds = (1.0, 2.0, 4.0, 16.0)
    assert choose_read_level(ds, 0.25, 0.5) == 1      # level 1 is exactly 0.5
    assert choose_read_level(ds, 0.25, 0.9) == 1      # level 2 (1.0) is too coarse
    assert choose_read_level(ds, 0.25, 1.0) == 2
    assert choose_read_level(ds, 0.263, 0.5) == 0     # 0.526 at level 1 is coarser than 0.5
    assert choose_read_level(ds, 0.5, 0.5) == 0


def test_tissue_fraction_and_min_tissue():
    mask = np.zeros((100, 100), dtype=bool)
    mask[:, :50] = True  # left half tissue
    ds = (10.0, 10.0)    # level-0 pixels per mask pixel; slide is 1000x1000
    xs = np.array([0, 250, 500, 750])
    ys = np.zeros(4, dtype=int)
    frac = tissue_fraction(mask, ds, xs, ys, (250.0, 250.0))
    assert frac.tolist() == pytest.approx([1.0, 1.0, 0.0, 0.0])
    frac = tissue_fraction(mask, ds, np.array([375]), np.array([0]), (250.0, 250.0))
    assert frac[0] == pytest.approx(0.5, abs=0.05)
    grid = make_grid((1000, 1000), (0.5, 0.5), (1.0,), mask, ds, target_mpp=0.5, tile_size=250, min_tissue=0.5)
    assert set(grid.grid[:, 1].tolist()) == {0, 1}
    assert np.all(grid.tissue_fraction >= 0.5)


def test_no_tissue_gives_zero_tiles():
    grid = make_grid((4000, 3000), (0.5, 0.5), (1.0,), np.zeros((30, 40), bool), (100, 100))
    assert len(grid) == 0 and grid.coords.shape == (0, 2)


def test_read_tile_level0_equals_direct_read(cmu_svs):
    osr = openslide.OpenSlide(str(cmu_svs))
    mpp = float(osr.properties["openslide.mpp-x"])
    # target chosen so the level-0 extent is a whole 448 px: a plain read + resize must agree
    target = 448 * mpp / 224
    grid = make_grid(osr.dimensions, (mpp, mpp), osr.level_downsamples, _full_mask(), (22.2, 29.67),
                     target_mpp=target, tile_size=224)
    assert grid.extent[0] == pytest.approx(448.0)
    x, y = (int(v) for v in grid.coords[7])
    tile = read_tile(osr, x, y, grid)
    direct = osr.read_region((x, y), 0, (448, 448)).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
    assert tile.size == (224, 224)
    assert np.abs(np.asarray(tile, int) - np.asarray(direct, int)).max() <= 1
    osr.close()


def test_read_tile_from_a_reduced_level_shows_the_same_place(make_slide):
    """A tile read from level 1 (target 2x the slide's mpp) matches the level-0 read shrunk."""
    path, scene = make_slide("tissue_0.25", mpp=0.25)
    osr = openslide.OpenSlide(str(path))
    grid = make_grid(osr.dimensions, (0.25, 0.25), osr.level_downsamples, _full_mask(), (40, 40),
                     target_mpp=0.5, tile_size=128)
    assert grid.read_level == 1 and grid.extent == (256.0, 256.0)
    x, y = 1024, 1024
    tile = np.asarray(read_tile(osr, x, y, grid), float)
    ref = np.asarray(osr.read_region((x, y), 0, (256, 256)).convert("RGB")
                     .resize((128, 128), Image.Resampling.BOX), float)
    assert tile.shape == (128, 128, 3)
    assert np.abs(tile.mean((0, 1)) - ref.mean((0, 1))).max() < 8  # same colours: same place
    osr.close()


def test_tile_extent_formula():
    assert tile_extent(224, 0.5, 0.263) == 224 * 0.5 / 0.263
