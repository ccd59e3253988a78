"""Finding tissue on a low-resolution thumbnail.

Functions take arrays and return arrays. Sizes given to the algorithms are physical
(µm, µm²) and converted with the thumbnail's resolution, so a mask does not depend on the
scanner's resolution. Coordinates here are thumbnail pixels.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import color, filters, morphology

from slide_clip.config import TissueConfig
from slide_clip.pictures import text_font

#: The thumbnail's longest side, pixels: a few thousand at most, whatever the slide's size.
DEFAULT_THUMBNAIL_MAX_SIDE = 2048

#: Source pixels read at once while building a thumbnail: bounds memory (64 MB of RGBA).
_STRIP_PIXELS = 16_000_000
#: Threads reading thumbnail bands at once (each holds one strip).
_THUMBNAIL_THREADS = 4


@dataclass(frozen=True)
class Thumbnail:
    """A downsampled RGB picture of the whole slide.

    ``downsample`` is level-0 pixels per thumbnail pixel (x, y); ``mpp`` is µm per
    thumbnail pixel (mean of both axes).
    """

    image: np.ndarray  # (h, w, 3) uint8
    downsample: tuple[float, float]
    mpp: float | None


def read_thumbnail(osr, max_side: int = DEFAULT_THUMBNAIL_MAX_SIDE, mpp: float | None = None,
                   path=None) -> Thumbnail:
    """Read the whole slide at a size whose longest side is ``max_side`` pixels or less.

    Reads the coarsest pyramid level still at least as large as the thumbnail, in strips,
    so memory stays bounded by the thumbnail and one strip, never by the slide's size.
    Transparent (unscanned) areas become white. Corrupt image data is a
    :class:`~slide_clip.errors.SlideError` naming ``path`` (:func:`slide_clip.slide.read_region`).
    """
    from slide_clip.slide import read_region

    w0, h0 = osr.dimensions
    scale = min(1.0, max_side / max(w0, h0))
    tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
    # Coarsest level whose size is still >= the thumbnail's.
    level = 0
    for i, (lw, lh) in enumerate(osr.level_dimensions):
        if lw >= tw and lh >= th:
            level = i
    lw, lh = osr.level_dimensions[level]
    ds = osr.level_downsamples[level]
    out = np.empty((th, tw, 3), dtype=np.uint8)
    # Each band of thumbnail rows maps to a band of level rows; bands resize independently,
    # so they are read in a few threads (OpenSlide and PIL release the GIL while decoding and
    # resampling): the thumbnail is on the way to a command's first encoded batch.
    rows_per_strip = max(1, int(_STRIP_PIXELS / (lw * lh / th)))

    def band(ty0: int) -> None:
        ty1 = min(th, ty0 + rows_per_strip)
        ly0 = int(math.floor(ty0 * lh / th))
        ly1 = min(lh, int(math.ceil(ty1 * lh / th)))
        region = read_region(osr, (0, int(round(ly0 * ds))), level, (lw, max(1, ly1 - ly0)), path)
        rgb = _rgba_to_rgb_white(region)
        # Exact box of this band within the level strip, sub-pixel.
        box = (0.0, ty0 * lh / th - ly0, float(lw), ty1 * lh / th - ly0)
        out[ty0:ty1] = np.asarray(rgb.resize((tw, ty1 - ty0), Image.Resampling.BOX, box=box))

    starts = range(0, th, rows_per_strip)
    threads = min(_THUMBNAIL_THREADS, len(starts), os.cpu_count() or 1)
    if threads <= 1:
        for ty0 in starts:
            band(ty0)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads, thread_name_prefix="thumbnail") as ex:
            list(ex.map(band, starts))  # memory: one strip per thread
    mpp_thumb = None if mpp is None else mpp * (w0 / tw + h0 / th) / 2
    return Thumbnail(out, (w0 / tw, h0 / th), mpp_thumb)


def _rgba_to_rgb_white(img: Image.Image) -> Image.Image:
    """Composite an RGBA region onto white (OpenSlide marks unscanned areas transparent)."""
    if img.mode != "RGBA":
        return img.convert("RGB")
    bg = Image.new("RGB", img.size, (255, 255, 255))
    bg.paste(img, mask=img.getchannel("A"))
    return bg


#: The glass's level is this quantile of the smoothed saturation of the pixels below Otsu's
#: threshold: the glass's lower tail while glass is at least this share of them.
GLASS_QUANTILE = 0.05
#: The pixel's own stain is its saturation smoothed at this fraction of ``smoothing_um``.
FINE_SMOOTHING = 0.25


def tissue_mask(rgb: np.ndarray, mpp: float, params: TissueConfig = TissueConfig()) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail (tissue algorithm 2, see
    :data:`slide_clip.config.TISSUE_ALGORITHM`).

    Parameters
    ----------
    rgb
        (h, w, 3) uint8 thumbnail, background white.
    mpp
        µm per thumbnail pixel; converts the physical sizes in ``params`` to pixels.
    params
        Thresholds and sizes.

    Returns
    -------
    (h, w) bool array, True on tissue.

    Notes
    -----
    Stained tissue is saturated, glass is not. The saturation channel is smoothed
    (``smoothing_um``) and compared with two thresholds (:func:`saturation_thresholds`):
    Otsu's, and a lower one at most ``min_saturation`` above the glass's saturation. A pixel is
    tissue above Otsu's threshold, or above the lower one where its own saturation (smoothed at
    :data:`FINE_SMOOTHING` of the scale) is above it too: pale tissue beside dense tissue is
    kept, and the blur of dense tissue into the glass beside it is not. Neither threshold is
    below ``min_saturation``, so a blank slide yields an empty mask. Very dark pixels (folds'
    cores, dust, slide edges, black ink) and green/cyan ink are removed before morphological
    clean-up.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError("tissue_mask needs an (h, w, 3) RGB array")
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    sat, val = _saturation_value(rgb)
    sigma = params.smoothing_um / mpp
    sat_s = filters.gaussian(sat, sigma=sigma) if sigma >= 0.5 else sat
    white = (val == 1.0) & (sat == 0.0)
    low, high = saturation_thresholds(sat_s, val > params.dark_value, white, sigma, params.min_saturation)
    mask = sat_s > high
    if low < high:
        fine = sigma * FINE_SMOOTHING
        sat_f = filters.gaussian(sat, sigma=fine) if fine >= 0.5 else sat
        mask |= (sat_s > low) & (sat_f > low)
    artefact = val < params.dark_value
    if params.exclude_pen:
        artefact |= _green_ink(rgb, sat)
    mask &= ~_dilate(artefact, morphology.disk(1))
    r = int(round(params.closing_um / mpp))
    if r >= 1:
        mask = _closing(mask, morphology.disk(r, decomposition="sequence"))
    px_area = mpp * mpp
    mask = morphology.remove_small_holes(mask, max_size=max(1, int(params.min_hole_um2 / px_area)))
    mask = morphology.remove_small_objects(mask, max_size=max(1, int(params.min_object_um2 / px_area)))
    return mask.astype(bool)


def saturation_thresholds(sat_s: np.ndarray, lit: np.ndarray, white: np.ndarray, sigma: float,
                          min_saturation: float) -> tuple[float, float]:
    """The lower (glass-referenced) and upper (Otsu's) smoothed-saturation thresholds.

    ``sat_s`` is the smoothed saturation, ``lit`` the pixels bright enough to judge, ``white``
    the pure-white pixels, ``sigma`` the smoothing in pixels.

    Otsu's threshold splits the histogram in two; when a slide holds glass, pale tissue and
    dense tissue, the split can fall between pale and dense tissue. The lower threshold is
    therefore at most ``min_saturation`` above the glass's level: the :data:`GLASS_QUANTILE`
    quantile of the pixels below Otsu's threshold, leaving out pure white and the pixels its
    smoothing reaches (3 sigma): unscanned areas, which OpenSlide leaves transparent, and
    clipped glass are not glass samples (with no pixel left, the lower threshold is Otsu's). Both are at least ``min_saturation`` (a blank slide gives an empty mask). Where
    Otsu's threshold is within ``min_saturation`` of the glass, the two are equal and the
    mask is algorithm 1's.
    """
    candidates = sat_s[lit]
    if candidates.size == 0 or float(np.ptp(candidates)) < 1e-6:
        return min_saturation, min_saturation
    otsu = float(filters.threshold_otsu(candidates))
    reference = lit & (sat_s <= otsu)
    if white.any():  # within reach of the smoothing (3 sigma, a square): a box maximum, cheap at any sigma
        reach = math.ceil(3 * sigma)
        reference &= ~(ndimage.maximum_filter(white, size=2 * reach + 1) if reach >= 1 else white)
    below = sat_s[reference]
    glass = float(np.quantile(below, GLASS_QUANTILE)) if below.size else otsu
    high = max(min_saturation, otsu)
    return max(min_saturation, min(otsu, glass + min_saturation)), high


# The mask above is skimage's HSV threshold and grey-level morphology, computed more cheaply
# with the same numbers (tests/test_tissue_reference.py compares it with the plain skimage path):
# saturation and value depend only on a pixel's max and min channel, so they are looked up in
# tables that skimage's own rgb2hsv filled; hue is computed only where the ink test needs it;
# dilating and closing a boolean mask with 3x3 footprints are ORs and ANDs of shifted copies.


@functools.lru_cache(maxsize=1)
def _hsv_tables() -> tuple[np.ndarray, np.ndarray]:
    """Saturation by (max, min) channel and value by max channel, as ``color.rgb2hsv`` computes them."""
    hi, lo = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    hsv = color.rgb2hsv(np.stack([hi, lo, lo], axis=-1))  # pixel (M, m, m): max M, min m where m <= M
    sat = np.ascontiguousarray(hsv[..., 1]).reshape(-1)  # index M * 256 + m
    val = np.ascontiguousarray(hsv[np.arange(256), 0, 2])
    return sat, val


def _saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value of a uint8 RGB picture, equal to ``color.rgb2hsv``'s."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hi = np.maximum(np.maximum(r, g), b)
    lo = np.minimum(np.minimum(r, g), b)
    sat_t, val_t = _hsv_tables()
    return sat_t[hi.astype(np.intp) * 256 + lo], val_t[hi]


def _green_ink(rgb: np.ndarray, sat: np.ndarray) -> np.ndarray:
    """Green/cyan ink: hue in (70°, 200°) where saturation > 0.2 (hue by ``color.rgb2hsv``)."""
    ink = np.zeros(sat.shape, dtype=bool)
    where = sat > 0.2
    if where.any():
        hue = color.rgb2hsv(rgb[where][:, None, :])[:, 0, 0]
        ink[where] = (hue > 70 / 360) & (hue < 200 / 360)
    return ink


def _shift_combine(mask: np.ndarray, footprint: np.ndarray, erode: bool, sign: int) -> np.ndarray:
    """One 3x3 step: OR (dilation) or AND (erosion) of ``mask`` shifted by the footprint's
    offsets times ``sign``, the picture's edge row and column repeated outside it (scipy's
    ``reflect`` border for a 3x3 footprint, as skimage uses by default)."""
    h, w = mask.shape
    padded = np.pad(mask, 1, mode="edge")
    out = mask.copy()
    combine = np.logical_and if erode else np.logical_or
    for dy, dx in zip(*np.nonzero(footprint)):
        dy, dx = sign * (int(dy) - 1), sign * (int(dx) - 1)
        if dy or dx:
            combine(out, padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w], out=out)
    return out


def _steps(footprint) -> list[tuple[np.ndarray, int]]:
    """A footprint (or skimage's sequence of them) as (3x3 boolean footprint, repeats) steps."""
    steps = [(np.asarray(fp, dtype=bool), int(n)) for fp, n in footprint] if isinstance(footprint, tuple) \
        else [(np.asarray(footprint, dtype=bool), 1)]
    for fp, _ in steps:
        if fp.shape != (3, 3) or not fp[1, 1]:
            raise ValueError("binary morphology here takes 3x3 footprints that hold their centre")
    return steps


def _dilate(mask: np.ndarray, footprint) -> np.ndarray:
    """``morphology.dilation(mask, footprint)`` of a boolean mask (3x3 footprints)."""
    for fp, n in _steps(footprint):
        for _ in range(n):
            mask = _shift_combine(mask, fp, erode=False, sign=1)
    return mask


def _closing(mask: np.ndarray, footprint) -> np.ndarray:
    """``morphology.closing(mask, footprint)`` of a boolean mask (3x3 footprints): skimage erodes
    by the mirrored footprint after dilating."""
    mask = _dilate(mask, footprint)
    for fp, n in _steps(footprint):
        for _ in range(n):
            mask = _shift_combine(mask, fp, erode=True, sign=-1)
    return mask


#: Tile outline colour of the QC picture: yellow, the complement of H&E's purple and pink, so
#: outlines stay visible over stained tissue; the tissue outline is green.
QC_TILE_COLOUR = (255, 225, 0)
QC_TISSUE_COLOUR = (0, 200, 0)


def qc_image(
    rgb: np.ndarray,
    mask: np.ndarray,
    tile_boxes: np.ndarray | None = None,
    title: str | None = None,
) -> Image.Image:
    """The thumbnail with the tissue outline (green), kept tiles (yellow boxes) and a title line.

    ``tile_boxes`` is an (n, 4) array of x0, y0, x1, y1 in thumbnail pixels. ``title``, if
    given, is written in a white band above the thumbnail (the picture grows by the band's
    height; thumbnail pixel (0, 0) is then at (0, band height)).

    The picture is a palette image (mode ``P``; its PNG is 3-6 times smaller than an RGB one,
    docs/BENCHMARKS.md): the thumbnail in :data:`QC_THUMBNAIL_COLOURS` colours (Pillow's fast
    octree, no dithering), the outlines in their exact colours, the title in grey levels.
    ``.convert("RGB")`` gives the pixels.
    """
    h, w = mask.shape
    lines = Image.new("L", (w, h), 0)  # where the tile outlines are
    if tile_boxes is not None and len(tile_boxes):
        boxes = np.asarray(tile_boxes, dtype=float)
        # 2 px lines where tiles are big enough on the thumbnail to keep their inside visible
        width = 2 if np.median(boxes[:, 2] - boxes[:, 0]) >= 12 else 1
        draw = ImageDraw.Draw(lines)
        for x0, y0, x1, y1 in boxes:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=255, width=width)
    edge = mask & ~morphology.erosion(mask, morphology.disk(1))
    edge = morphology.dilation(edge, morphology.disk(1)) if max(mask.shape) > 600 else edge
    thumb = Image.fromarray(np.ascontiguousarray(rgb[..., :3])).convert("RGB")
    quant = thumb.quantize(colors=QC_THUMBNAIL_COLOURS, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    index = np.asarray(quant, np.uint8).copy()
    index[np.asarray(lines) > 0] = _QC_TILE_INDEX
    index[edge] = _QC_TISSUE_INDEX
    palette = np.zeros((256, 3), np.uint8)
    used = np.asarray(quant.getpalette()[: 3 * QC_THUMBNAIL_COLOURS], np.uint8).reshape(-1, 3)
    palette[: len(used)] = used
    palette[_QC_TILE_INDEX] = QC_TILE_COLOUR
    palette[_QC_TISSUE_INDEX] = QC_TISSUE_COLOUR
    palette[_QC_GREY0:] = np.linspace(0, 255, 256 - _QC_GREY0).round().astype(np.uint8)[:, None]
    if title:
        band = _title_band(w, title)
        grey = _QC_GREY0 + np.rint(np.asarray(band, np.float32) / 255 * (255 - _QC_GREY0)).astype(np.uint8)
        index = np.concatenate([grey, index])
    picture = Image.fromarray(index, mode="P")
    picture.putpalette(palette.ravel().tolist())
    return picture


#: Colours of the QC picture's thumbnail (the rest of its palette: the outlines, 14 greys for the title).
QC_THUMBNAIL_COLOURS = 128
_QC_TILE_INDEX, _QC_TISSUE_INDEX, _QC_GREY0 = 240, 241, 242


def _title_band(w: int, title: str) -> Image.Image:
    """A white band ``w`` px wide holding ``title`` in black (font scaled to the width), mode ``L``."""
    size = int(np.clip(w / 60, 10, 28))
    font = text_font(size)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    while size > 8 and probe.textlength(title, font=font) > w - 8:
        size -= 1
        font = text_font(size)
    band = Image.new("L", (w, int(size * 1.8)), 255)
    ImageDraw.Draw(band).text((4, (band.height - size) // 2), title, fill=0, font=font)
    return band
