"""One slide end to end (real OpenSlide, real Zarr on disk, real open_clip), through the library API."""

import math

import numpy as np
import openslide
import pytest
import torch
import zarr
from PIL import Image

from slide_clip.errors import SlideError, StoreError
from slide_clip.pipeline import embed_slide
from slide_clip.store import SlideStore
from slide_clip.synthetic import Region, Scene


@pytest.fixture(scope="module")
def cmu_store(cmu_svs, tmp_path_factory, tiny_registry):
    from slide_clip.config import load_config

    cfg = load_config().with_overrides(encode={"model": "tiny", "registries": (str(tiny_registry),),
                                               "batch_size": 16, "num_workers": 1, "device": "cpu"})
    out = tmp_path_factory.mktemp("cmu_out")
    result = embed_slide(cmu_svs, out, cfg, progress=False)
    return result, SlideStore.open(result.store), cfg


def test_store_layout_and_attributes(cmu_store, cmu_svs):
    result, store, _ = cmu_store
    assert result.status == "ok" and result.n_tiles == store.n_tiles > 20
    g = zarr.open_group(result.store, mode="r")
    assert g.metadata.zarr_format == 3
    a = store.attrs
    assert a["status"] == "tiled" and a["slide_clip"]["format_version"] == 1
    assert a["slide"]["fingerprint"].startswith("quickhash1:")
    assert a["slide"]["mpp_x"] == pytest.approx(0.499) and a["slide"]["mpp_source"] == "metadata"
    assert a["tiling"]["tile_extent_level0"][0] == pytest.approx(224 * 0.5 / 0.499)
    assert {"open_clip_torch", "torch", "zarr", "openslide"} <= set(a["versions"])
    n = store.n_tiles
    assert g["tiles/coords"].shape == (n, 2) and g["tiles/coords"].dtype == np.int64
    assert g["tiles/grid"].shape == (n, 2)
    assert g["tiles/tissue_fraction"].shape == (n,)
    assert np.all(store.tissue_fraction() >= 0.25)
    assert g["tissue/mask"].dtype == bool and g["tissue/thumbnail"].shape[2] == 3
    e = store.embedding_attrs("tiny")
    assert e["status"] == "complete" and e["rows_written"] == n
    assert e["arch"] == "slideclip-tiny-test" and e["random_weights"] is False
    assert len(e["weights_sha256"]) == 64 and e["embed_dim"] == 32
    feats = g["embeddings/tiny/features"]
    assert feats.shape == (n, 32) and feats.chunks[0] == min(n, 2048)
    assert (store.path.parent / "CMU-1-Small-Region_qc.png").is_file()


def test_embeddings_equal_encode_image_on_independently_read_tiles(cmu_store, cmu_svs, tiny_encoder):
    result, store, cfg = cmu_store
    feats = store.embeddings("tiny")
    coords = store.coords()
    extent = 224 * 0.5 / 0.499
    osr = openslide.OpenSlide(str(cmu_svs))
    picks = np.linspace(0, len(coords) - 1, 6).astype(int)
    tiles = []
    for i in picks:
        x, y = (int(v) for v in coords[i])
        side = math.ceil(extent)
        region = osr.read_region((x, y), 0, (side, side)).convert("RGB")
        tiles.append(tiny_encoder.preprocess(region.resize((224, 224), Image.Resampling.BICUBIC,
                                                           box=(0, 0, extent, extent))))
    osr.close()
    with torch.no_grad():
        ref = tiny_encoder.model.encode_image(torch.stack(tiles))
        ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    assert np.abs(feats[picks] - ref).max() <= 1e-4
    assert np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)


def test_same_slide_in_generic_tiff_gives_same_tiles_and_embeddings(cmu_store, cmu_tiff, tmp_path):
    _, store, cfg = cmu_store
    r = embed_slide(cmu_tiff, tmp_path, cfg, mpp=0.499, progress=False)
    other = SlideStore.open(r.store)
    assert np.array_equal(other.coords(), store.coords())
    assert np.abs(other.embeddings("tiny") - store.embeddings("tiny")).max() <= 1e-4


def test_dicom_series_folder(cmu_store, cmu_dicom, tmp_path):
    _, store, cfg = cmu_store
    r = embed_slide(cmu_dicom, tmp_path, cfg, progress=False)
    other = SlideStore.open(r.store)
    assert other.slide["vendor"] == "dicom"
    assert other.is_complete("tiny")
    # the DICOM copy holds the same image: the same tiles are kept
    assert abs(other.n_tiles - store.n_tiles) <= 2


def test_rerun_skips_a_complete_store(cmu_store, cmu_svs):
    from slide_clip.encoders.cache import EncoderCache

    result, store, cfg = cmu_store
    encoders = EncoderCache(cfg)
    again = embed_slide(cmu_svs, store.path.parent, cfg, encoders=encoders, progress=False)
    assert again.status == "skipped" and again.encoded == 0
    assert encoders._builds == {} and encoders._threads == []  # no model built, not even in the background


def test_second_model_in_the_same_store(cmu_store, cmu_svs):
    _, store, cfg = cmu_store
    cfg2 = cfg.with_overrides(encode={"model": "random:slideclip-tiny-test"})
    r = embed_slide(cmu_svs, store.path.parent, cfg2, progress=False)
    assert r.status == "ok" and r.encoded == store.n_tiles
    s = SlideStore.open(r.store)
    assert s.models() == ["random_slideclip-tiny-test", "tiny"]
    assert s.embedding_attrs("random:slideclip-tiny-test")["random_weights"] is True
    assert s.is_complete("tiny") and s.is_complete("random:slideclip-tiny-test")


def test_other_settings_need_overwrite(cmu_store, cmu_svs):
    _, store, cfg = cmu_store
    cfg2 = cfg.with_overrides(tiling={"tile_size": 256})
    with pytest.raises(StoreError, match="other settings.*--overwrite"):
        embed_slide(cmu_svs, store.path.parent, cfg2, progress=False)


def test_a_store_older_than_a_tissue_setting_is_reused_at_its_default(cmu_store, cmu_svs):
    """A store made before a tissue setting existed records no value for it: it was made as
    the setting's default behaves, so it is reused at the default and refused at another value."""
    _, store, cfg = cmu_store
    s = SlideStore.open(store.path)
    tiling = dict(s.tiling)
    assert tiling["tissue"]["exclude_pen"] is True
    tiling["tissue"] = {k: v for k, v in tiling["tissue"].items() if k != "exclude_pen"}  # as if older
    s.group.attrs.update({"tiling": tiling})
    try:
        r = embed_slide(cmu_svs, store.path.parent, cfg, progress=False)
        assert r.status == "skipped" and r.encoded == 0
        with pytest.raises(StoreError, match="other settings"):
            embed_slide(cmu_svs, store.path.parent, cfg.with_overrides(tissue={"exclude_pen": False}),
                        progress=False)
        tiling["tissue"]["smoothing_um"] = 4.0  # a recorded value still counts
        s.group.attrs.update({"tiling": tiling})
        with pytest.raises(StoreError, match="other settings"):
            embed_slide(cmu_svs, store.path.parent, cfg, progress=False)
    finally:
        tiling["tissue"] = {**tiling["tissue"], "exclude_pen": True, "smoothing_um": cfg.tissue.smoothing_um}
        s.group.attrs.update({"tiling": tiling})


def test_store_records_the_tissue_algorithm_and_a_store_without_it_is_refused(cmu_store, cmu_svs):
    """Masks of two tissue algorithms never mix: a store made before the algorithm was recorded
    (algorithm 1) is refused by embedding and by every reader, in one line naming --overwrite."""
    from slide_clip.config import TISSUE_ALGORITHM
    from slide_clip.scoring import open_scored_store

    _, store, cfg = cmu_store
    s = SlideStore.open(store.path)
    tiling = dict(s.tiling)
    assert tiling["tissue_algorithm"] == TISSUE_ALGORITHM == 2
    old = {k: v for k, v in tiling.items() if k != "tissue_algorithm"}  # as made before this change
    s.group.attrs.update({"tiling": old})
    try:
        for call in (lambda: embed_slide(cmu_svs, store.path.parent, cfg, progress=False),
                     lambda: open_scored_store(store.path, cfg.encode.model)):
            with pytest.raises(StoreError, match=r"made by tissue algorithm 1 .*--overwrite") as e:
                call()
            assert "\n" not in str(e.value) and str(store.path) in str(e.value)
        s.group.attrs.update({"tiling": {**tiling, "tissue_algorithm": 3}})
        with pytest.raises(StoreError, match="algorithm 3, from a newer slide-clip"):
            open_scored_store(store.path, cfg.encode.model)
    finally:
        s.group.attrs.update({"tiling": tiling})
    assert open_scored_store(store.path, cfg.encode.model)[0].n_tiles == store.n_tiles


def test_an_older_mask_is_refused_by_each_stage_until_overwritten(make_slide, cfg, tmp_path):
    from slide_clip.config import TISSUE_ALGORITHM
    from slide_clip.pipeline import tiles_stage, tissue_stage

    path, _ = make_slide("tissue_0.5", mpp=0.5)
    store = tissue_stage(path, tmp_path, cfg)
    s = SlideStore.open(store)
    old = {k: v for k, v in s.tiling.items() if k != "tissue_algorithm"}
    s.group.attrs.update({"tiling": old})
    for stage in (lambda: tissue_stage(path, tmp_path, cfg), lambda: tiles_stage(store, cfg)):
        with pytest.raises(StoreError, match="tissue algorithm 1"):
            stage()
    assert SlideStore.open(store).status == "tissue"  # nothing tiled from the old mask
    tissue_stage(path, tmp_path, cfg, overwrite=True)
    assert tiles_stage(store, cfg) > 0
    assert SlideStore.open(store).tiling["tissue_algorithm"] == TISSUE_ALGORITHM


def test_slide_without_tissue_is_a_valid_empty_result(make_slide, cfg, tmp_path):
    path, _ = make_slide("blank", scene=Scene(2000, 1500, ()))
    r = embed_slide(path, tmp_path, cfg, progress=False)
    assert r.status == "ok" and r.n_tiles == 0
    s = SlideStore.open(r.store)
    assert s.is_complete("tiny") and s.embeddings("tiny").shape == (0, 32)


def test_synthetic_slide_tiles_cover_the_tissue(make_slide, cfg, tmp_path):
    path, scene = make_slide("tissue_0.263", mpp=0.263)
    r = embed_slide(path, tmp_path, cfg, progress=False)
    s = SlideStore.open(r.store)
    ext = s.tiling["tile_extent_level0"][0]
    assert ext == pytest.approx(224 * 0.5 / 0.263)
    truth = scene.truth((scene.height // 4, scene.width // 4))  # 4 level-0 px per truth px
    true_frac = np.array([truth[int(y // 4):int((y + ext) // 4), int(x // 4):int((x + ext) // 4)].mean()
                          for x, y in s.coords()])
    assert len(true_frac) > 50
    assert np.all(true_frac > 0.1)  # no tile off the tissue
    assert np.mean(np.abs(true_frac - s.tissue_fraction()) < 0.1) > 0.95
    # every grid cell that is mostly tissue in truth was kept
    rows, cols = s.tiling["grid_shape"]
    kept = {tuple(rc) for rc in s.grid()}
    for r in range(rows):
        for c in range(cols):
            x, y = round(c * ext), round(r * ext)
            if truth[int(y // 4):int((y + ext) // 4), int(x // 4):int((x + ext) // 4)].mean() > 0.5:
                assert (r, c) in kept


def test_dark_background_is_refused(make_slide, cfg, tmp_path):
    from slide_clip.synthetic import TEXTURES

    TEXTURES.setdefault("fluor", {"base": (10, 10, 12), "spot": (40, 200, 60), "period": (7.0, 7.0), "cut": 0.8})
    scene = Scene(2000, 1500, (Region("rect", (0, 0, 2000, 1500), "fluor"),))
    path, _ = make_slide("fluorescence_rgb", scene=scene)
    with pytest.raises(SlideError, match="dark background"):
        embed_slide(path, tmp_path, cfg, progress=False)
