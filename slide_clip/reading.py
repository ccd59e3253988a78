"""Reading runs of tiles from a slide: one ``read_region`` per strip of a grid row.

:func:`slide_clip.tiling.read_tile` reads one tile at a time. A loader reads a *batch*:
consecutive tiles of the grid, which in row-major order are mostly neighbours in one grid
row. :func:`read_tiles` reads each such run with ONE ``read_region`` of the strip covering
it (at most :data:`MAX_STRIP_PX` wide) and cuts every tile out of the strip with exactly
the crop box and the same PIL resize call as :func:`~slide_clip.tiling.read_tile`, so the
tiles are bit-identical to reading them one by one (tests check this with
``np.array_equal``). Fewer calls into OpenSlide, and a JPEG tile of the file that two
neighbouring grid tiles share is decoded once per strip, not once per grid tile.

Grouping needs exact integer pixel coordinates at the read level (level 0, or a level
whose downsample is an integer): there a crop of a larger region *is* the smaller region.
Elsewhere (a level at a downsample such as 3.9997) OpenSlide's own rounding of each
region's origin could differ, so tiles are read one by one with ``read_tile``.

Coordinate frames: ``coords`` are level-0 pixels (top-left, x then y); strips and crop
boxes are pixels of the read level.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from slide_clip.tiling import TileGrid, level_box, read_tile
from slide_clip.tissue import _rgba_to_rgb_white

#: Widest strip read at once, pixels of the read level (4096 px x 1 tile row of RGBA:
#: ~3.6 MB for 224 px tiles). Wider runs are split.
MAX_STRIP_PX = 4096

#: OpenSlide tile-cache size for loader handles, bytes. OpenSlide's default is 32 MiB per
#: handle; a strip of 4096 px spans 17 JPEG/TIFF tiles of 256 px per file-tile row, and a
#: grid row of 224 px tiles at level 0 straddles two file-tile rows, so the next grid row
#: reuses half of them: 128 MiB keeps several full file-tile rows of a 40,000 px wide level
#: decoded (a 256 x 40,000 RGBA row is ~40 MB).
SLIDE_CACHE_BYTES = 128 * 2**20


def groupable(grid: TileGrid) -> bool:
    """Whether tiles of ``grid`` can be cut from shared strips bit-identically (integer downsample)."""
    return float(grid.read_downsample).is_integer()


def strip_runs(coords: np.ndarray, grid: TileGrid, max_width: int = MAX_STRIP_PX) -> list[tuple[int, int]]:
    """Split ``coords`` (level-0, in grid order) into runs ``[i, j)`` read as one strip each.

    A run holds consecutive tiles with the same y whose level-pixel span (from the first
    tile's left edge to the last one's right edge) is at most ``max_width``, and where the
    gap to the next tile is at most one tile (a skipped background tile is read, not a
    long stretch of glass).
    """
    runs = []
    n = len(coords)
    i = 0
    while i < n:
        ix0, iy0, w0, _, _ = level_box(int(coords[i, 0]), int(coords[i, 1]), grid)
        right = ix0 + w0
        j = i + 1
        while j < n and int(coords[j, 1]) == int(coords[i, 1]):
            ix, _, w, _, _ = level_box(int(coords[j, 0]), int(coords[j, 1]), grid)
            if ix < right - w0 or ix > right + w0 or ix + w - ix0 > max_width:
                break
            right = ix + w
            j += 1
        runs.append((i, j))
        i = j
    return runs


def read_tiles(osr, coords: np.ndarray, grid: TileGrid, *, max_width: int = MAX_STRIP_PX, path=None) -> np.ndarray:
    """Tiles at level-0 ``coords`` as one ``(n, tile_size, tile_size, 3)`` uint8 array.

    Each tile equals ``np.asarray(read_tile(osr, x, y, grid))`` exactly. Corrupt image data is
    a :class:`~slide_clip.errors.SlideError` naming ``path``, the level and where.
    """
    from slide_clip.slide import read_region

    n = len(coords)
    size = grid.tile_size
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    if not groupable(grid):
        for k in range(n):
            out[k] = np.asarray(read_tile(osr, int(coords[k, 0]), int(coords[k, 1]), grid, path))
        return out
    ds = int(grid.read_downsample)
    level = grid.read_level
    for i, j in strip_runs(coords, grid, max_width):
        boxes = [level_box(int(coords[k, 0]), int(coords[k, 1]), grid) for k in range(i, j)]
        sx, sy = boxes[0][0], boxes[0][1]
        sw = boxes[-1][0] + boxes[-1][2] - sx
        sh = max(b[3] for b in boxes)
        strip = _rgba_to_rgb_white(read_region(osr, (sx * ds, sy * ds), level, (sw, sh), path))
        arr = np.asarray(strip)
        for k, (ix, iy, w, h, box) in zip(range(i, j), boxes):
            if box == (0.0, 0.0, float(w), float(h)) and (w, h) == (size, size):
                out[k] = arr[iy - sy: iy - sy + h, ix - sx: ix - sx + w]
            else:  # the same crop and the same resize call as read_tile
                tile = strip.crop((ix - sx, iy - sy, ix - sx + w, iy - sy + h))
                out[k] = np.asarray(tile.resize((size, size), Image.Resampling.BICUBIC, box=box))
    return out


def open_for_reading(path: str, decoder: str = "auto"):
    """A handle for a loader, with a :data:`SLIDE_CACHE_BYTES` tile cache.

    ``decoder`` ``auto``: levels stored as tiled JPEG TIFF pages are decoded with tifffile +
    imagecodecs (:mod:`slide_clip.jpeg_tiff`: faster, the same pixels), everything else by
    OpenSlide; ``openslide``: OpenSlide only.

    ``path`` may be a URL: a tiled TIFF/SVS is then read by byte range (its tiles by ranged GET,
    OpenSlide's self-check on a sparse mirror of the bytes it needs), any other format from the
    local cache (:mod:`slide_clip.storage.remote_slides`).
    """
    import openslide

    from slide_clip.storage.urls import is_url

    source = None
    if is_url(path):
        from slide_clip.jpeg_tiff import RemoteSource
        from slide_clip.slide import resolve_slide_path
        from slide_clip.storage.remote_slides import open_remote_handle

        osr = open_remote_handle(str(path), resolve_slide_path)
        source = RemoteSource(osr) if hasattr(osr, "mirror") else None
    else:
        osr = openslide.OpenSlide(path)
    cache_cls = getattr(openslide, "OpenSlideCache", None)
    if cache_cls is not None:  # openslide-python >= 1.3 with OpenSlide >= 4.0
        try:
            osr.set_cache(cache_cls(SLIDE_CACHE_BYTES))
        except Exception:  # noqa: BLE001 - an older C library: keep the default cache
            pass
    if decoder == "openslide":
        return osr
    from slide_clip.jpeg_tiff import open_jpeg_tiff

    if is_url(path) and source is None:  # a whole local copy: read it as a local file
        return open_jpeg_tiff(osr, osr._filename, SLIDE_CACHE_BYTES)
    return open_jpeg_tiff(osr, path, SLIDE_CACHE_BYTES, source)


def store_tiles(store, coords) -> list[Image.Image]:
    """RGB tiles of a store's grid at level-0 ``coords`` (any rows, any order), read from its
    slide file as embedding read them (with the store's recorded mpp override).

    The one reader of a store's tiles outside the encoder's loader: galleries, maps and the
    survival pictures use it. A slide file that is gone or cannot be opened is a
    :class:`~slide_clip.errors.StoreError` naming the store.
    """
    from slide_clip.errors import SlideClipError, StoreError
    from slide_clip.slide import open_slide
    from slide_clip.stages import grid_from_store

    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if not len(coords):
        return []
    path = store.slide["path"]
    mpp = store.slide.get("mpp_x") if store.slide.get("mpp_source") == "override" else None
    try:
        osr, _ = open_slide(path, mpp)
    except SlideClipError as e:
        raise StoreError(f"its slide file cannot be read ({e})", path=store.path,
                         hint=f"Tiles are read from the slide file: put it back at {path}.") from None
    try:
        tiles = read_tiles(osr, coords, grid_from_store(store), path=path)
    finally:
        osr.close()
    return [Image.fromarray(t) for t in tiles]
