"""Tiled JPEG TIFF levels decoded with tifffile + imagecodecs give OpenSlide's pixels exactly.

Real OpenSlide on both sides: the real Aperio SVS (RGB JPEG tiles with JPEG tables) and
synthetic pyramidal TIFFs with YCbCr JPEG tiles; other files stay with OpenSlide.
"""

import numpy as np
import openslide
import pytest

from slide_clip.jpeg_tiff import JpegTiffReader
from slide_clip.reading import open_for_reading, read_tiles
from slide_clip.tiling import make_grid, read_tile
from slide_clip.tissue import _rgba_to_rgb_white


@pytest.fixture(scope="module")
def jpeg_slide(tmp_path_factory):
    from conftest import tissue_scene

    from slide_clip.synthetic import write_slide

    scene = tissue_scene(1500, 1000, 0.5)
    return write_slide(tmp_path_factory.mktemp("jpeg") / "jpeg.tif", scene, 0.5, levels=3, compression="jpeg")


def _pair(path):
    return open_for_reading(str(path)), open_for_reading(str(path), decoder="openslide")


def _regions_equal(fast, ref, level, w, h):
    ds = int(ref.level_downsamples[level])
    lw, lh = ref.level_dimensions[level]
    # inside, across file-tile borders, past the right and bottom edges, before the origin
    for x, y in ((0, 0), (37, 250), (lw - w // 2, lh - h // 3), (-50, -20), (lw // 2, lh // 2)):
        a = np.asarray(fast.read_region((x * ds, y * ds), level, (w, h)).convert("RGB"))
        b = np.asarray(_rgba_to_rgb_white(ref.read_region((x * ds, y * ds), level, (w, h))))
        assert np.array_equal(a, b), (level, x, y)


def _grid(osr, mpp, target_mpp, tile_size=224):
    mask = np.ones((64, 64), bool)
    w, h = osr.dimensions
    return make_grid(osr.dimensions, (mpp, mpp), osr.level_downsamples, mask, (w / 64, h / 64),
                     target_mpp=target_mpp, tile_size=tile_size, min_tissue=0.5)


def test_svs_tiles_identical_to_openslide(cmu_svs):
    fast, ref = _pair(cmu_svs)
    try:
        assert isinstance(fast, JpegTiffReader) and isinstance(ref, openslide.OpenSlide)
        _regions_equal(fast, ref, 0, 700, 300)
        mpp = float(ref.properties["openslide.mpp-x"])
        for target, size in ((0.5, 224), (mpp, 256), (1.0, 224)):  # resized, exact crops, shrunk
            grid = _grid(ref, mpp, target, size)
            assert len(grid) > 0
            a = read_tiles(fast, grid.coords, grid)
            assert np.array_equal(a, read_tiles(ref, grid.coords, grid))
            k = len(grid) // 2
            x, y = map(int, grid.coords[k])
            assert np.array_equal(np.asarray(read_tile(fast, x, y, grid)), a[k])
    finally:
        fast.close()
        ref.close()


def test_synthetic_jpeg_levels_identical_to_openslide(jpeg_slide):
    fast, ref = _pair(jpeg_slide)
    try:
        assert isinstance(fast, JpegTiffReader) and sorted(fast._levels) == [0, 1, 2]
        for level in (0, 1, 2):
            _regions_equal(fast, ref, level, 300, 200)
        # a location off the level's pixel grid goes to OpenSlide: still the same picture
        a = np.asarray(fast.read_region((3, 5), 1, (100, 80)).convert("RGB"))
        assert np.array_equal(a, np.asarray(_rgba_to_rgb_white(ref.read_region((3, 5), 1, (100, 80)))))
        for target in (0.5, 1.0, 2.0, 0.7):  # read levels 0, 1, 2, and level 0 resized
            grid = _grid(ref, 0.5, target)
            assert np.array_equal(read_tiles(fast, grid.coords, grid), read_tiles(ref, grid.coords, grid))
    finally:
        fast.close()
        ref.close()


def test_other_files_stay_with_openslide(make_slide, cmu_dicom):
    from slide_clip.slide import resolve_slide_path

    zlib, _ = make_slide("tissue_0.5", mpp=0.5)
    for path in (zlib, resolve_slide_path(cmu_dicom)):
        osr = open_for_reading(str(path))
        assert isinstance(osr, openslide.OpenSlide), path
        osr.close()


def test_thumbnail_identical_to_openslide_and_leaves_the_handle_open(cmu_svs, jpeg_slide):
    """detect_tissue reads the thumbnail through the fast decoder (bands in several threads,
    a cache of one tile shared by them): the very same picture as OpenSlide's."""
    from types import SimpleNamespace

    from slide_clip.config import load_config
    from slide_clip.stages import _read_thumbnail
    from slide_clip.tissue import read_thumbnail

    class Counting:  # the caller's OpenSlide handle, counting the reads that reach OpenSlide
        def __init__(self, osr):
            self.osr, self.sizes = osr, []

        def __getattr__(self, name):
            return getattr(self.osr, name)

        def read_region(self, location, level, size):
            self.sizes.append(tuple(size))
            return self.osr.read_region(location, level, size)

    cfg = load_config()
    for path in (cmu_svs, jpeg_slide):
        osr = Counting(openslide.OpenSlide(str(path)))
        try:
            info = SimpleNamespace(path=str(path), mpp=0.5)
            fast = _read_thumbnail(osr, info, cfg)
            # OpenSlide read only the file tile per level the reader checks itself with when opened,
            # never the thumbnail's bands (each the level's whole width)
            assert len(osr.sizes) <= len(osr.level_dimensions) and all(max(sz) <= 256 for sz in osr.sizes), \
                (path, osr.sizes)
            ref = read_thumbnail(osr, cfg.tissue.thumbnail_max_side, 0.5)
            assert np.array_equal(fast.image, ref.image) and fast.downsample == ref.downsample, path
            assert fast.image.std() > 10  # a real picture, not a blank
            osr.read_region((0, 0), 0, (8, 8))  # the caller's handle is still open
        finally:
            osr.osr.close()


def test_threads_sharing_a_small_cache_read_the_same_pixels(jpeg_slide):
    from concurrent.futures import ThreadPoolExecutor

    from slide_clip.jpeg_tiff import open_jpeg_tiff

    ref = openslide.OpenSlide(str(jpeg_slide))
    fast = open_jpeg_tiff(openslide.OpenSlide(str(jpeg_slide)), str(jpeg_slide), cache_bytes=300_000)
    try:
        assert isinstance(fast, JpegTiffReader)
        w, h = ref.level_dimensions[0]
        spots = [((x * 97) % (w - 300), (x * 61) % (h - 200)) for x in range(48)]

        def same(xy):
            a = np.asarray(fast.read_region(xy, 0, (300, 200)))
            return np.array_equal(a, np.asarray(_rgba_to_rgb_white(ref.read_region(xy, 0, (300, 200)))))

        with ThreadPoolExecutor(6) as ex:
            assert all(ex.map(same, spots * 3))
        assert fast._cached <= 300_000 or len(fast._cache) == 1
    finally:
        fast.close()
        ref.close()
