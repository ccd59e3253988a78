"""Tile reading from tiled JPEG TIFF levels with tifffile + imagecodecs, bit-identical to OpenSlide.

A loader's reads are ``read_region`` calls at one pyramid level (:mod:`slide_clip.reading`).
Where that level is a tiled, JPEG-compressed TIFF page (generic pyramidal TIFFs, Aperio SVS),
:class:`JpegTiffReader` decodes the file's JPEG tiles itself with tifffile's codec call
(libjpeg-turbo through imagecodecs, the file's JPEG tables included) and pastes them into the
region, instead of going through OpenSlide's ``read_region`` (RGBA, premultiplied, then
composited back to RGB). Measured faster at the same pixels (docs/BENCHMARKS.md, "codec"); the
pixels are checked against OpenSlide's by tests/test_jpeg_tiff.py on the real SVS and on
synthetic JPEG TIFFs.

Every other read goes to the OpenSlide handle it wraps: other formats (DICOM, MIRAX, ...),
other compressions (JPEG 2000, LZW, ...), levels whose downsample is not a whole number or
whose size differs from the TIFF page's, sparse pages (missing tiles), and any region whose
origin is not on the level's pixel grid. When a handle is opened, one file tile of each level
is decoded both ways, and a level whose pixels differ from OpenSlide's stays with OpenSlide
(a JPEG flavour this decoder would read differently). Without imagecodecs, every read does.

The file's bytes come from a *source*: :class:`LocalSource` (``os.pread`` on the file) or, for a
slide at a URL, :class:`RemoteSource` (ranged GETs: the file tiles a region needs that are not
in the cache are fetched together, contiguous tiles in one request; never the whole file).
"""

from __future__ import annotations

import collections
import os
import threading

import numpy as np
from PIL import Image

#: TIFF compression tag value of JPEG ("new-style", as tifffile reports it).
_JPEG = 7


class JpegTiffReader:
    """An OpenSlide handle whose ``read_region`` decodes tiled JPEG TIFF levels itself.

    ``levels`` maps OpenSlide level -> tifffile page served here; ``cache_bytes`` bounds the
    decoded tiles kept (least recently used dropped first), like OpenSlide's tile cache.
    """

    def __init__(self, osr, source, levels: dict, tif, cache_bytes: int):
        self.osr = osr
        self._tif = tif
        self._levels = levels
        self._source = source
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._lock = threading.Lock()  # the cache is shared by threads (the thumbnail reads bands in several)

    # the rest of the OpenSlide interface, for callers that need it
    def __getattr__(self, name):
        return getattr(self.osr, name)

    def read_region(self, location, level, size):
        page = self._levels.get(level)
        ds = int(self.osr.level_downsamples[level]) if page is not None else 0
        x, y = int(location[0]), int(location[1])
        if page is None or x % ds or y % ds:
            return self.osr.read_region(location, level, size)
        return Image.fromarray(self._region(level, page, x // ds, y // ds, int(size[0]), int(size[1])), "RGB")

    def _region(self, level: int, page, x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, np.uint8)  # outside the image: white, as OpenSlide's transparent
        pw, ph, tw, th = page.imagewidth, page.imagelength, page.tilewidth, page.tilelength
        cols = -(-pw // tw)
        x0, y0, x1, y1 = max(0, x), max(0, y), min(pw, x + w), min(ph, y + h)
        cells = [(r, c) for r in (range(y0 // th, -(-y1 // th)) if y1 > y0 else ())
                 for c in (range(x0 // tw, -(-x1 // tw)) if x1 > x0 else ())]
        data = self._fetch(level, page, [r * cols + c for r, c in cells])
        for r, c in cells:
            tile = self._tile(level, page, r * cols + c, data.get(r * cols + c))
            ty, tx = r * th, c * tw
            a0, a1, b0, b1 = max(y0, ty), min(y1, ty + th), max(x0, tx), min(x1, tx + tw)
            out[a0 - y:a1 - y, b0 - x:b1 - x] = tile[a0 - ty:a1 - ty, b0 - tx:b1 - tx, :3]
        return out

    def _fetch(self, level: int, page, ks: list[int]) -> dict:
        """The file bytes of the tiles ``ks`` not in the cache, read together (one call to the source)."""
        with self._lock:
            need = [k for k in ks if (level, k) not in self._cache]
        if len(need) < 2:
            return {}
        ranges = [(int(page.dataoffsets[k]), int(page.dataoffsets[k]) + int(page.databytecounts[k])) for k in need]
        return dict(zip(need, self._source.pread_many(ranges)))

    def _tile(self, level: int, page, k: int, data: bytes | None = None) -> np.ndarray:
        key = (level, k)
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
        if data is None:
            data = self._source.pread(int(page.databytecounts[k]), int(page.dataoffsets[k]))
        try:
            tile = page.decode(data, k, jpegtables=page.jpegtables)[0][0]  # outside the lock: decodes in parallel
        except Exception as e:  # corrupt data: say which file tile (slide.read_region reports it)
            r, c = divmod(k, -(-page.imagewidth // page.tilewidth))
            ds = self.osr.level_downsamples[level]
            e.tile_origin = (round(c * page.tilewidth * ds), round(r * page.tilelength * ds))
            raise
        with self._lock:
            if key not in self._cache:
                self._cache[key] = tile
                self._cached += tile.nbytes
            while self._cached > self._cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.nbytes
        return tile

    def release(self) -> None:
        """Close this reader's own file handles, leaving the wrapped OpenSlide handle open."""
        try:
            self._source.close()
        finally:
            self._tif.close()

    def close(self) -> None:
        try:
            self.release()
        finally:
            self.osr.close()


def jpeg_levels(osr, tif) -> dict:
    """OpenSlide levels of ``osr`` that are tiled RGB JPEG pages of ``tif``, decodable here."""
    try:
        import imagecodecs  # noqa: F401 - tifffile's JPEG codec
    except ImportError:
        return {}
    vendor = osr.properties.get("openslide.vendor")
    if vendor not in ("generic-tiff", "aperio"):
        return {}
    levels = {}
    pages = [p for p in tif.pages if p.is_tiled]
    for level, (dims, ds) in enumerate(zip(osr.level_dimensions, osr.level_downsamples)):
        if not float(ds).is_integer():
            continue
        match = [p for p in pages if (p.imagewidth, p.imagelength) == tuple(dims)]
        if len(match) != 1:
            continue
        p = match[0]
        if (p.compression == _JPEG and p.samplesperpixel == 3 and p.bitspersample == 8
                and p.planarconfig == 1 and p.photometric in (2, 6) and p.imagedepth == 1
                and len(p.dataoffsets) == -(-p.imagewidth // p.tilewidth) * -(-p.imagelength // p.tilelength)
                and all(int(n) > 0 for n in p.databytecounts)):
            levels[level] = p
    return levels


class LocalSource:
    """A local file's bytes: ``os.pread``."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)

    def open_tiff(self):
        import tifffile

        return tifffile.TiffFile(self.path)

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def pread_many(self, ranges) -> list[bytes]:
        return [os.pread(self._fd, e - s, s) for s, e in ranges]

    def close(self) -> None:
        os.close(self._fd)


class RemoteSource:
    """A remote slide's bytes (a :class:`~slide_clip.storage.remote_tiff.MirroredSlide`'s): its
    header from the sparse mirror, tiles by ranged GET (:class:`~slide_clip.storage.mirror.RemoteFile`)."""

    def __init__(self, handle):
        self._handle = handle
        self.remote = handle.remote

    def open_tiff(self):
        import tifffile

        return tifffile.TiffFile(self._handle.mirror.file(), name=os.path.basename(self._handle.url))

    def pread(self, size: int, offset: int) -> bytes:
        return self.remote.pread(size, offset)

    def pread_many(self, ranges) -> list[bytes]:
        return self.remote.pread_many(ranges)

    def close(self) -> None:
        pass  # the mirror belongs to the OpenSlide handle, closed with it


def open_jpeg_tiff(osr, path: str, cache_bytes: int, source=None):
    """``osr`` wrapped in a :class:`JpegTiffReader` when some of its levels are tiled JPEG
    TIFF pages tifffile decodes; else ``osr`` itself. ``source``: where the file's bytes come
    from (default: the local file ``path``)."""
    try:
        source = source or LocalSource(path)
    except OSError:
        return osr
    try:
        tif = source.open_tiff()
    except Exception:  # noqa: BLE001 - not a TIFF, or tifffile cannot parse it: OpenSlide reads it
        source.close()
        return osr
    try:
        levels = jpeg_levels(osr, tif)
    except Exception:  # noqa: BLE001 - an odd TIFF: OpenSlide reads it
        levels = {}
    reader = JpegTiffReader(osr, source, levels, tif, cache_bytes) if levels else None
    for level in list(levels):
        if not _agrees(reader, level):  # a JPEG flavour decoded differently here: OpenSlide reads it
            del levels[level]
    if reader is not None:
        reader._cache.clear()
        reader._cached = 0
    if not levels:
        source.close()
        tif.close()
        return osr
    return reader


def _agrees(reader: JpegTiffReader, level: int) -> bool:
    """Whether one file tile of ``level`` (the middle one) decodes to OpenSlide's pixels."""
    from slide_clip.tissue import _rgba_to_rgb_white

    page = reader._levels[level]
    ds = int(reader.osr.level_downsamples[level])
    cols, rows = -(-page.imagewidth // page.tilewidth), -(-page.imagelength // page.tilelength)
    x, y = (cols // 2) * page.tilewidth, (rows // 2) * page.tilelength
    w, h = min(page.tilewidth, page.imagewidth - x), min(page.tilelength, page.imagelength - y)
    try:
        ours = reader._region(level, page, x, y, w, h)
    except Exception:  # noqa: BLE001 - tifffile cannot decode it: OpenSlide reads it
        return False
    theirs = np.asarray(_rgba_to_rgb_white(reader.osr.read_region((x * ds, y * ds), level, (w, h))))
    return bool(np.array_equal(ours, theirs))
