"""Opening whole-slide images and describing them.

Everything OpenSlide reads is accepted: Aperio SVS, generic tiled TIFF, DICOM WSI (a folder
or any file of the series), Hamamatsu, MIRAX, Philips, Leica, Ventana and the rest. Every
failure for a user's bad input is a :class:`~slide_clip.errors.SlideError` naming the file.

Resolution is in micrometres per level-0 pixel (µm/px, "mpp"). It comes from the slide's
metadata unless the caller gives an override; where it came from is recorded.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import openslide

from slide_clip.errors import MppError, SlideError

#: Possible range of a scan's level-0 resolution, µm/px: a real scan may be coarse (a DICOM
#: overview at 30 µm/px), but nothing outside this range is a microscope scan.
MPP_RANGE = (0.05, 80.0)

#: Resolutions image writers put in files by default (72, 96, 150, 300 dpi), µm/px: never a scan.
DPI_DEFAULTS = {dpi: 25400.0 / dpi for dpi in (72, 96, 100, 150, 200, 300, 600)}

#: A slide whose level 0 is coarser than the target by more than this factor would need its
#: tiles upsampled: the result no longer shows the tissue at the target resolution.
MAX_UPSAMPLE = 1.25

_DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass(frozen=True)
class SlideInfo:
    """What a slide is, as OpenSlide reports it (level-0 pixels unless stated)."""

    path: str
    name: str
    vendor: str
    width: int
    height: int
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float | None
    mpp_y: float | None
    mpp_source: str  # "metadata", "override" or "missing"
    objective_power: float | None
    fingerprint: str
    associated_images: tuple[str, ...] = field(default=())

    @property
    def mpp(self) -> float | None:
        """Mean of mpp x and y, µm per level-0 pixel."""
        if self.mpp_x is None or self.mpp_y is None:
            return None
        return (self.mpp_x + self.mpp_y) / 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["level_dimensions"] = [list(x) for x in self.level_dimensions]
        d["level_downsamples"] = list(self.level_downsamples)
        d["associated_images"] = list(self.associated_images)
        return d


def slide_id(path: str | Path) -> str:
    """A slide's own name: its file name without extension (a DICOM series folder's name).

    A single DICOM file (one series among others in its folder) is named after the file,
    never after its folder. Ids unique within an output folder are assigned from these by
    :func:`slide_clip.slide_ids.assign_slide_ids`. A URL is named by its last component (a
    URL ending in ``/`` is a folder: a DICOM series).
    """
    from slide_clip.storage.urls import is_url, url_name

    if is_url(path):
        if str(path).endswith("/"):
            return url_name(path)
        name = url_name(path)
        for suffix in (".ome.tiff", ".ome.tif"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return Path(name).stem
    p = Path(path)
    if p.is_dir():
        return p.name
    name = p.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


def resolve_slide_path(path: str | Path) -> Path:
    """The file OpenSlide should open for ``path``.

    A DICOM WSI series is a folder of instances: a folder resolves to its largest
    ``.dcm`` file (OpenSlide finds the rest of the series beside it).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SlideError("no such file or folder", path=p, hint="Check the path.")
    if p.is_dir():
        dcms = [f for f in p.iterdir() if f.is_file() and f.suffix.lower() in _DICOM_SUFFIXES]
        if not dcms:
            raise SlideError(
                "is a folder without DICOM (.dcm) files",
                path=p,
                hint="Give a slide file, or a folder holding one DICOM WSI series.",
            )
        series = dicom_series(p)
        if len(series) > 1:
            raise SlideError(
                f"is a folder holding {len(series)} DICOM series, not one slide", path=p,
                hint="Give the folder to `embed`/`run` as a folder of slides (each series is a slide), "
                     "or give one .dcm file of the series you want.")
        return max(dcms, key=lambda f: f.stat().st_size)
    return p


def _dicom_series_uid(file: Path) -> str | None:
    """The SeriesInstanceUID of a DICOM file (header only), or None if it has none or is unreadable."""
    import pydicom

    try:
        ds = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except Exception:  # noqa: BLE001 - truncated or not DICOM: its own slide, with its own error
        return None
    uid = ds.get("SeriesInstanceUID")
    return str(uid) if uid else None


def dicom_series(folder: Path) -> dict[str, list[Path]]:
    """The DICOM files directly in ``folder`` grouped by SeriesInstanceUID (sorted by name).

    A file without a readable SeriesInstanceUID is a group of its own (keyed by its name),
    so it is reported as its own slide with its own error.
    """
    groups: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in _DICOM_SUFFIXES:
            uid = _dicom_series_uid(f)
            groups.setdefault(uid or f"file:{f.name}", []).append(f)
    return groups


def _float_prop(props, key) -> float | None:
    try:
        v = float(props[key])
    except (KeyError, ValueError, TypeError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _fingerprint(osr: openslide.OpenSlide, file: Path) -> str:
    """A stable identity of the slide's pixels.

    OpenSlide's quickhash-1 (a hash of the slide's smallest level and metadata) where the
    format provides one; otherwise a sha256 of the file's size and first and last MiB.
    """
    qh = osr.properties.get(openslide.PROPERTY_NAME_QUICKHASH1)
    if qh:
        return f"quickhash1:{qh}"
    h = hashlib.sha256()
    size = file.stat().st_size
    h.update(str(size).encode())
    with open(file, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 1 << 20:
            f.seek(max(size - (1 << 20), 0))
            h.update(f.read())
    return f"sha256-ends:{h.hexdigest()}"


def open_slide(
    path: str | Path, mpp_override: float | None = None
) -> tuple[openslide.OpenSlide, SlideInfo]:
    """Open a whole-slide image and describe it.

    Parameters
    ----------
    path
        A slide file, or a folder holding one DICOM WSI series.
    mpp_override
        Level-0 resolution in µm/px to use instead of the slide's metadata (both axes).

    Returns
    -------
    The open OpenSlide handle (the caller closes it) and the slide's :class:`SlideInfo`.
    The mpp is not checked here; :func:`check_mpp` does that against a target.

    A URL (``s3://``, ``gs://``, ``az://``, ``https://``) is opened by
    :mod:`slide_clip.storage.remote_slides`: tiled TIFF/SVS by byte range, other formats from a
    local copy; the same checks run, and the :class:`SlideInfo` is the local file's with the
    URL as its ``path``.
    """
    from slide_clip.storage.urls import is_url

    if is_url(path):
        from slide_clip.storage.remote_slides import open_remote_slide

        return open_remote_slide(str(path), mpp_override, open_file, resolve_slide_path)
    return open_file(resolve_slide_path(path), path, mpp_override)


def open_file(file: Path, path, mpp_override: float | None = None, wrap=None):
    """:func:`open_slide` of the local ``file`` (resolved), named ``path`` in errors and in its
    :class:`SlideInfo`. ``wrap`` (a callable) turns the OpenSlide handle into the handle returned,
    before the checks read pixels through it (a remote slide's handle fetches the bytes it reads)."""
    try:
        fmt = openslide.OpenSlide.detect_format(str(file))
    except Exception as e:  # noqa: BLE001 - OpenSlide raises several types
        raise SlideError(f"cannot be read: {e}", path=path) from None
    if fmt is None:
        problem, hint = _why_unreadable(file)
        raise SlideError(problem, path=path, hint=hint)
    _check_tiff_pixels(file, path)
    try:
        osr = openslide.OpenSlide(str(file))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(
            f"is a {fmt} file OpenSlide cannot open as a brightfield RGB slide",
            path=path,
            hint="Fluorescence, multi-channel and 16-bit images are not supported.",
        ) from None
    except Exception as e:  # noqa: BLE001
        reason = str(e).strip() or type(e).__name__
        if fmt == "dicom":
            problem, hint = _why_dicom_fails(file, reason)
            raise SlideError(problem, path=path, hint=hint) from None
        raise SlideError(
            f"is corrupt or truncated ({reason})",
            path=path,
            hint="Copy the file again from its source.",
        ) from None
    try:
        if wrap is not None:
            osr = wrap(osr)
        _check_last_tile(osr, path)
        info = _describe(osr, file, path, mpp_override)
    except Exception:
        osr.close()
        raise
    return osr, info


def _check_last_tile(osr, path) -> None:
    """Read the slide's last level-0 pixel (bottom right): a truncated file fails here, at
    once, instead of after hours of encoding (formats store tiles roughly in order)."""
    w, h = osr.dimensions
    if w < 1 or h < 1:
        raise SlideError("has no pixels (a 0 x 0 image)", path=path, hint=_RECOPY)
    try:
        osr.read_region((w - 1, h - 1), 0, (1, 1))
    except Exception as e:  # noqa: BLE001 - OpenSlide's error types vary by format
        reason = str(e).strip() or type(e).__name__
        raise SlideError(f"is truncated or corrupt: its last tile cannot be read ({reason[:200]})",
                         path=path, hint=_RECOPY) from None


def is_decode_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a codec's or OpenSlide's failure to decode a slide's image data."""
    return isinstance(exc, openslide.OpenSlideError) or type(exc).__module__.split(".")[0] == "imagecodecs"


def read_region(osr, location: tuple[int, int], level: int, size: tuple[int, int], path=None):
    """``osr.read_region``, with the slide's corrupt image data (bit rot, a damaged copy) as a
    one-line :class:`SlideError` naming the file, the level and the level-0 position.

    Both decoders raise there: OpenSlide's (``OpenSlideError``) and tifffile + imagecodecs'
    (:mod:`slide_clip.jpeg_tiff`, which marks the file tile it failed on). ``path`` names
    the slide (default: the file the handle was opened from).
    """
    try:
        return osr.read_region(location, level, size)
    except Exception as e:
        if not is_decode_error(e):
            raise
        tile = getattr(e, "tile_origin", None)
        if tile is not None:
            where = f"in its file tile at level-0 pixel ({int(tile[0])}, {int(tile[1])})"
        else:  # OpenSlide does not say which of the region's file tiles failed
            x, y = int(location[0]), int(location[1])
            try:
                ds = float(osr.level_downsamples[level])
            except Exception:  # noqa: BLE001 - an OpenSlide handle refuses every call after an error
                ds = None
            where = (f"in the region of level-0 pixels ({x}, {y}) to "
                     f"({x + round(size[0] * ds)}, {y + round(size[1] * ds)})" if ds else
                     f"in the region at level-0 pixel ({x}, {y}), {size[0]} x {size[1]} pixels of level {level}")
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise SlideError(f"has corrupt image data at level {level} {where} ({type(e).__name__}: {reason})",
                         path=path or getattr(osr, "_filename", None),
                         hint="Copy the file again from its source (a damaged copy or a failing disk).") from None


def _is_tiff(file: Path) -> bool:
    with open(file, "rb") as f:
        return f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


_CONVERT = "Convert it to a pyramidal brightfield TIFF, or give the scanner's original file."
_RECOPY = "Copy the file again from its source."
_BRIGHTFIELD_ONLY = "slide-clip handles 8-bit brightfield RGB slides (H&E, IHC) only."

#: What OpenSlide needs of a DICOM WSI instance (besides pixel data), and why.
_DICOM_REQUIRED = (
    ("SOPClassUID", "the SOP class (VL Whole Slide Microscopy Image Storage)"),
    ("SeriesInstanceUID", "the series the instance belongs to"),
    ("ImageType", "the image flavor (VOLUME, LABEL, OVERVIEW, THUMBNAIL)"),
    ("TotalPixelMatrixColumns", "the level's width"),
    ("TotalPixelMatrixRows", "the level's height"),
    ("Rows", "the tile height"),
    ("Columns", "the tile width"),
)
_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _why_dicom_fails(file: Path, reason: str) -> tuple[str, str]:
    """Why OpenSlide refuses a DICOM file: a missing required attribute, not a WSI, or corrupt."""
    import re

    import pydicom

    named = re.match(r"Reading (.+?): ", reason)  # OpenSlide names the instance it failed on
    if named and Path(named.group(1)).is_file():
        file = Path(named.group(1))
    try:
        ds = pydicom.dcmread(file, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - the header itself does not parse
        return f"is a corrupt or truncated DICOM file ({reason})", _RECOPY
    for attr, what in _DICOM_REQUIRED:
        if attr not in ds or ds.get(attr) in (None, ""):
            return (f"is a DICOM file without {attr} ({what}), which OpenSlide requires of a whole-slide "
                    f"image (OpenSlide: {reason})",
                    "Copying the file again will not help: re-export the slide from the scanner or "
                    "PACS as a complete DICOM WSI, or convert it to a pyramidal TIFF.")
    if str(ds.get("SOPClassUID")) != _WSI_SOP_CLASS:
        return (f"is a DICOM {getattr(ds.SOPClassUID, 'name', ds.SOPClassUID)} file, not a whole-slide "
                f"microscopy image (OpenSlide: {reason})", "Give a DICOM WSI series.")
    return (f"is a DICOM WSI that OpenSlide cannot read ({reason}): its header is complete, so the "
            "series may be incomplete or a file damaged",
            "Check that every file of the series was copied (a folder per series), or copy it again.")


def _tiff_pixel_problem(file: Path) -> str | None:
    """What a TIFF holds if it is not 8-bit RGB: '16-bit single-channel (greyscale)', 'N-channel
    fluorescence', ...; None for 8-bit RGB(A) or a file tifffile cannot parse."""
    import tifffile

    try:
        with tifffile.TiffFile(file) as tif:
            pages = tif.pages
            page = pages[0]
            spp, bits, photometric = int(page.samplesperpixel), int(page.bitspersample), int(page.photometric)
            shape = page.shape
            # multiplex (qptiff, OME): one single-channel page per channel at full size
            same = sum(1 for p in pages if int(p.samplesperpixel) == 1 and p.shape == shape) if spp == 1 else 0
            desc = (page.description or "")[:2000]
    except Exception:  # noqa: BLE001
        return None
    rgb_like = photometric in (2, 6) or (photometric == 7 and spp >= 3)
    if bits == 8 and spp in (3, 4) and rgb_like:
        return None
    if spp == 1 and (same > 1 or "PerkinElmer-QPI" in desc or "<OME" in desc):
        n = max(same, 1)
        return f"a {n}-channel ({bits}-bit) fluorescence/multiplex image, one greyscale page per channel"
    if spp == 1:
        return f"a {bits}-bit single-channel (greyscale) image"
    if spp > 4 or not rgb_like:
        return f"a {spp}-channel {bits}-bit image (fluorescence or spectral), not RGB"
    return f"a {bits}-bit-per-channel {'RGBA' if spp == 4 else 'RGB'} image"


def _rgb_kind(file: Path) -> str:
    """'RGB' or 'RGBA' (for messages about plain TIFFs)."""
    import tifffile

    try:
        with tifffile.TiffFile(file) as tif:
            return "RGBA" if int(tif.pages[0].samplesperpixel) == 4 else "RGB"
    except Exception:  # noqa: BLE001
        return "RGB"


def _why_unreadable(file: Path) -> tuple[str, str]:
    """Why OpenSlide recognises no format: a plain image, a plain TIFF, or a broken file."""
    try:
        if file.stat().st_size == 0:
            return "is an empty file (0 bytes)", "Copy the file again from its source; the copy was interrupted."
    except OSError as e:
        return f"cannot be read ({e.strerror})", "Check the file's permissions."
    if file.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".gif"):
        return "is a plain image, not a whole-slide image (no pyramid, no resolution)", _CONVERT
    try:
        if not _is_tiff(file):
            return "is not a whole-slide image format OpenSlide reads, or the file is corrupt", _CONVERT
    except OSError as e:
        return f"cannot be read ({e.strerror})", "Check the file's permissions."
    import tifffile

    size = file.stat().st_size
    try:
        with tifffile.TiffFile(file) as tif:
            page = tif.pages[0]
            tiled = page.is_tiled
            ends = [o + n for pg in tif.pages for o, n in zip(pg.dataoffsets, pg.databytecounts)]
    except Exception:  # noqa: BLE001 - any parse failure means a broken file
        return "is a corrupt or truncated TIFF", _RECOPY
    if ends and max(ends) > size:
        return (f"is a truncated TIFF (its image data needs {max(ends)} bytes, the file has {size})",
                _RECOPY)
    kind = _tiff_pixel_problem(file)
    if kind is not None:
        return f"is {kind}, not a brightfield RGB slide", _BRIGHTFIELD_ONLY
    if not tiled:
        return (f"is a plain (untiled, non-pyramidal) 8-bit {_rgb_kind(file)} TIFF, not a whole-slide image",
                _CONVERT)
    return "is a TIFF that OpenSlide cannot read: corrupt, truncated or an unsupported layout", _RECOPY


def _check_tiff_pixels(file: Path, path) -> None:
    """Refuse TIFF-based slides whose pixels are not 8-bit RGB (fluorescence, 16-bit grey).

    OpenSlide converts any TIFF to RGBA, so a multiplex or 16-bit image would otherwise
    be read as garbage colours.
    """
    try:
        if not _is_tiff(file):
            return
    except OSError:
        return
    kind = _tiff_pixel_problem(file)
    if kind is not None:
        raise SlideError(f"is {kind}, not an 8-bit brightfield RGB slide", path=path, hint=_BRIGHTFIELD_ONLY)


def _describe(osr, file: Path, path, mpp_override) -> SlideInfo:
    props = osr.properties
    mpp_x = _float_prop(props, openslide.PROPERTY_NAME_MPP_X)
    mpp_y = _float_prop(props, openslide.PROPERTY_NAME_MPP_Y)
    if mpp_override is not None:
        if not (mpp_override > 0 and math.isfinite(mpp_override)):
            raise MppError(f"mpp override {mpp_override} is not a positive number", path=path)
        mpp_x = mpp_y = float(mpp_override)
        source = "override"
    elif mpp_x is not None or mpp_y is not None:
        mpp_x = mpp_x or mpp_y
        mpp_y = mpp_y or mpp_x
        source = "metadata"
    else:
        source = "missing"
    try:
        fingerprint = _fingerprint(osr, file)
    except OSError as e:
        raise SlideError(f"cannot be read: {e}", path=path) from None
    from slide_clip.storage.urls import is_url

    return SlideInfo(
        path=str(path) if is_url(path) else str(Path(path).expanduser().resolve()),
        name=slide_id(path),
        vendor=props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
        width=int(osr.dimensions[0]),
        height=int(osr.dimensions[1]),
        level_count=int(osr.level_count),
        level_dimensions=tuple((int(w), int(h)) for w, h in osr.level_dimensions),
        level_downsamples=tuple(float(d) for d in osr.level_downsamples),
        mpp_x=mpp_x,
        mpp_y=mpp_y,
        mpp_source=source,
        objective_power=_float_prop(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER),
        fingerprint=fingerprint,
        associated_images=tuple(sorted(osr.associated_images.keys())),
    )


def slide_info(path: str | Path, mpp_override: float | None = None) -> SlideInfo:
    """Describe a slide without keeping it open."""
    osr, info = open_slide(path, mpp_override)
    osr.close()
    return info


def check_mpp(info: SlideInfo, target_mpp: float) -> tuple[float, float]:
    """Validate a slide's resolution against the target and return (mpp_x, mpp_y).

    Raises :class:`MppError` when the mpp is missing, implausible, or so much coarser than
    the target that tiles would have to be upsampled.
    """
    if info.mpp_x is None or info.mpp_y is None:
        raise MppError(
            "has no resolution (mpp) in its metadata",
            path=info.path,
            hint="Give it with --mpp (µm per level-0 pixel) or an --mpp-csv of slide,mpp rows.",
        )
    lo, hi = MPP_RANGE
    for v in (info.mpp_x, info.mpp_y):
        dpi = next((d for d, m in DPI_DEFAULTS.items() if abs(v - m) / m < 0.01), None)
        if dpi is not None or not lo <= v <= hi:
            what = f"the {dpi}-dpi default of image writers" if dpi else f"outside {lo:g}-{hi:g} µm/px"
            raise MppError(
                f"resolution {v:g} µm/px ({info.mpp_source}) is impossible for a slide scan ({what}): "
                "the file does not record its real resolution",
                path=info.path,
                hint="Give the true resolution with --mpp or --mpp-csv.",
            )
    coarse = max(info.mpp_x, info.mpp_y)
    if coarse > target_mpp * MAX_UPSAMPLE:
        raise MppError(
            f"is scanned at {coarse:g} µm/px ({info.mpp_source}), coarser than the target "
            f"{target_mpp:g} µm/px (tiles would be upsampled {coarse / target_mpp:.1f}x)",
            path=info.path,
            hint=f"Tile it at a coarser resolution with --target-mpp {_round_up(coarse):g} (or coarser), "
                 "or leave this slide out.",
        )
    if abs(info.mpp_x - info.mpp_y) / max(info.mpp_x, info.mpp_y) > 0.1:
        raise MppError(
            f"pixels are not square (mpp x {info.mpp_x:g}, y {info.mpp_y:g})",
            path=info.path,
            hint="Check the slide's metadata or give --mpp.",
        )
    return info.mpp_x, info.mpp_y


def _round_up(v: float) -> float:
    """``v`` rounded up to 2 significant digits (a --target-mpp to suggest)."""
    e = 10 ** (math.floor(math.log10(v)) - 1)
    return round(math.ceil(v / e - 1e-9) * e, 10)
