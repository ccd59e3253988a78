"""Tissue masks on real pyramidal TIFFs (OpenSlide) against the scene's known truth."""

import numpy as np
import openslide
import pytest

from slide_clip.config import TissueConfig
from slide_clip.synthetic import Region, Scene, stained
from slide_clip.tiling import make_grid
from slide_clip.tissue import QC_TISSUE_COLOUR, qc_image, read_thumbnail, tissue_mask


def iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def _mask(path, mpp, max_side=2048):
    osr = openslide.OpenSlide(str(path))
    thumb = read_thumbnail(osr, max_side, mpp)
    osr.close()
    return thumb, tissue_mask(thumb.image, thumb.mpp, TissueConfig())


@pytest.mark.parametrize("mpp", [0.25, 0.263, 0.5])
def test_mask_matches_truth_at_any_resolution(make_slide, mpp):
    path, scene = make_slide(f"tissue_{mpp}", mpp=mpp)
    thumb, mask = _mask(path, mpp)
    truth = scene.truth(mask.shape)
    assert iou(mask, truth) >= 0.95
    # the thumbnail covers the whole slide at a bounded size
    assert max(mask.shape) <= 2048
    assert thumb.downsample[0] == pytest.approx(scene.width / mask.shape[1])


def test_mask_size_independent_of_thumbnail_size(make_slide):
    path, scene = make_slide("tissue_0.25", mpp=0.25)
    _, small = _mask(path, 0.25, max_side=512)
    _, large = _mask(path, 0.25, max_side=2048)
    assert iou(small, scene.truth(small.shape)) >= 0.95
    assert iou(large, scene.truth(large.shape)) >= 0.95


def test_pen_marks_and_dark_debris_are_not_tissue(make_slide):
    mpp = 0.5
    scene = Scene(3000, 2000, (
        Region("ellipse", (200, 200, 1700, 1800)),
        Region("rect", (2000, 300, 2150, 1700), "green_ink"),   # a marker stroke on glass
        Region("ellipse", (2400, 800, 2700, 1100), "black"),     # debris on glass
        Region("rect", (700, 900, 1000, 1000), "green_ink"),     # ink over the tissue
    ))
    path, _ = make_slide("artefacts", mpp=mpp, scene=scene)
    _, mask = _mask(path, mpp)
    truth = scene.truth(mask.shape)
    assert iou(mask, truth) >= 0.9
    h, w = mask.shape
    stroke = mask[int(0.2 * h):int(0.8 * h), int(2020 / 3000 * w):int(2130 / 3000 * w)]
    assert stroke.mean() < 0.02
    debris = mask[int(850 / 2000 * h):int(1050 / 2000 * h), int(2450 / 3000 * w):int(2650 / 3000 * w)]
    assert debris.mean() < 0.02


def test_blank_slide_gives_empty_mask(make_slide):
    path, _ = make_slide("blank", scene=Scene(2000, 1500, ()))
    _, mask = _mask(path, 0.5)
    assert not mask.any()


def test_small_specks_removed_by_physical_size(make_slide):
    # a 40 µm speck (1,257 µm²) is below min_object_um2 (20,000 µm²): dropped at any mpp
    mpp = 0.25
    scene = Scene(4000, 3000, (
        Region("ellipse", (400, 400, 2400, 2600)),
        Region("ellipse", (3200, 1400, 3360, 1560)),  # 160 px = 40 µm across
    ))
    path, _ = make_slide("speck", mpp=mpp, scene=scene)
    _, mask = _mask(path, mpp)
    h, w = mask.shape
    assert not mask[:, int(3100 / 4000 * w):].any()
    assert mask[h // 2, int(1400 / 4000 * w)]


def test_qc_image_draws_outline_and_tiles(make_slide):
    path, scene = make_slide("tissue_0.5", mpp=0.5)
    thumb, mask = _mask(path, 0.5)
    boxes = np.array([[10, 10, 60, 60]], dtype=float)
    img = np.asarray(qc_image(thumb.image, mask, boxes).convert("RGB"))
    assert img.shape == thumb.image.shape
    green = (img[..., 1] == 200) & (img[..., 0] == 0)
    assert green.sum() > 100  # outline drawn
    assert not np.array_equal(img[10, 10:60], thumb.image[10, 10:60])  # tile box drawn


# Pale tissue beside dense tissue (issue 19): the slides of the report, 1792 px at 0.5 µm/px, a
# `tissue` rectangle with 64 px margins, a `dense` rectangle over a share phi of it. Algorithm 1
# put Otsu's threshold between the two textures and kept 64, 32 and 48 tiles at phi 0.2, 0.45, 0.7.
_SIDE, _MARGIN = 1792, 64


def _pale_dense(phi: float, pale="tissue") -> Scene:
    regions = [Region("rect", (_MARGIN, _MARGIN, _SIDE - _MARGIN, _SIDE - _MARGIN), pale)]
    if phi > 0:
        regions.append(Region("rect", (_MARGIN, _MARGIN, _MARGIN + (_SIDE - 2 * _MARGIN) * phi, _SIDE - _MARGIN),
                              "dense"))
    return Scene(_SIDE, _SIDE, tuple(regions))


_MASKS: dict = {}


def _mask_and_tiles(path, scene, max_side, target_mpp):
    """Mask, truth, thumbnail, and the tiles kept by the mask and by the truth (224 px, min_tissue 0.25)."""
    key = (str(path), max_side, target_mpp)
    if key not in _MASKS:
        _MASKS[key] = _compute_mask_and_tiles(path, scene, max_side, target_mpp)
    return _MASKS[key]


def _compute_mask_and_tiles(path, scene, max_side, target_mpp):
    osr = openslide.OpenSlide(str(path))
    try:
        thumb = read_thumbnail(osr, max_side, 0.5)
        dims, downsamples = osr.dimensions, tuple(osr.level_downsamples)
    finally:
        osr.close()
    mask = tissue_mask(thumb.image, thumb.mpp, TissueConfig(thumbnail_max_side=max_side))
    truth = scene.truth(mask.shape)
    kw = dict(target_mpp=target_mpp, tile_size=224, overlap=0.0, min_tissue=0.25)
    kept = make_grid(dims, (0.5, 0.5), downsamples, mask, thumb.downsample, **kw)
    true = make_grid(dims, (0.5, 0.5), downsamples, truth, thumb.downsample, **kw)
    return mask, truth, thumb, kept, true


@pytest.mark.parametrize("max_side, target_mpp, phis", [
    (2048, 0.5, (0.2, 0.45, 0.7)),             # the defaults (the report: 64, 32 and 48 tiles)
    (512, 1.0, (0.0, 0.2, 0.45, 0.7, 1.0)),    # the report's sweep, pale-only and dense-only too
])
def test_pale_tissue_beside_dense_tissue_is_kept_at_every_share(make_slide, max_side, target_mpp, phis):
    """The same tissue area keeps the same tiles whatever share of it is dense, pale-only and
    dense-only included; recall >= 0.97 and precision >= 0.95 at every share."""
    counts = []
    for phi in phis:
        path, scene = make_slide(f"pale_dense_{phi}", scene=_pale_dense(phi))
        mask, truth, _, kept, true = _mask_and_tiles(path, scene, max_side, target_mpp)
        hit = (mask & truth).sum()
        assert hit / truth.sum() >= 0.97, f"phi {phi}: recall {hit / truth.sum():.3f}"
        assert hit / mask.sum() >= 0.95, f"phi {phi}: precision {hit / mask.sum():.3f}"
        assert len(true) == (64 if target_mpp == 0.5 else 16)
        assert {tuple(c) for c in kept.coords} == {tuple(c) for c in true.coords}, f"phi {phi}"
        counts.append(len(kept))
    assert len(set(counts)) == 1, counts


def test_pale_tissue_of_low_saturation_beside_dense_tissue(make_slide):
    """Eosin-pale tissue (base saturation 0.1; glass about 0.03) beside dense tissue is found."""
    scene = _pale_dense(0.45, pale=stained(0.1))
    path, _ = make_slide("pale0.1_dense", scene=scene)
    mask, truth, _, kept, true = _mask_and_tiles(path, scene, 2048, 0.5)
    pale = scene.truth(mask.shape) & ~scene.truth(mask.shape, texture="dense")
    assert (mask & pale).sum() / pale.sum() >= 0.95
    assert (mask & truth).sum() / mask.sum() >= 0.95
    assert len(kept) == len(true) == 64


def test_qc_outline_goes_round_pale_tissue(make_slide):
    """The QC picture's green outline runs along the pale tissue's edge, not between the textures."""
    phi = 0.45
    path, scene = make_slide(f"pale_dense_{phi}", scene=_pale_dense(phi))
    mask, _, thumb, _, _ = _mask_and_tiles(path, scene, 2048, 0.5)
    img = np.asarray(qc_image(thumb.image, mask).convert("RGB"))
    green = np.all(img == QC_TISSUE_COLOUR, axis=-1)
    rows = slice(300, 1500)  # thumbnail px = level-0 px here (1792 px slide, 2048 px thumbnail)
    right_edge = green[rows, _SIDE - _MARGIN - 12:_SIDE - _MARGIN + 12].any(axis=1)
    assert right_edge.mean() > 0.95  # the pale side's outer edge is outlined
    x = int(_MARGIN + (_SIDE - 2 * _MARGIN) * phi)
    assert not green[rows, x - 30:x + 30].any()  # no outline between the dense and the pale tissue


def _tinted_glass_beside_white(seed=0):
    """A 600 x 800 picture: bluish glass (saturation about 0.08), its left quarter unscanned
    (pure white), pale tissue with a dense half in the middle. Returns (rgb, truth)."""
    scene = Scene(800, 600, (Region("rect", (300, 150, 700, 450), "tissue"),
                             Region("rect", (300, 150, 500, 450), "dense")))
    rgb = scene.render(0, 0, 800, 600).astype(int)
    truth = scene.truth((600, 800))
    rng = np.random.default_rng(seed)
    glass = np.array([225, 230, 245]) + rng.integers(-5, 6, rgb.shape)
    rgb[~truth] = glass[~truth]
    rgb[:, :200] = 255
    return np.clip(rgb, 0, 255).astype(np.uint8), truth


def test_tinted_glass_beside_unscanned_white_stays_glass():
    """Pure white (areas OpenSlide leaves transparent) is not taken for the glass: bluish glass
    about 0.08 more saturated than white is still background, and the tissue is found."""
    rgb, truth = _tinted_glass_beside_white()
    mask = tissue_mask(rgb, 2.0)
    hit = (mask & truth).sum()
    assert hit / truth.sum() >= 0.97 and hit / mask.sum() >= 0.95
