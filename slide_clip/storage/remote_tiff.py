"""OpenSlide on a remote tiled TIFF/SVS, reading only the byte ranges it needs.

OpenSlide reads local files only. A remote Aperio SVS or generic pyramidal TIFF is opened
through a :class:`~.mirror.SparseMirror`: a local file of the slide's size that holds

1. every byte a TIFF reader may read before any pixel: the header, every directory (IFD) and
   every tag value of every directory (tile offsets and byte counts, JPEG tables, the image
   description...), listed from the directories themselves (:func:`directory_ranges`), so
   libtiff inside OpenSlide finds exactly the file's bytes;
2. the file tiles of the smallest pyramid level, which OpenSlide hashes into its quickhash
   (the slide's fingerprint) when it opens the file;
3. whatever a pixel read needs, filled just before it: :class:`MirroredSlide` wraps the
   OpenSlide handle, and its ``read_region`` first fetches the file tiles that cover the
   region (one tile more on each side, for OpenSlide's sub-pixel reads); associated images
   (label, macro) fetch their directories' data when read.

So OpenSlide decodes the remote file's own bytes, never a hole, and its pixels and quickhash
are those of the local file (tests/test_storage_slides.py compares them). Levels are read by
the tile reader of :mod:`slide_clip.jpeg_tiff` with ranged GETs (one per run of contiguous
file tiles), and OpenSlide stays the reference for its per-level self-check. Other formats
are staged whole (:mod:`.cache`).
"""

from __future__ import annotations

import collections.abc
import os

from slide_clip.storage.mirror import RemoteFile, SparseMirror, merge_ranges

#: OpenSlide vendors whose every level is a tiled TIFF directory: read by range. Other
#: TIFF-based formats (Philips, Ventana, Leica, NDPI...) keep data elsewhere and are staged.
RANGED_VENDORS = ("aperio", "generic-tiff")

#: Largest smallest level whose tiles are mirrored at open for OpenSlide's quickhash, bytes
#: (OpenSlide hashes the smallest level only when it is small).
QUICKHASH_LIMIT = 32 * 2**20

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_tiff_header(head: bytes) -> bool:
    return head[:4] in _TIFF_MAGIC


def directory_ranges(tif) -> list[tuple[int, int]]:
    """Byte ranges of a TIFF that are not pixel data: the header, every directory and every tag value."""
    fmt = tif.tiff
    header = 16 if fmt.version == 43 else 8
    ranges = [(0, header)]
    for page in tif.pages:
        n = len(page.tags)
        ranges.append((page.offset, page.offset + fmt.tagnosize + n * fmt.tagsize + fmt.offsetsize))
        for tag in page.tags.values():
            ranges.append((tag.valueoffset, tag.valueoffset + tag.valuebytecount))
    return merge_ranges(ranges)


def data_ranges(page, indices=None) -> list[tuple[int, int]]:
    """Byte ranges of a directory's tiles or strips (``indices``: some of them; default all)."""
    offs, counts = page.dataoffsets, page.databytecounts
    idx = range(len(offs)) if indices is None else indices
    return [(int(offs[k]), int(offs[k]) + int(counts[k])) for k in idx if int(counts[k]) > 0]


def level_pages(osr, tif) -> dict | None:
    """OpenSlide level -> the tiled TIFF page holding it, or None if some level has no single such page."""
    tiled = [p for p in tif.pages if p.is_tiled]
    out = {}
    for level, dims in enumerate(osr.level_dimensions):
        match = [p for p in tiled if (p.imagewidth, p.imagelength) == tuple(dims)]
        if len(match) != 1:
            return None
        out[level] = match[0]
    return out


class MirroredSlide:
    """An OpenSlide handle on a :class:`SparseMirror` whose reads fill the bytes they need first.

    Behaves as the OpenSlide handle (``read_region``, ``properties``, ``level_dimensions``...);
    :attr:`remote` counts the bytes received, :attr:`tif` is the tifffile view of the same file.
    """

    def __init__(self, url: str, mirror: SparseMirror, tif, osr, pages: dict):
        self._filename = url
        self.url = url
        self.mirror = mirror
        self.remote = mirror.remote
        self.tif = tif
        self.osr = osr
        self._pages = pages
        levels = {id(p) for p in pages.values()}
        self._other = [p for p in tif.pages if id(p) not in levels]

    def __getattr__(self, name):
        return getattr(self.osr, name)

    def region_ranges(self, location, level: int, size) -> list[tuple[int, int]]:
        """The byte ranges of the file tiles OpenSlide reads for this region (one tile of margin)."""
        page = self._pages[level]
        ds = float(self.osr.level_downsamples[level])
        tw, th = page.tilewidth, page.tilelength
        cols, rows = -(-page.imagewidth // tw), -(-page.imagelength // th)
        lx, ly = location[0] / ds, location[1] / ds
        c0, c1 = max(0, int(lx // tw) - 1), min(cols - 1, int((lx + size[0]) // tw) + 1)
        r0, r1 = max(0, int(ly // th) - 1), min(rows - 1, int((ly + size[1]) // th) + 1)
        if c1 < c0 or r1 < r0:
            return []
        return data_ranges(page, [r * cols + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)])

    def read_region(self, location, level, size):
        self.mirror.ensure(self.region_ranges(location, level, size))
        return self.osr.read_region(location, level, size)

    def get_thumbnail(self, size):
        import openslide

        return openslide.AbstractSlide.get_thumbnail(self, size)

    @property
    def associated_images(self):
        return _Associated(self)

    def fill_other_pages(self) -> None:
        """Fetch the data of every directory that is not a level (label, macro, thumbnail)."""
        self.mirror.ensure([r for p in self._other for r in data_ranges(p)])

    def close(self) -> None:
        try:
            self.osr.close()
        finally:
            try:
                self.tif.close()
            finally:
                self.mirror.close()


class _Associated(collections.abc.Mapping):
    def __init__(self, slide: MirroredSlide):
        self._slide = slide
        self._images = slide.osr.associated_images

    def __getitem__(self, key):
        self._slide.fill_other_pages()
        return self._images[key]

    def __iter__(self):
        return iter(self._images)

    def __len__(self):
        return len(self._images)


def mirror_tiff(url: str, remote: RemoteFile, folder: str | None = None):
    """``(mirror, tif)``: a :class:`SparseMirror` of a remote TIFF holding its header, directories and
    tag values and the smallest level's tiles (OpenSlide's quickhash), and tifffile's view of it."""
    import os

    import tifffile

    mirror = SparseMirror(remote, folder, os.path.splitext(url.rstrip("/"))[1])
    tif = None
    try:
        tif = tifffile.TiffFile(mirror.file(), name=os.path.basename(url))
        mirror.ensure(directory_ranges(tif))
        tiled = [p for p in tif.pages if p.is_tiled]
        if tiled:  # the smallest level: OpenSlide hashes its tiles at open (quickhash-1)
            small = min(tiled, key=lambda p: p.imagewidth * p.imagelength)
            if sum(e - s for s, e in data_ranges(small)) <= QUICKHASH_LIMIT:
                mirror.ensure(data_ranges(small))
        return mirror, tif
    except BaseException:
        if tif is not None:
            tif.close()
        mirror.close()
        raise


class NotRanged(Exception):
    """This remote slide cannot be read by range: read it from a whole local copy (:mod:`.cache`)."""


def mirrored(url: str, mirror: SparseMirror, tif, osr) -> MirroredSlide:
    """``osr`` (OpenSlide on ``mirror.path``) as a :class:`MirroredSlide`; :class:`NotRanged` when a
    level is not a single tiled directory, or OpenSlide hashed a level the mirror does not hold."""
    import openslide

    if osr.properties.get(openslide.PROPERTY_NAME_VENDOR) not in RANGED_VENDORS:
        raise NotRanged(url)
    pages = level_pages(osr, tif)
    if pages is None:
        raise NotRanged(url)
    lowest = pages[len(pages) - 1]
    if openslide.PROPERTY_NAME_QUICKHASH1 in osr.properties and not all(
            mirror.covered(s, e) for s, e in data_ranges(lowest)):
        raise NotRanged(url)  # never a fingerprint hashed from holes
    if openslide.PROPERTY_NAME_QUICKHASH1 not in osr.properties:  # the fallback fingerprint: first, last MiB
        size = mirror.size
        mirror.ensure([(0, 1 << 20), (max(0, size - (1 << 20)), size)])
    handle = MirroredSlide(url, mirror, tif, osr, pages)
    mirror.owned = True  # closed with the handle from now on
    return handle


#: Files that are never read by range: formats whose data is not (only) tiled TIFF directories.
STAGED_SUFFIXES = (".mrxs", ".vms", ".vmu", ".ndpi", ".scn", ".bif", ".svslide", ".dcm", ".dicom", ".isyntax")


def remote_object(url: str) -> RemoteFile | None:
    """The object at ``url``, or None when ``url`` is a folder (a DICOM series)."""
    try:
        return RemoteFile(url)
    except IsADirectoryError:
        return None


def ranged_candidate(url: str, remote: RemoteFile | None) -> bool:
    if remote is None or os.path.splitext(url.lower().rstrip("/"))[1] in STAGED_SUFFIXES:
        return False
    return remote.size >= 8 and is_tiff_header(remote.pread(8, 0))


def needs_staging(url: str) -> bool:
    """Whether ``url`` is read from a whole local copy (not by range)."""
    return not ranged_candidate(url, remote_object(url))
