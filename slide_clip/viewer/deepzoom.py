"""Deep Zoom tiles of a slide, read by the pipeline's own reader.

The tile geometry (levels, tile boxes, which slide level serves a zoom level) is OpenSlide's
own :class:`openslide.deepzoom.DeepZoomGenerator`; the pixels come from the handle the
encoder's loader reads with (:func:`slide_clip.reading.open_for_reading`): tiled JPEG
TIFF/SVS levels decoded by tifffile + imagecodecs (bit-identical to OpenSlide's, checked
per level when the handle opens), everything else (DICOM, MIRAX, NDPI, ...) by OpenSlide.
Each tile is then composited and scaled with the same calls as ``DeepZoomGenerator.get_tile``,
so a tile equals OpenSlide's Deep Zoom tile pixel for pixel (tested), only decoded faster.

Frames: a Deep Zoom level ``L`` is the slide at ``2 ** (levels - 1 - L)`` level-0 pixels per
pixel; a tile is addressed by its column and row in that level.
"""

from __future__ import annotations

import collections
import io
import threading
from pathlib import Path

import openslide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from slide_clip.errors import SlideClipError, SlideError
from slide_clip.loader import file_key
from slide_clip.reading import open_for_reading
from slide_clip.slide import resolve_slide_path
from slide_clip.storage.urls import is_url

#: Deep Zoom tile side and overlap, pixels (254 + 2 x 1 = 256, OpenSlide's defaults).
TILE_SIZE = 254
OVERLAP = 1
#: JPEG quality of served tiles.
JPEG_QUALITY = 90
#: Encoded tiles kept in memory, bytes (least recently used dropped first).
TILE_CACHE_BYTES = 64 * 2**20
#: Slides kept open at once.
OPEN_SLIDES = 8


class TileAddressError(SlideClipError):
    """A Deep Zoom level or tile address outside the slide."""


class DeepZoomSlide:
    """One open slide as Deep Zoom levels.

    Parameters
    ----------
    path : str or Path
        The slide file (or a DICOM series folder), as the store recorded it.
    """

    def __init__(self, path: str | Path, tile_size: int = TILE_SIZE, overlap: int = OVERLAP):
        # a URL is read as the encoder's loader reads it (by byte range, or from the local cache)
        file = str(path) if is_url(path) else str(resolve_slide_path(path))
        try:
            self.reader = open_for_reading(file)
        except openslide.OpenSlideError as e:
            raise SlideError(f"cannot be opened to view ({e})", path=path) from None
        self.dz = DeepZoomGenerator(self.reader, tile_size, overlap, limit_bounds=False)
        self.background = "#" + self.reader.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "ffffff")
        self.path = str(path)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 width and height, pixels."""
        return tuple(self.dz.level_dimensions[-1])

    def dzi(self) -> str:
        """The ``.dzi`` XML (JPEG tiles)."""
        return self.dz.get_dzi("jpeg")

    def tile(self, level: int, col: int, row: int) -> Image.Image:
        """The RGB tile at ``(col, row)`` of Deep Zoom ``level``, equal to OpenSlide's ``get_tile``."""
        try:
            args = self.dz.get_tile_coordinates(level, (col, row))
            size = self.dz.get_tile_dimensions(level, (col, row))
        except ValueError as e:
            raise TileAddressError(f"no Deep Zoom tile {level}/{col}_{row} ({e})", path=self.path) from None
        tile = self.reader.read_region(*args)
        if tile.mode == "RGBA":  # OpenSlide's regions: transparent where unscanned, as get_tile does
            bg = Image.new("RGB", tile.size, self.background)
            tile = Image.composite(tile, bg, tile)
        elif tile.mode != "RGB":
            tile = tile.convert("RGB")
        if tile.size != size:
            tile.thumbnail(size, Image.Resampling.LANCZOS)
        return tile

    def close(self) -> None:
        self.reader.close()


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "jpeg", quality=quality)
    return buf.getvalue()


class SlidePool:
    """Open :class:`DeepZoomSlide` handles (an LRU of :data:`OPEN_SLIDES`) and an LRU of encoded tiles.

    Handles are keyed by path and file identity (the loader's :func:`~slide_clip.loader.file_key`:
    a local file's inode, size and mtime, a URL's size and ETag), so a replaced file is reopened.
    Safe to use from several threads (the server's worker threads).
    """

    def __init__(self, open_slides: int = OPEN_SLIDES, cache_bytes: int = TILE_CACHE_BYTES):
        self._slides: collections.OrderedDict = collections.OrderedDict()
        self._tiles: collections.OrderedDict = collections.OrderedDict()
        self._open_slides, self._cache_bytes, self._cached = open_slides, cache_bytes, 0
        self._lock = threading.Lock()
        self._opening: dict = {}

    @staticmethod
    def _key(path: str) -> tuple:
        return file_key(path)

    def slide(self, path: str) -> DeepZoomSlide:
        key = self._key(path)
        with self._lock:
            s = self._slides.get(key)
            if s is not None:
                self._slides.move_to_end(key)
                return s
            gate = self._opening.setdefault(key, threading.Lock())
        with gate:  # one thread opens a slide; the others wait for it
            with self._lock:
                s = self._slides.get(key)
            if s is None:
                s = DeepZoomSlide(path)
                with self._lock:
                    self._slides[key] = s
                    while len(self._slides) > self._open_slides:
                        _, old = self._slides.popitem(last=False)
                        old.close()
                    self._opening.pop(key, None)
        return s

    def jpeg(self, path: str, level: int, col: int, row: int) -> bytes:
        """The encoded JPEG tile, from the cache or read now."""
        key = (self._key(path), level, col, row)
        with self._lock:
            data = self._tiles.get(key)
            if data is not None:
                self._tiles.move_to_end(key)
                return data
        data = encode_jpeg(self.slide(path).tile(level, col, row))
        with self._lock:
            if key not in self._tiles:
                self._tiles[key] = data
                self._cached += len(data)
            while self._cached > self._cache_bytes and len(self._tiles) > 1:
                _, old = self._tiles.popitem(last=False)
                self._cached -= len(old)
        return data

    def close(self) -> None:
        with self._lock:
            for s in self._slides.values():
                s.close()
            self._slides.clear()
            self._tiles.clear()
            self._cached = 0
