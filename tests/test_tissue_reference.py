"""The tissue mask's cheap path gives exactly the mask of the plain skimage path.

:func:`reference_mask` is the straightforward implementation (skimage's rgb2hsv and grey
morphology, as slide_clip used before the look-up tables and shifted-copy morphology; the
threshold of tissue algorithm 2, written out again here); the
masks, and so the tiles kept, must be identical on real slides (OpenSlide thumbnails of the
CMU SVS and DICOM, synthetic pyramidal TIFFs) and on hostile synthetic pictures.
"""

import numpy as np
import openslide
import pytest
from skimage import color, filters, morphology

from slide_clip.config import TissueConfig
from slide_clip.synthetic import Region, Scene
from slide_clip.tiling import make_grid
from slide_clip.tissue import _closing, _dilate, read_thumbnail, tissue_mask


def reference_mask(rgb: np.ndarray, mpp: float, params: TissueConfig = TissueConfig()) -> np.ndarray:
    hsv = color.rgb2hsv(rgb)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sigma = params.smoothing_um / mpp
    sat_s = filters.gaussian(sat, sigma=sigma) if sigma >= 0.5 else sat
    lit = val > params.dark_value
    candidates = sat_s[lit]
    if candidates.size == 0 or float(np.ptp(candidates)) < 1e-6:
        low = high = params.min_saturation
    else:
        # algorithm 2: Otsu's threshold, and a lower one at most min_saturation above the glass
        # (the 5 % quantile of the pixels below Otsu's threshold, pure white and the pixels within
        # 3 sigma of it left out), kept where the pixel's own saturation (sigma / 4) passes it too
        otsu = float(filters.threshold_otsu(candidates))
        glass_px = lit & (sat_s <= otsu)
        white = np.all(rgb == 255, axis=-1)
        reach = int(np.ceil(3 * sigma))
        if white.any() and reach >= 1:
            white = morphology.dilation(white, morphology.footprint_rectangle((2 * reach + 1, 2 * reach + 1)))
        glass_px &= ~white
        glass = float(np.quantile(sat_s[glass_px], 0.05)) if glass_px.any() else otsu
        high = max(params.min_saturation, otsu)
        low = max(params.min_saturation, min(otsu, glass + params.min_saturation))
    mask = sat_s > high
    if low < high:
        sat_f = filters.gaussian(sat, sigma=sigma / 4) if sigma / 4 >= 0.5 else sat
        mask |= (sat_s > low) & (sat_f > low)
    artefact = val < params.dark_value
    if params.exclude_pen:
        artefact |= (hue > 70 / 360) & (hue < 200 / 360) & (sat > 0.2)
    mask &= ~morphology.dilation(artefact, morphology.disk(1))
    r = int(round(params.closing_um / mpp))
    if r >= 1:
        mask = morphology.closing(mask, morphology.disk(r, decomposition="sequence"))
    px_area = mpp * mpp
    mask = morphology.remove_small_holes(mask, max_size=max(1, int(params.min_hole_um2 / px_area)))
    mask = morphology.remove_small_objects(mask, max_size=max(1, int(params.min_object_um2 / px_area)))
    return mask.astype(bool)


def _thumb(path, mpp, max_side=2048):
    osr = openslide.OpenSlide(str(path))
    try:
        return read_thumbnail(osr, max_side, mpp)
    finally:
        osr.close()


def _same(rgb, mpp, params=TissueConfig()):
    fast, ref = tissue_mask(rgb, mpp, params), reference_mask(rgb, mpp, params)
    assert fast.dtype == ref.dtype == bool
    assert np.array_equal(fast, ref), f"masks differ in {(fast != ref).sum()} px (mpp {mpp})"
    return fast


@pytest.mark.parametrize("which", ["svs", "dicom"])
def test_real_slide_masks_and_tiles_identical(cmu_svs, cmu_dicom, which):
    from slide_clip.slide import open_slide

    osr, info = open_slide(cmu_svs if which == "svs" else cmu_dicom)
    try:
        mpp, dims, downsamples = info.mpp, osr.dimensions, tuple(osr.level_downsamples)
        thumb = read_thumbnail(osr, 2048, mpp)
    finally:
        osr.close()
    # the slide's own thumbnail resolution, and finer/coarser ones (other closing radii)
    for m in (thumb.mpp, thumb.mpp / 2, thumb.mpp * 3):
        _same(thumb.image, m)
    mask = _same(thumb.image, thumb.mpp)
    ref = reference_mask(thumb.image, thumb.mpp)
    kw = dict(target_mpp=0.5, tile_size=224, overlap=0.0, min_tissue=0.5)
    a = make_grid(dims, (mpp, mpp), downsamples, mask, thumb.downsample, **kw)
    b = make_grid(dims, (mpp, mpp), downsamples, ref, thumb.downsample, **kw)
    assert len(a) > 0 and np.array_equal(a.coords, b.coords)


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_synthetic_slide_masks_identical(make_slide, mpp):
    path, _ = make_slide(f"tissue_{mpp}", mpp=mpp)
    thumb = _thumb(path, mpp)
    _same(thumb.image, thumb.mpp)
    _same(thumb.image, thumb.mpp, TissueConfig(exclude_pen=False, smoothing_um=0.0))


def test_artefact_slide_mask_identical(make_slide):
    scene = Scene(3000, 2000, (
        Region("ellipse", (0, 0, 1700, 1800)),  # tissue touching the picture's edges
        Region("rect", (2000, 300, 2150, 2000), "green_ink"),
        Region("ellipse", (2400, 800, 3000, 1100), "black"),
        Region("rect", (700, 900, 1000, 1000), "green_ink"),
    ))
    path, _ = make_slide("artefacts_edges", mpp=0.5, scene=scene)
    thumb = _thumb(path, 0.5, max_side=1024)
    for m in (thumb.mpp, 0.4, 2.0):
        _same(thumb.image, m)


def test_hostile_pictures_identical():
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (300, 410, 3), dtype=np.uint8)  # every hue, dark and bright
    blank = np.full((200, 260, 3), 255, dtype=np.uint8)
    grey = np.full((120, 90, 3), 128, dtype=np.uint8)
    blobs = np.full((257, 333, 3), 240, dtype=np.uint8)
    yy, xx = np.mgrid[:257, :333]
    blobs[(yy - 40) ** 2 + (xx - 300) ** 2 < 60 ** 2] = (150, 60, 160)   # cut by the border
    blobs[(yy - 200) ** 2 + (xx - 100) ** 2 < 50 ** 2] = (40, 150, 70)   # ink
    blobs[100:110, :] = (10, 10, 10)                                       # a dark line
    from test_tissue import _tinted_glass_beside_white

    tinted, _ = _tinted_glass_beside_white()  # pure white beside glass: the glass estimate leaves it out
    for rgb in (noise, blank, grey, blobs, tinted):
        for m in (0.3, 1.0, 4.0, 16.0):
            _same(rgb, m)


@pytest.mark.parametrize("r", list(range(1, 31)))
def test_binary_closing_equals_skimage(r):
    """Every disk decomposition (crosses, squares, the T shapes of some radii), masks touching the border."""
    rng = np.random.default_rng(r)
    from scipy import ndimage

    for m in (rng.random((61, 47)) > 0.8, ndimage.gaussian_filter(rng.random((80, 95)), 2) > 0.5):
        fp = morphology.disk(r, decomposition="sequence")
        assert np.array_equal(_closing(m, fp), morphology.closing(m, fp))
        assert np.array_equal(_dilate(m, morphology.disk(1)), morphology.dilation(m, morphology.disk(1)))
