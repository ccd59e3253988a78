"""Tissue masks on real pyramidal TIFFs (OpenSlide) against the scene's known truth."""

import numpy as np
import openslide
import pytest

from slide_clip.config import TissueConfig
from slide_clip.synthetic import Region, Scene
from slide_clip.tissue import qc_image, read_thumbnail, tissue_mask


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
    img = np.asarray(qc_image(thumb.image, mask, boxes))
    assert img.shape == thumb.image.shape
    green = (img[..., 1] == 200) & (img[..., 0] == 0)
    assert green.sum() > 100  # outline drawn
    assert not np.array_equal(img[10, 10:60], thumb.image[10, 10:60])  # tile box drawn
