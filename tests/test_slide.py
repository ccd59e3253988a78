"""Opening slides: metadata from real files, mpp overrides, and one-line errors for bad input."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from slide_clip.errors import MppError, SlideError
from slide_clip.mpp_overrides import read_mpp_csv
from slide_clip.scan import find_slides
from slide_clip.slide import check_mpp, slide_info


def test_svs_metadata(cmu_svs):
    info = slide_info(cmu_svs)
    assert info.vendor == "aperio"
    assert (info.width, info.height) == (2220, 2967)
    assert info.level_count == 1 and info.level_downsamples == (1.0,)
    assert info.mpp_x == pytest.approx(0.499) and info.mpp_source == "metadata"
    assert info.objective_power == 20
    assert info.fingerprint.startswith("quickhash1:")
    assert info.name == "CMU-1-Small-Region"


def test_dicom_folder_and_any_file_of_the_series(cmu_dicom, cmu_svs):
    by_folder = slide_info(cmu_dicom)
    assert by_folder.vendor == "dicom"
    assert (by_folder.width, by_folder.height) == (2220, 2967)
    assert by_folder.mpp_x == pytest.approx(0.499)
    smallest = min(cmu_dicom.glob("*.dcm"), key=lambda f: f.stat().st_size)
    by_file = slide_info(smallest)
    assert by_file.fingerprint == by_folder.fingerprint
    assert by_folder.name == cmu_dicom.name
    assert by_file.name == smallest.stem  # a single file is named after itself, never its folder


def test_generic_tiff_pyramid(make_slide):
    path, scene = make_slide("tissue_0.263", mpp=0.263)
    info = slide_info(path)
    assert info.vendor == "generic-tiff"
    assert (info.width, info.height) == (scene.width, scene.height)
    assert info.level_count == 3
    assert info.level_downsamples[1] == pytest.approx(2, rel=1e-3)
    assert info.mpp_x == pytest.approx(0.263)


def test_mpp_override_and_missing_mpp(make_slide):
    path, _ = make_slide("no_mpp", write_mpp=None)
    info = slide_info(path)
    assert info.mpp_x is None and info.mpp_source == "missing"
    with pytest.raises(MppError, match=r"no resolution .*--mpp"):
        check_mpp(info, 0.5)
    over = slide_info(path, mpp_override=0.5)
    assert over.mpp_x == 0.5 and over.mpp_source == "override"
    assert check_mpp(over, 0.5) == (0.5, 0.5)


def test_mpp_csv(tmp_path, make_slide):
    path, _ = make_slide("no_mpp", write_mpp=None)
    csv = tmp_path / "mpp.csv"
    csv.write_text(f"slide,mpp\n{path.name},0.25\n")
    mpps = read_mpp_csv(csv)
    assert mpps.match([(path, "no_mpp"), (tmp_path / "unknown.svs", "unknown")]) == {str(path): 0.25}
    bad = tmp_path / "bad.csv"
    bad.write_text("file,resolution\na,1\n")
    with pytest.raises(Exception, match="columns 'slide' and 'mpp'"):
        read_mpp_csv(bad)


def test_implausible_mpp(make_slide):
    path, _ = make_slide("dpi96", write_mpp=264.5833)
    with pytest.raises(MppError, match="impossible for a slide scan .the 96-dpi default") as e:
        check_mpp(slide_info(path), 0.5)
    assert "--mpp" in str(e.value) and "--target-mpp" not in str(e.value)


def test_base_level_far_coarser_than_target(make_slide):
    path, _ = make_slide("coarse", mpp=2.0, width_um=3000, height_um=2000)
    with pytest.raises(MppError, match=r"coarser than the target 0.5") as e:
        check_mpp(slide_info(path), 0.5)
    assert "--target-mpp 2" in str(e.value) and "--mpp " not in str(e.value)
    assert check_mpp(slide_info(path), 2.0) == (2.0, 2.0)


def _one_line_error(path, match):
    with pytest.raises(SlideError) as e:
        slide_info(path)
    text = str(e.value)
    assert "\n" not in text
    assert str(path) in text
    assert match in text
    return text


def test_missing_path(tmp_path):
    _one_line_error(tmp_path / "nope.svs", "no such file")


def test_plain_image(tmp_path):
    p = tmp_path / "photo.png"
    Image.fromarray(np.full((300, 400, 3), 200, np.uint8)).save(p)
    _one_line_error(p, "plain image")


def test_plain_tiff_without_pyramid(tmp_path):
    p = tmp_path / "flat.tif"
    tifffile.imwrite(p, np.full((300, 400, 3), 200, np.uint8), photometric="rgb")
    _one_line_error(p, "plain (untiled, non-pyramidal) 8-bit RGB TIFF")


def test_multiplex_fluorescence(tmp_path):
    p = tmp_path / "mplex.tif"
    data = np.random.default_rng(0).integers(0, 255, (5, 512, 512), dtype=np.uint8)
    tifffile.imwrite(p, data, tile=(256, 256), photometric="minisblack", planarconfig="separate",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    _one_line_error(p, "5-channel")


def test_16bit_grey(tmp_path):
    p = tmp_path / "grey16.tif"
    data = np.random.default_rng(0).integers(0, 65535, (512, 512), dtype=np.uint16)
    tifffile.imwrite(p, data, tile=(256, 256), photometric="minisblack",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    _one_line_error(p, "16-bit single-channel")


def test_truncated_tiff(tmp_path, make_slide):
    path, _ = make_slide("tissue_0.5", mpp=0.5)
    p = tmp_path / "truncated.tif"
    p.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    _one_line_error(p, "truncated")


def test_garbage_file(tmp_path):
    p = tmp_path / "garbage.svs"
    p.write_bytes(b"not a slide" * 100)
    _one_line_error(p, "not a whole-slide image format")


def test_folder_without_dicom(tmp_path):
    _one_line_error(tmp_path, "folder without DICOM")


def test_find_slides(tmp_path, cmu_dicom):
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.tif").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    found = find_slides([tmp_path, cmu_dicom])
    assert [f.name for f in found] == ["a.svs", "b.tif", cmu_dicom.name]
    assert [f.name for f in find_slides([tmp_path], "*.tif")] == ["b.tif"]


def test_the_slide_fixture_never_overwrites_a_slide_of_the_same_name(make_slide):
    """Two tests asking one name at two sizes each get their own file (slide id = the name)."""
    import openslide

    a, _ = make_slide("same_name", width_um=1000, height_um=800)
    b, _ = make_slide("same_name", width_um=1200, height_um=900)
    assert a != b and a.name == b.name == "same_name.tif"
    with openslide.OpenSlide(str(a)) as sa, openslide.OpenSlide(str(b)) as sb:
        assert sa.dimensions != sb.dimensions
