"""Explore a cohort: search, clusters, maps, AnnData, galleries; on real stores of synthetic slides.

The cohort: two synthetic slides, each with two textures in rectangles aligned to the tile
grid (so every kept tile is one texture), embedded with the tiny checkpointed model.
Expected values come from numpy / scikit-learn / OpenSlide directly, never from the code
under test.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from slide_clip.errors import ConfigError, StoreError
from slide_clip.prompts import load_prompts
from slide_clip.store import SlideStore
from slide_clip.synthetic import Region, Scene, write_slide

T = 224  # tile extent in level-0 pixels at 0.5 µm/px (tile_size 224 at target 0.5 µm/px)


def _cells(c0, r0, c1, r1):
    return (c0 * T, r0 * T, c1 * T, r1 * T)


SCENES = {
    "two_tex_a": Scene(12 * T, 8 * T, (Region("rect", _cells(1, 1, 6, 7), "tissue"),
                                       Region("rect", _cells(7, 2, 11, 7), "dense")), seed=1),
    "two_tex_b": Scene(12 * T, 8 * T, (Region("rect", _cells(1, 1, 5, 6), "dense"),
                                       Region("rect", _cells(6, 1, 11, 7), "tissue")), seed=2),
}


def texture_truth(scene: Scene, coords) -> list[str]:
    """The texture under each tile's centre (level-0 coordinates)."""
    out = []
    for x, y in coords:
        X, Y = np.array([x + T / 2]), np.array([y + T / 2])
        hit = [r.texture for r in scene.regions if r.contains(X, Y)[0]]
        out.append(hit[0] if hit else "glass")
    return out


@pytest.fixture(scope="module")
def cohort_out(tmp_path_factory, tiny_registry):
    """Stores of the two-texture slides, zero-shot scored with the `tumour` prompts."""
    from slide_clip.config import load_config
    from slide_clip.pipeline import embed_slide
    from slide_clip.scoring import zeroshot

    base = tmp_path_factory.mktemp("explore")
    cfg = load_config().with_overrides(encode={"model": "tiny", "registries": (str(tiny_registry),),
                                               "batch_size": 32, "num_workers": 0, "device": "cpu"})
    out = base / "out"
    for name, scene in SCENES.items():
        slide = write_slide(base / "slides" / f"{name}.tif", scene, 0.5)
        embed_slide(slide, out, cfg, progress=False)
    zeroshot(sorted(out.glob("*.zarr")), load_prompts("tumour"), cfg)
    return out, cfg


def _all_embeddings(out):
    """(slide ids, rows, coords, features) of every tile, read straight from the Zarr arrays."""
    import zarr

    ids, rows, coords, feats = [], [], [], []
    for p in sorted(out.glob("*.zarr")):
        g = zarr.open_group(str(p), mode="r")
        f = g["embeddings/tiny/features"][:]
        ids += [p.name[:-5]] * len(f)
        rows.append(np.arange(len(f)))
        coords.append(g["tiles/coords"][:])
        feats.append(f)
    return np.array(ids), np.concatenate(rows), np.concatenate(coords), np.concatenate(feats)


def _numpy_ranking(feats, ids, rows, q, top):
    q = q / np.linalg.norm(q)
    s = feats.astype(np.float64) @ q.astype(np.float64)
    order = sorted(range(len(s)), key=lambda j: (-s[j], ids[j], rows[j]))[:top]
    return [(ids[j], int(rows[j])) for j in order], s[order]


def _independent_text_vector(encoder, texts):
    e = encoder.encode_texts(texts)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    m = e.mean(0)
    return m / np.linalg.norm(m)


# ----------------------------------------------------------------------------- search
def test_text_search_ranks_like_numpy(cohort_out, tiny_encoder):
    from slide_clip.explore.retrieval import search

    out, cfg = cohort_out
    r = search([out], cfg, texts=["necrosis", "mitotic figures"], top=12, name="text", gallery=False)
    t = r["table"]
    ids, rows, coords, feats = _all_embeddings(out)
    ps = load_prompts("tissue_types")
    necrosis = next(c for c in ps.classes if c.name == "necrosis")
    expect_q = {
        # a class of the prompt set: its synonyms x the set's templates
        "necrosis": _independent_text_vector(tiny_encoder, [tp.format(s) for s in necrosis.synonyms
                                                            for tp in ps.templates]),
        # free text: the set's templates around it
        "mitotic figures": _independent_text_vector(tiny_encoder, [tp.format("mitotic figures")
                                                                   for tp in ps.templates]),
    }
    for name, q in expect_q.items():
        sub = t[t["query"] == name]
        want, scores = _numpy_ranking(feats, ids, rows, q, 12)
        assert list(zip(sub["slide_id"], sub["tile"])) == want
        assert np.allclose(sub["score"], scores, atol=1e-5)
        assert list(sub["rank"]) == list(range(1, 13))
        for sid, tile, x, y in zip(sub["slide_id"], sub["tile"], sub["x"], sub["y"]):
            j = np.flatnonzero((ids == sid) & (rows == tile))[0]
            assert (x, y) == tuple(coords[j])
    saved = pd.read_parquet(r["dir"] / "hits.parquet")
    pd.testing.assert_frame_equal(saved, t)


def test_stored_tile_query_ranks_itself_first_across_blocks(cohort_out):
    from slide_clip.explore.cohort import Cohort
    from slide_clip.explore.queries import tile_queries
    from slide_clip.explore.search import search_exact

    out, _ = cohort_out
    cohort = Cohort.open([out])
    ids, rows, coords, feats = _all_embeddings(out)
    j = int(np.flatnonzero(ids == "two_tex_b")[17])
    x, y = coords[j]
    [q] = tile_queries(cohort, [("two_tex_b", int(x) + 5, int(y) + 9)])  # a point inside the tile
    assert q.detail["tile"] == rows[j] and (q.detail["x"], q.detail["y"]) == (x, y)
    assert np.array_equal(q.vector, feats[j])  # the stored row, not re-encoded
    scores, slide, row = search_exact(cohort, q.vector[None], top=25, rows=7)  # many blocks to merge
    assert cohort.slide_ids[slide[0, 0]] == "two_tex_b" and row[0, 0] == rows[j]
    assert abs(scores[0, 0] - 1.0) < 1e-5
    want, s = _numpy_ranking(feats, ids, rows, feats[j], 25)
    got = [(cohort.slide_ids[a], int(b)) for a, b in zip(slide[0], row[0])]
    # the same ranking as float64 numpy, up to the order of tiles whose cosines tie within
    # float32 precision (the synthetic textures repeat: several tiles are near-identical)
    exact = {(ids[k], int(rows[k])): float(v) for k, v in
             enumerate(feats.astype(np.float64) @ (feats[j] / np.linalg.norm(feats[j])).astype(np.float64))}
    assert len(set(got)) == 25 and np.allclose(scores[0], [exact[g] for g in got], atol=1e-5)
    assert np.all(np.diff(scores[0]) <= 1e-6) and np.allclose(scores[0], s, atol=1e-5)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g == w or abs(exact[g] - exact[w]) < 1e-5, (k, g, w)
    with pytest.raises(ConfigError, match="no stored tile"):
        tile_queries(cohort, [("two_tex_b", 1, 1)])  # glass: no tile there


def test_image_file_query_and_galleries_show_the_table(cohort_out, tiny_encoder, tmp_path):
    import openslide
    import torch

    from slide_clip.explore.gallery import LABEL_HEIGHT, PAD, TITLE_HEIGHT, cell_origin
    from slide_clip.explore.retrieval import search
    from slide_clip.pipeline import grid_from_store
    from slide_clip.tiling import read_tile

    out, cfg = cohort_out
    store = SlideStore.open(out / "two_tex_a.zarr")
    grid = grid_from_store(store)
    x, y = store.coords()[10]
    osr = openslide.OpenSlide(store.slide["path"])
    tile = read_tile(osr, int(x), int(y), grid)
    tile.save(tmp_path / "query.png")
    r = search([out], cfg, images=[tmp_path / "query.png"], top=6, name="image", columns=3, thumb=64)
    t = r["table"]
    q = tiny_encoder.encode_images(torch.stack([tiny_encoder.preprocess(Image.open(tmp_path / "query.png"))]))[0]
    ids, rows, _, feats = _all_embeddings(out)
    want, s = _numpy_ranking(feats, ids, rows, q, 6)
    assert list(zip(t["slide_id"], t["tile"])) == want and np.allclose(t["score"], s, atol=1e-5)
    assert (t["slide_id"].iloc[0], t["tile"].iloc[0]) == ("two_tex_a", 10)  # the same pixels rank first
    assert t["score"].iloc[0] > 0.999

    # gallery PNG: 3 columns x 2 rows of 64 px tiles; each cell shows the tile of its table row
    query = t["query"].iloc[0]
    png = Image.open(r["dir"] / f"gallery-{query.replace('.', '_')}.png").convert("RGB")  # named after its query
    assert png.size == (3 * (64 + PAD) + PAD, TITLE_HEIGHT + 2 * (64 + LABEL_HEIGHT + PAD) + PAD)
    pix = np.asarray(png).astype(int)
    for k, row in enumerate(t.itertuples()):
        s_ = SlideStore.open(out / f"{row.slide_id}.zarr")
        o = openslide.OpenSlide(s_.slide["path"])
        ref = np.asarray(read_tile(o, row.x, row.y, grid_from_store(s_)).resize((64, 64), Image.Resampling.BILINEAR))
        o.close()
        x0, y0 = cell_origin(k, 3, 64)
        assert np.abs(pix[y0:y0 + 64, x0:x0 + 64] - ref.astype(int)).mean() < 1.0
    osr.close()
    # HTML page: one figure per hit, captions = slide, level-0 x, y and score of the table row, in order
    page = (r["dir"] / "gallery.html").read_text()
    captions = [html.unescape(c) for c in re.findall(r"<figcaption>(.*?)</figcaption>", page, re.S)]
    assert captions == [f"{a} ({x_},{y_})\ncos {s_:.3f}" for a, x_, y_, s_ in zip(t.slide_id, t.x, t.y, t.score)]
    assert page.count("data:image/png;base64,") == len(t)


def test_faiss_index_with_every_list_probed_equals_exact(cohort_out):
    from slide_clip.explore import ann
    from slide_clip.explore.cohort import Cohort
    from slide_clip.explore.search import search_exact

    out, _ = cohort_out
    cohort = Cohort.open([out])
    ann.build_index(cohort, nlist=4)
    index = ann.load_index(cohort)
    rng = np.random.default_rng(3)
    q = rng.normal(size=(5, cohort.embed_dim)).astype(np.float32)
    ex = search_exact(cohort, q, top=10)
    ap = ann.search_index(cohort, index, q, top=10, nprobe=4)  # all lists: exact
    assert np.allclose(ap[0], ex[0], atol=1e-5)
    assert (ap[1] == ex[1]).all() and (ap[2] == ex[2]).all()


def test_a_damaged_store_is_reported_never_searched(cohort_out, tmp_path):
    from slide_clip.explore.cohort import Cohort
    from slide_clip.explore.search import search_exact

    out, _ = cohort_out
    copy = tmp_path / "out"
    for p in out.glob("*.zarr"):
        shutil.copytree(p, copy / p.name)
    g = SlideStore.open(copy / "two_tex_a.zarr").group["embeddings/tiny"]
    g.attrs.update({"status": "partial", "rows_written": 10})
    cohort = Cohort.open([copy])
    assert cohort.slide_ids == ["two_tex_b"]
    assert len(cohort.failed) == 1 and "two_tex_a.zarr" in cohort.failed[0][1] and "partial" in cohort.failed[0][1]
    # opened strictly (survival's cohorts: a smaller cohort would be another study) it is an error
    with pytest.raises(StoreError, match="two_tex_a.zarr.*partial"):
        Cohort.open([copy], strict=True)
    # survival's cohort is this cohort, opened strictly, grouped by patient; a store whose
    # folder name is not its slide's (patients are matched by folder name) is refused
    from slide_clip.survival import open_cohort

    with pytest.raises(StoreError, match="two_tex_a.zarr.*partial"):
        open_cohort(copy)
    g.attrs.update({"status": "complete", "rows_written": 50})
    pc = open_cohort(copy)
    assert isinstance(pc.cohort, Cohort) and list(pc.stores) == ["two_tex_a", "two_tex_b"]
    assert pc.open("two_tex_b") is pc.cohort.slides[pc.cohort.index_of("two_tex_b")].store
    (copy / "two_tex_b.zarr").rename(copy / "renamed.zarr")
    with pytest.raises(StoreError, match="renamed.zarr.*holds slide 'two_tex_b'"):
        open_cohort(copy)
    (copy / "renamed.zarr").rename(copy / "two_tex_b.zarr")
    # a lost chunk file in a complete store: the search fails loudly, naming the store
    g.attrs.update({"status": "complete", "rows_written": 50})
    shutil.rmtree(copy / "two_tex_b.zarr" / "embeddings" / "tiny" / "features" / "c")
    cohort = Cohort.open([copy])
    with pytest.raises(StoreError, match="two_tex_b.zarr.*damaged"):
        search_exact(cohort, np.ones((1, cohort.embed_dim), np.float32))


# ----------------------------------------------------------------------------- clusters
def test_a_store_being_written_fails_alone_when_clustering(cohort_out, tmp_path):
    from slide_clip.explore.clusters import cluster
    from slide_clip.store import store_lock

    out, _ = cohort_out
    copy = tmp_path / "out"
    for p in out.glob("*.zarr"):
        shutil.copytree(p, copy / p.name)
    with store_lock(copy / "two_tex_b.zarr"):  # another process is writing it
        r = cluster([copy], k=2, maps=False, gallery=False)
    t = r["table"].set_index("slide_id")
    assert t.loc["two_tex_a", "status"] == "ok" and t.loc["two_tex_b", "status"] == "failed"
    assert "being written by another process" in t.loc["two_tex_b", "error"]
    assert SlideStore.open(copy / "two_tex_b.zarr").score_sets() == [("tiny", "tumour")]
    assert ("tiny", "clusters-k2") in SlideStore.open(copy / "two_tex_a.zarr").score_sets()


def test_clusters_match_textures_and_are_stored_as_a_score_set(cohort_out):
    from sklearn.metrics import adjusted_rand_score

    from slide_clip.explore.clusters import cluster

    out, _ = cohort_out
    r = cluster([out], k=2, seed=0, per_cluster=4)
    truth, labels = [], []
    ids, rows, coords, feats = _all_embeddings(out)
    centroids = None
    for name, scene in SCENES.items():
        s = SlideStore.open(out / f"{name}.zarr")
        probs, logits, attrs = s.scores("tiny", "clusters-k2")
        assert attrs["kind"] == "clusters" and attrs["classes"] == ["cluster_0", "cluster_1"]
        lab = probs.argmax(1)
        assert np.array_equal(probs, np.eye(2, dtype=np.float32)[lab])  # one-hot
        centroids = s.group["scores/tiny/clusters-k2/classifier"][:]
        f = s.embeddings("tiny").astype(np.float64)
        d2 = ((f[:, None, :] - centroids[None].astype(np.float64)) ** 2).sum(-1)
        assert np.array_equal(lab, d2.argmin(1))  # nearest centroid, from numpy
        assert np.allclose(-logits, d2, atol=1e-4)
        truth += texture_truth(scene, s.coords())
        labels += list(lab)
        # composition table row = label fractions
        row = r["table"].set_index("slide_id").loc[name]
        assert row["status"] == "ok" and row["n_tiles"] == len(lab)
        assert np.allclose([row["fraction__cluster_0"], row["fraction__cluster_1"]],
                           np.bincount(lab, minlength=2) / len(lab))
    assert set(truth) == {"tissue", "dense"}
    assert adjusted_rand_score(truth, labels) >= 0.8
    saved = pd.read_parquet(out / "tables" / "tiny" / "clusters-k2.parquet")
    assert list(saved["slide_id"]) == list(SCENES) and (out / "tables" / "tiny" / "clusters-k2.csv").is_file()
    # representatives: per cluster, its members closest to the centroid, closest first
    reps = pd.read_csv(r["dir"] / "representatives.csv")
    for c, sub in reps.groupby("cluster"):
        ci = int(c.split("_")[1])
        member = np.array([labels[j] == ci for j in range(len(labels))])
        d2 = ((feats[member].astype(np.float64) - centroids[ci]) ** 2).sum(1)
        best = np.argsort(d2, kind="stable")[:4]
        assert list(zip(sub["slide_id"], sub["tile"])) == [(ids[member][b], rows[member][b]) for b in best]
    # maps and galleries are real pictures
    assert [p.name for p in r["maps"]] == ["two_tex_a.png", "two_tex_b.png"]
    for p in r["maps"] + [g for g in r["galleries"] if g.suffix == ".png"]:
        assert Image.open(p).size[0] > 100
    page = (r["dir"] / "gallery.html").read_text()
    assert page.count("<h2>") == 2 and page.count("<figure>") == len(reps)


def test_cluster_map_colours_each_cell_by_its_cluster():
    from slide_clip.heatmap import categorical_colours, categorical_overlay, label_grid

    grid_rc = np.array([[0, 0], [0, 1], [1, 1]])
    g = label_grid(grid_rc, np.array([2, 0, 1]), 3, (2, 2))
    assert g[0, 0] == 2 and g[0, 1] == 0 and g[1, 1] == 1 and np.isnan(g[1, 0])
    colours = categorical_colours(3)
    assert len({tuple(c) for c in colours}) == 3
    thumb = np.full((2, 2, 3), 200, np.uint8)
    mask = np.array([[True, True], [True, False]])
    img = categorical_overlay(thumb, mask, g, colours, alpha=1.0)
    assert tuple(img[0, 0]) == tuple(colours[2]) and tuple(img[0, 1]) == tuple(colours[0])
    assert tuple(img[1, 0]) == (200, 200, 200)  # no tile there
    assert tuple(img[1, 1]) == (200, 200, 200)  # outside the tissue mask


def legend_swatches(png) -> list[tuple[int, int, int]]:
    """The colours of a picture's legend, top to bottom, read from its pixels: the legend's
    swatches are solid rectangles about 22 x 8 px, stacked in one column."""
    from scipy import ndimage

    img = np.asarray(Image.open(png).convert("RGB"))
    same = np.all(img[:-2, :-2] == img[1:-1, 1:-1], -1) & np.all(img[2:, 2:] == img[1:-1, 1:-1], -1) \
        & np.all(img[:-2, 1:-1] == img[1:-1, 1:-1], -1) & np.all(img[1:-1, 2:] == img[1:-1, 1:-1], -1)
    colours, counts = np.unique(img[1:-1, 1:-1][same], axis=0, return_counts=True)  # solid areas' colours
    found = []
    for c in colours[(counts >= 40) & (np.ptp(colours.astype(int), axis=1) > 20)]:
        lab, _ = ndimage.label(np.all(img == c, axis=-1))
        for k, sl in enumerate(ndimage.find_objects(lab), start=1):
            h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            if 14 <= w <= 40 and 4 <= h <= 14 and w > 1.8 * h and (lab[sl] == k).sum() >= 0.8 * w * h:
                found.append((sl[1].start, sl[0].start, tuple(int(v) for v in c)))
    xs, n = np.unique([f[0] for f in found], return_counts=True)
    column = xs[np.argmax(n)]
    return [c for x, _, c in sorted((f for f in found if abs(f[0] - column) <= 1), key=lambda f: f[1])]


def test_one_colour_table_in_numeric_order_for_every_cluster_picture(cohort_out):
    """Cluster i has one colour in every picture: the cluster maps draw it unblended, exactly as
    their legend's swatch, over the share of the slide its tiles cover; the map of tiles lists
    clusters in numeric order (cluster_2 before cluster_10) in the same colours."""
    from slide_clip.explore.clusters import cluster
    from slide_clip.explore.maps import embedding_map

    out, _ = cohort_out
    r = cluster([out], k=12, seed=0, name="clusters-k12", gallery=False)
    maps = {p.stem: p for p in r["maps"]}
    legends = {sid: legend_swatches(p) for sid, p in maps.items()}
    first = next(iter(legends.values()))
    assert len(first) == 12 and len(set(first)) == 12  # every cluster, each its own colour
    assert all(v == first for v in legends.values())   # the same table on every slide's map
    for sid, png in maps.items():
        labels = SlideStore.open(out / f"{sid}.zarr").scores("tiny", "clusters-k12")[0].argmax(1)
        img = np.asarray(Image.open(png).convert("RGB"))
        drawn = np.array([np.all(img == c, axis=-1).sum() for c in first], float)
        drawn -= drawn.min()  # less the swatch's own pixels (a cluster absent here shows only its swatch)
        share = drawn / drawn.sum()
        truth = np.bincount(labels, minlength=12) / len(labels)
        assert np.abs(share - truth).max() < 0.03, (share.round(3), truth.round(3))
    m = embedding_map([out], method="pca", per_slide=10**6, colour_by=["clusters-k12"])
    png = next(f for f in m["files"] if f.name == "tiles-pca-clusters-k12.png")
    present = sorted(set(m["points"]["colour__clusters_k12"]), key=lambda n: int(n.split("_")[1]))
    assert len(present) >= 11  # cluster_10 is there to sort
    assert legend_swatches(png) == [first[int(n.split("_")[1])] for n in present]


def test_the_colour_table_keeps_near_neighbours_apart():
    """Every pair of the first 12 category colours differs by CIEDE2000 >= 17, of the first 20 by
    >= 14 (matplotlib's tab20: 12), and none is near white (glass, the page)."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    from slide_clip.heatmap import categorical_colours
    from slide_clip.pictures import category_colours

    assert np.array_equal(category_colours(20)[:5], category_colours(5))  # one table, whatever n
    assert np.array_equal(categorical_colours(12), category_colours(12))   # the viewer's and the maps'
    for k, least in ((12, 17.0), (20, 14.0)):
        lab = rgb2lab(category_colours(k)[None].astype(float) / 255)[0]
        d = deltaE_ciede2000(lab[:, None, :], lab[None, :, :])
        np.fill_diagonal(d, np.inf)
        assert d.min() >= least, (k, d.min())
        white = deltaE_ciede2000(lab, np.broadcast_to(rgb2lab(np.ones((1, 1, 3)))[0, 0], lab.shape))
        assert white.min() >= 20


def test_gallery_names_are_safe_unique_and_name_the_query():
    from slide_clip.explore.gallery import gallery_names

    keys = ["necrosis", "mitotic figures", "two_tex_a:448:448", "a/b", "a b", "../x", "", "Necrosis"]
    names = gallery_names(keys)
    assert names["necrosis"] == "gallery-necrosis.png" and names["mitotic figures"] == "gallery-mitotic_figures.png"
    assert names["two_tex_a:448:448"] == "gallery-two_tex_a_448_448.png"
    assert names["a/b"] == "gallery-a_b.png" and names["a b"] == "gallery-a_b-2.png"  # unique
    assert names["Necrosis"] == "gallery-Necrosis-2.png"  # unique on case-insensitive file systems too
    assert all(re.fullmatch(r"gallery-[A-Za-z0-9_-]+\.png", n) for n in names.values())
    assert len({n.lower() for n in names.values()}) == len(keys)


# ----------------------------------------------------------------------------- maps, AnnData
def test_pca_map_points_labels_and_mosaic(cohort_out):
    from slide_clip.explore.clusters import cluster
    from slide_clip.explore.maps import embedding_map

    out, _ = cohort_out
    if not (out / "tables" / "tiny" / "clusters-k2.parquet").is_file():
        cluster([out], k=2, seed=0, maps=False, gallery=False)
    r = embedding_map([out], method="pca", per_slide=30, seed=4, colour_by=["slide", "tumour", "clusters-k2"],
                      mosaic=True)
    pts = r["points"]
    assert r["method"] == "pca" and (pts.groupby("slide_id").size() == 30).all()
    ids, rows, coords, feats = _all_embeddings(out)
    sel = [np.flatnonzero((ids == a) & (rows == b))[0] for a, b in zip(pts["slide_id"], pts["tile"])]
    assert np.array_equal(pts[["x", "y"]].to_numpy(), coords[sel])
    x = feats[sel].astype(np.float64)
    x -= x.mean(0)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    ref = u[:, :2] * s[:2]
    got = pts[["map_1", "map_2"]].to_numpy()
    for k in range(2):  # PCA axes are defined up to sign
        assert min(np.abs(got[:, k] - ref[:, k]).max(), np.abs(got[:, k] + ref[:, k]).max()) < 1e-3
    for sid, sub in pts.groupby("slide_id"):
        st = SlideStore.open(out / f"{sid}.zarr")
        for set_name in ("tumour", "clusters-k2"):
            probs, _, attrs = st.scores("tiny", set_name)
            assert list(sub[f"colour__{set_name.replace('-', '_')}"]) == [attrs["classes"][i] for i in probs[sub["tile"]].argmax(1)]
        assert (sub["colour__slide"] == sid).all()
    names = {p.name for p in r["files"]}
    assert {"tiles-pca-slide.png", "tiles-pca-tumour.png", "tiles-pca-clusters-k2.png", "tiles-pca-mosaic.png",
            "tiles-pca.csv"} <= names
    # the mosaic: thumbnails cover most of the picture (titled, with axes and a legend beside)
    mosaic = np.asarray(Image.open(r["dir"] / "tiles-pca-mosaic.png").convert("RGB")).astype(int)
    assert (mosaic.min(axis=2) > 245).mean() < 0.5, "the mosaic is mostly white"


def test_umap_map_of_tiles_and_slides(cohort_out):
    from slide_clip.explore.maps import embedding_map

    out, _ = cohort_out
    r = embedding_map([out], method="umap", per_slide=20, seed=0)
    assert r["method"] == "umap" and len(r["points"]) == 40 and np.isfinite(r["points"][["map_1", "map_2"]]).all().all()
    s = embedding_map([out], of="slides", method="umap")
    assert s["method"] == "pca"  # two slides: too few points for UMAP; the name says what ran
    assert list(s["points"]["slide_id"]) == list(SCENES)


def test_anndata_export_round_trips(cohort_out, tmp_path):
    import anndata as ad

    from slide_clip.explore.h5ad import export_h5ad

    out, _ = cohort_out
    e = export_h5ad([out], tmp_path / "tiles.h5ad", score_sets=["tumour"])
    a = ad.read_h5ad(e["path"])
    ids, rows, coords, feats = _all_embeddings(out)
    assert a.shape == feats.shape and np.array_equal(a.X, feats)
    assert list(a.obs["slide_id"]) == list(ids) and np.array_equal(a.obs["tile"], rows)
    assert np.array_equal(a.obs[["x", "y"]].to_numpy(), coords)
    assert list(a.obs.index[:2]) == ["two_tex_a:0", "two_tex_a:1"]
    for sid in SCENES:
        probs, _, attrs = SlideStore.open(out / f"{sid}.zarr").scores("tiny", "tumour")
        sub = a.obs[a.obs["slide_id"] == sid]
        assert np.allclose(sub["tumour:p(tumour)"], probs[:, 0])
        assert list(sub["tumour:top"]) == [attrs["classes"][i] for i in probs.argmax(1)]
    assert a.uns["slide_clip"]["model"] == "tiny"


# ----------------------------------------------------------------------------- command line
def test_explore_commands(cohort_out, tiny_registry, tmp_path):
    out, _ = cohort_out
    cli = [sys.executable, "-m", "slide_clip.cli"]

    def run(*args):
        return subprocess.run([*cli, *map(str, args)], capture_output=True, text=True, timeout=600)

    r = run("search", out, "tumour", "--tile", "two_tex_a:448:448", "--top", "4", "--models", tiny_registry,
            "--name", "cli")
    assert r.returncode == 0, r.stderr
    t = pd.read_csv(out / "explore" / "search" / "cli" / "hits.csv")
    assert list(t["query"].unique()) == ["tumour", "two_tex_a:448:448"] and len(t) == 8
    assert (out / "explore" / "search" / "cli" / "gallery.html").is_file()
    # galleries named after their queries
    assert {p.name for p in (out / "explore" / "search" / "cli").glob("gallery-*.png")} == {
        "gallery-tumour.png", "gallery-two_tex_a_448_448.png"}
    r = run("search", out, "--tile", "two_tex_a:448:448", "--top", "4", "--build-index", "--nprobe", "1000",
            "--name", "ann", "--no-gallery")
    assert r.returncode == 0, r.stderr
    a = pd.read_csv(out / "explore" / "search" / "ann" / "hits.csv")  # every list probed: the exact ranking
    exact = t[t["query"] == "two_tex_a:448:448"].reset_index(drop=True)
    assert a[["slide_id", "tile"]].equals(exact[["slide_id", "tile"]])
    assert np.allclose(a["score"], exact["score"], atol=1e-5)
    r = run("cluster", out, "--k", "3", "--per-cluster", "2", "--no-maps")
    assert r.returncode == 0, r.stderr
    assert (out / "tables" / "tiny" / "clusters-k3.parquet").is_file() and "fraction__cluster_2" in r.stdout
    r = run("map", out, "--method", "pca", "--per-slide", "10", "--color-by", "clusters-k3",
            "--h5ad", tmp_path / "m.h5ad")
    assert r.returncode == 0, r.stderr
    assert (out / "explore" / "maps" / "tiny" / "tiles-pca-clusters-k3.png").is_file()
    import anndata as ad

    a = ad.read_h5ad(tmp_path / "m.h5ad")
    assert a.n_obs == 20 and "X_pca" in a.obsm and "clusters-k3:top" in a.obs
    # bad input: one line, no traceback
    r = run("search", out, "--tile", "nope:1:2", "--models", tiny_registry)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not among the cohort" in r.stderr
    r = run("cluster", tmp_path / "missing")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- Prefect
@pytest.mark.usefixtures("prefect_harness")
def test_explore_flow_and_the_cohort_flow_clusters_option(cohort_out, tmp_path):
    from slide_clip_flows.explore_cohort import explore_cohort
    from slide_clip_flows.process_cohort import process_cohort

    out, cfg = cohort_out
    r = explore_cohort(str(out), clusters=2, queries=["necrosis"], map_method="pca", config=cfg, top=3)
    assert r["clusters"]["set"] == "clusters-k2" and r["map"]["method"] == "pca"
    assert pd.read_csv(r["clusters"]["csv"])["slide_id"].tolist() == list(SCENES)
    hits = pd.read_csv(out / "explore" / "search" / "necrosis" / "hits.csv")
    assert len(hits) == 3 and (hits["query"] == "necrosis").all()
    assert any(f.endswith("tiles-pca-clusters-k2.png") for f in r["map"]["files"])
    # the cohort flow: finished slides are skipped, then the tiles are clustered
    table = out / "tables" / "tiny" / "clusters-k3.parquet"
    table.unlink(missing_ok=True)
    state = process_cohort(slides=[str(out.parent / "slides")], out=str(out), config=cfg, prompts=["tumour"],
                           heatmaps=False, clusters=3, return_state=True)
    try:
        res = state.result()
        assert res["failed"] == 0 and {s["status"] for s in res["slides"]} == {"skipped"}
        assert pd.read_parquet(table)["k"].tolist() == [3, 3]
    finally:
        _delete_artifacts_of(state.state_details.flow_run_id)


def _delete_artifacts_of(flow_run_id):
    """Remove a flow run's artifacts: the session's one Prefect harness is shared with
    tests/test_flows.py, which expects one cohort artifact per key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        for a in client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))):
            client.delete_artifact(a.id)


def test_gallery_text_draws_the_micro_sign(tmp_path):
    """The gallery's subtitle says its tiles' size in µm: the µ is drawn as µ, not as the empty
    box of a font without it (Pillow's default font drew "0.5 µm/px" as "0.5 ▯m/px")."""
    import numpy as np
    from PIL import Image

    from slide_clip.explore.gallery import gallery_png

    tile = Image.new("RGB", (32, 32), (200, 100, 200))
    drawn = {}
    for name, char in (("micro", "µ"), ("missing", "\U000F0000")):  # a private-use code point no font has
        p = gallery_png([tile], ["a"], tmp_path / f"{name}.png", title=f"t\ntiles at 0.5 {char}m/px")
        drawn[name] = np.asarray(Image.open(p).convert("L"))
    assert drawn["micro"].shape == drawn["missing"].shape
    assert (drawn["micro"] != drawn["missing"]).any()
