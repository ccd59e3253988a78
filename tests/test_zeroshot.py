"""Zero-shot and few-shot scoring of real stores, slide aggregation, heatmaps and summaries."""

import json
import re

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from PIL import Image

from slide_clip.aggregate import slide_scores
from slide_clip.errors import ConfigError, StoreError
from slide_clip.heatmap import grid_to_thumbnail, overlay, probability_grid, smooth_grid
from slide_clip.pipeline import embed_slide
from slide_clip.prompts import load_prompts
from slide_clip.scoring import fewshot, heatmaps, summarize, zeroshot
from slide_clip.store import SlideStore
from slide_clip.synthetic import Region, Scene
from slide_clip.zeroshot import text_classifier


# ----------------------------------------------------------------------------- prompt sets
def test_shipped_prompt_sets():
    t = load_prompts("tumour")
    assert t.class_names == ["tumour", "non-tumour"]
    assert all(tpl.count("{}") == 1 for tpl in t.templates) and len(t.templates) >= 3
    multi = load_prompts("tissue_types")
    assert multi.class_names == ["tumour", "stroma", "necrosis", "lymphocytes", "normal epithelium",
                                 "adipose", "background"]
    assert len(t.hash) == 64 and t.hash != multi.hash


@pytest.mark.parametrize("body,message", [
    ("name: x\ntemplates: ['an image of {}.']\nclasses:\n  - {name: a, synonyms: []}\n  - {name: b, synonyms: [b]}\n",
     "has no synonyms"),
    ("name: x\ntemplates: ['an image of tissue.']\nclasses:\n  - {name: a, synonyms: [a]}\n  - {name: b, synonyms: [b]}\n",
     "exactly one '{}' slot"),
    ("name: x\ntemplates: ['{}']\nclasses:\n  - {name: a, synonyms: [a]}\n  - {name: a, synonyms: [b]}\n",
     "duplicate class 'a'"),
    ("name: x\nname: y\ntemplates: ['{}']\nclasses: []\n", "duplicate key 'name'"),
    ("name: x\ntemplates: ['{}']\nclasses:\n  - {name: a, synonyms: [a]}\n", "at least two classes"),
    ("just a string\n", "must be a mapping"),
])
def test_malformed_prompt_sets_fail_clearly(tmp_path, body, message):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_prompts(p)
    assert message in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def scored(cmu_svs, tmp_path_factory, tiny_registry):
    from slide_clip.config import load_config

    cfg = load_config().with_overrides(encode={"model": "tiny", "registries": (str(tiny_registry),),
                                               "batch_size": 32, "num_workers": 1, "device": "cpu"})
    out = tmp_path_factory.mktemp("zs_out")
    r = embed_slide(cmu_svs, out, cfg, progress=False)
    return out, SlideStore.open(r.store), cfg


# ----------------------------------------------------------------------------- zero-shot
def test_classifier_equals_open_clip_zero_shot_classifier(tiny_encoder):
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    ps = load_prompts("tissue_types")
    # one synonym per class (the class name) so open_clip's builder sees the same texts
    single = ps.model_copy(update={"classes": tuple(c.model_copy(update={"synonyms": (c.name,)})
                                                    for c in ps.classes)})
    ours = text_classifier(tiny_encoder, single)
    ref = build_zero_shot_classifier(tiny_encoder.model, open_clip.get_tokenizer("slideclip-tiny-test"),
                                     single.class_names, list(single.templates), device="cpu")
    assert ours.shape == (7, 32)
    assert np.abs(ours - ref.T.numpy()).max() <= 1e-5


def test_synonyms_and_templates_are_averaged_then_renormalised(tiny_encoder):
    ps = load_prompts("tumour")
    clf = text_classifier(tiny_encoder, ps)
    for i, cls in enumerate(ps.classes):
        texts = [t.format(s) for s in cls.synonyms for t in ps.templates]
        with torch.no_grad():
            e = tiny_encoder.model.encode_text(open_clip.get_tokenizer("slideclip-tiny-test")(texts))
        e = torch.nn.functional.normalize(e, dim=-1).mean(0)
        assert np.abs(clf[i] - torch.nn.functional.normalize(e, dim=0).numpy()).max() <= 1e-5
    assert np.allclose(np.linalg.norm(clf, axis=1), 1, atol=1e-6)


def test_tile_probabilities_equal_direct_softmax(scored, tiny_encoder):
    out, store, cfg = scored
    ps = load_prompts("tumour")
    [summary] = zeroshot([store.path], ps, cfg)
    assert summary["status"] == "ok"
    probs, logits, attrs = store.scores("tiny", "tumour")
    feats = torch.from_numpy(store.embeddings("tiny"))
    clf = torch.from_numpy(text_classifier(tiny_encoder, ps))
    scale = tiny_encoder.model.logit_scale.exp().item()
    ref = torch.softmax(scale * feats @ clf.T, dim=-1).numpy()
    assert np.abs(probs - ref).max() <= 1e-5
    assert attrs["logit_scale"] == pytest.approx(scale)
    assert attrs["classes"] == ["tumour", "non-tumour"] and attrs["prompt_hash"] == ps.hash
    grid = store.group["scores/tiny/tumour/grid"]
    assert grid.shape[0] == 2 and tuple(grid.shape[1:]) == tuple(store.tiling["grid_shape"])


def test_classifier_cached_and_prompt_change_rescoring_without_reencoding(scored, tmp_path):
    out, store, cfg = scored
    ps = load_prompts("tumour")
    zeroshot([store.path], ps, cfg)
    before = store.embeddings("tiny").copy()
    emb_attrs = store.embedding_attrs("tiny")
    # the cached classifier is used: a model that cannot be loaded is never needed
    broken = cfg.with_overrides(encode={"checkpoint": str(tmp_path / "missing.pt"), "model": "tiny"})
    [again] = zeroshot([store.path], ps, broken)
    assert again["status"] == "ok"
    # changed prompts: new classifier (needs the model), new scores, embeddings untouched
    p2 = tmp_path / "tumour2.yaml"
    p2.write_text("name: tumour\ntemplates: ['a photo of {}.']\nclasses:\n"
                  "  - {name: tumour, synonyms: [cancer]}\n  - {name: non-tumour, synonyms: [normal]}\n")
    ps2 = load_prompts(p2)
    old_probs = store.scores("tiny", "tumour")[0]
    zeroshot([store.path], ps2, cfg)
    new_probs, _, attrs = store.scores("tiny", "tumour")
    assert attrs["prompt_hash"] == ps2.hash != ps.hash
    assert not np.allclose(new_probs, old_probs)
    assert np.array_equal(store.embeddings("tiny"), before)
    assert store.embedding_attrs("tiny") == emb_attrs
    assert len(list((out / "classifiers" / "tiny").glob("tumour-*.npz"))) == 2


def test_model_other_than_stored_is_refused(scored, tmp_path, tiny_registry):
    out, store, cfg = scored
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save(open_clip.create_model("slideclip-tiny-test", pretrained=None).state_dict(), other)
    p = tmp_path / "p.yaml"
    p.write_text("name: other\ntemplates: ['{}']\nclasses:\n  - {name: a, synonyms: [a]}\n  - {name: b, synonyms: [b]}\n")
    cfg2 = cfg.with_overrides(encode={"checkpoint": str(other), "model": "tiny"})
    [r] = zeroshot([store.path], load_prompts(p), cfg2)
    assert r["status"] == "failed" and "other weights than model 'tiny'" in r["error"]
    [r] = zeroshot([store.path], load_prompts(p), cfg, model="quiltnet-b-32")
    assert r["status"] == "failed" and "no embeddings from model 'quiltnet-b-32'" in r["error"]


def test_partial_store_is_a_clear_failure(scored, tmp_path):
    out, store, cfg = scored
    import shutil

    copy = tmp_path / "partial.zarr"
    shutil.copytree(store.path, copy)
    s = SlideStore.open(copy)
    s.group["embeddings/tiny"].attrs.update({"status": "partial", "rows_written": 16})
    [r] = zeroshot([copy], load_prompts("tumour"), cfg)
    assert r["status"] == "failed" and "partial (16 of" in r["error"] and "\n" not in r["error"]


# ----------------------------------------------------------------------------- aggregation
def test_slide_scores_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], np.float32)
    logits = np.log(probs) * 10
    tf = np.array([1.0, 0.5, 1.0, 0.5])
    s = slide_scores(probs, logits, tf, ["a", "b"], topk=2, decision="topk")
    assert s["mean_prob"] == pytest.approx({"a": 0.6, "b": 0.4})
    assert s["area_fraction"] == pytest.approx({"a": 1.5 / 3.0, "b": 1.5 / 3.0})
    top_a = (logits[0, 0] + logits[1, 0]) / 2
    top_b = (logits[2, 1] + logits[3, 1]) / 2
    ea, eb = np.exp(top_a), np.exp(top_b)
    assert s["topk_logit"] == pytest.approx({"a": top_a, "b": top_b}, rel=1e-5)
    assert s["slide_prob"]["a"] == pytest.approx(ea / (ea + eb), rel=1e-5)
    assert s["predicted"] == ("a" if ea > eb else "b")
    assert slide_scores(probs, logits, tf, ["a", "b"], decision="mean")["predicted"] == "a"
    assert slide_scores(probs, logits, tf, ["a", "b"], topk=100)["k"] == 4
    empty = slide_scores(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), ["a", "b"])
    assert empty["predicted"] is None and np.isnan(empty["mean_prob"]["a"])


# ----------------------------------------------------------------------------- heatmap pieces
def test_probability_grid_nan_outside_and_overlap_averaged():
    g = probability_grid(np.array([[0, 0], [1, 2]]), np.array([0.2, 0.8]), (2, 3))
    assert g[0, 0] == pytest.approx(0.2) and g[1, 2] == pytest.approx(0.8)
    assert np.isnan(g[0, 1]) and np.isnan(g[1, 0])
    # overlap 0.5: a tile covers 2x2 cells; where two tiles overlap their values are averaged
    g = probability_grid(np.array([[0, 0], [0, 1]]), np.array([0.0, 1.0]), (1, 2), overlap=0.5)
    assert g[0, 0] == pytest.approx(0.0) and g[0, 1] == pytest.approx(0.5) and g[0, 2] == pytest.approx(1.0)
    s = smooth_grid(np.array([[0.0, 1.0, np.nan]]), 1.0)
    assert np.isnan(s[0, 2]) and 0 < s[0, 0] < s[0, 1] < 1


def test_grid_to_thumbnail_places_cells():
    grid = np.array([[0.0, 1.0]])
    vm = grid_to_thumbnail(grid, (100.0, 100.0), (10, 40), (10.0, 10.0))  # thumbnail 400x100 level-0
    assert np.all(vm[:, :10] == 0) and np.all(vm[:, 10:20] == 1) and np.all(np.isnan(vm[:, 20:]))


# ----------------------------------------------------------------------------- few-shot alignment
@pytest.fixture(scope="module")
def two_textures(make_slide, tmp_path_factory, tiny_registry):
    from slide_clip.config import load_config

    mpp = 0.5
    scene = Scene(3000, 2000, (
        Region("ellipse", (100, 100, 2900, 1900), "tissue"),
        Region("rect", (1700, 500, 2500, 1500), "dense"),     # the distinct texture inside tissue
    ))
    path, _ = make_slide("two_textures", mpp=mpp, scene=scene)
    cfg = load_config().with_overrides(
        tiling={"tile_size": 96}, encode={"model": "tiny", "registries": (str(tiny_registry),),
                                          "batch_size": 64, "num_workers": 1, "device": "cpu"})
    out = tmp_path_factory.mktemp("fewshot_out")
    r = embed_slide(path, out, cfg, progress=False)
    return out, SlideStore.open(r.store), scene, cfg, path


def _examples_csv(store, scene, path, tmp):
    coords, ext = store.coords(), store.tiling["tile_extent_level0"][0]
    dense = scene.regions[1].box
    rows = ["slide,x,y,label"]
    rng = np.random.default_rng(0)
    for label, inside in (("dense", True), ("other", False)):
        c = coords[[((dense[0] + ext < x < dense[2] - 2 * ext) and (dense[1] + ext < y < dense[3] - 2 * ext)) == inside
                    and (inside or x < dense[0] - 2 * ext) for x, y in coords]]
        for x, y in c[rng.choice(len(c), 4, replace=False)]:
            rows.append(f"{path},{x},{y},{label}")
    rows.append(f"{path},{int(dense[0]) + 200},{int(dense[1]) + 250},dense")  # not on the grid: read + encoded
    p = tmp / "examples.csv"
    p.write_text("\n".join(rows) + "\n")
    return p


def test_fewshot_heatmap_matches_the_true_region(two_textures, tmp_path):
    out, store, scene, cfg, path = two_textures
    csv = _examples_csv(store, scene, path, tmp_path)
    [r] = fewshot([store.path], csv, cfg, name="textures")
    assert r["status"] == "ok" and r["kind"] == "fewshot" and r["classes"] == ["dense", "other"]
    probs, _, attrs = store.scores("tiny", "textures")
    assert attrs["examples_per_class"] == {"dense": 5, "other": 4}
    t, tissue = store.tiling, store.group["tissue"].attrs
    grid = probability_grid(store.grid(), probs[:, 0], t["grid_shape"])
    mask = store.mask()
    vmap = grid_to_thumbnail(grid, t["stride_level0"], mask.shape, tissue["downsample"])
    truth = scene.truth(mask.shape, texture="dense")
    high = (vmap > 0.5) & mask
    iou = (high & truth).sum() / (high | truth).sum()
    assert iou >= 0.8, iou
    # drawn where it is on the thumbnail: inside the region the overlay takes the high end of the colormap
    img = overlay(store.thumbnail(), mask, vmap, "viridis", 1.0)
    from matplotlib import colormaps

    yellow = np.array(colormaps["viridis"](1.0)[:3]) * 255
    purple = np.array(colormaps["viridis"](0.0)[:3]) * 255
    inner = truth & high
    outer = mask & ~truth & (vmap < 0.5)
    d_in = np.linalg.norm(img[inner].mean(0) - yellow)
    assert d_in < np.linalg.norm(img[inner].mean(0) - purple)
    assert np.linalg.norm(img[outer].mean(0) - purple) < np.linalg.norm(img[outer].mean(0) - yellow)
    files = heatmaps(store.path, "textures", cfg)
    pngs = [f for f in files if f.suffix == ".png"]
    assert [f.name for f in pngs] == ["two_textures_dense.png", "two_textures_other.png"]
    for f in pngs:
        w, h = Image.open(f).size
        assert w <= 2000 and h <= 2000
    gj = json.loads([f for f in files if f.suffix == ".geojson"][0].read_text())
    assert len(gj["features"]) == store.n_tiles
    f0 = gj["features"][0]
    assert f0["properties"]["objectType"] == "tile"
    assert set(f0["properties"]["measurements"]) == {"p(dense)", "p(other)"}
    x, y = store.coords()[0]
    assert f0["geometry"]["coordinates"][0][0] == [float(x), float(y)]


def test_fewshot_from_image_files(two_textures, tmp_path):
    out, store, scene, cfg, path = two_textures
    import openslide

    osr = openslide.OpenSlide(str(path))
    rows = ["image,label"]
    for i, (x, y, label) in enumerate([(2000, 800, "dense"), (2100, 1000, "dense"), (500, 900, "other"),
                                       (700, 1200, "other")]):
        f = tmp_path / f"ex{i}.png"
        osr.read_region((x, y), 0, (96, 96)).convert("RGB").save(f)
        rows.append(f"{f.name},{label}")
    osr.close()
    csv = tmp_path / "images.csv"
    csv.write_text("\n".join(rows) + "\n")
    [r] = fewshot([store.path], csv, cfg)
    assert r["status"] == "ok" and r["score_set"] == "fewshot-images"
    probs, _, _ = store.scores("tiny", "fewshot-images")
    dense = scene.regions[1].box
    coords = store.coords() + store.tiling["tile_extent_level0"][0] / 2
    inside = (coords[:, 0] > dense[0]) & (coords[:, 0] < dense[2]) & (coords[:, 1] > dense[1]) & (coords[:, 1] < dense[3])
    assert probs[inside, 0].mean() > probs[~inside, 0].mean() + 0.2


def test_fewshot_command_names_its_set_and_heatmap_needs_set_only_when_several(two_textures, tmp_path,
                                                                               tiny_registry):
    import os
    import subprocess
    import sys

    out, store, scene, cfg, path = two_textures
    csv = _examples_csv(store, scene, path, tmp_path)
    cli = [sys.executable, "-m", "slide_clip.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([*cli, "fewshot", str(out), "--examples", str(csv), "--models", str(tiny_registry)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "1 of 1 slide scored, 0 failed" in r.stdout
    assert f"score set 'fewshot-examples' (model tiny) written into the slide stores in {out}" in r.stdout
    assert f"slide-clip heatmap {out} --set fewshot-examples" in r.stdout
    sets = [sk for _, sk in store.score_sets("tiny")]
    assert len(sets) >= 2 and "fewshot-examples" in sets
    r = subprocess.run([*cli, "heatmap", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"has {len(sets)} score sets for model 'tiny': {', '.join(sets)}" in r.stderr
    assert "Choose one with --set" in r.stderr


# ----------------------------------------------------------------------------- summaries
def test_summaries_and_cohort_table(two_textures, scored, tmp_path):
    out, store, scene, cfg, path = scored[0], scored[1], None, scored[2], None
    zeroshot([store.path], load_prompts("tumour"), cfg)
    # a slide that failed to embed is part of the cohort table with its error
    status = out / "status"
    status.mkdir(exist_ok=True)
    (status / "broken.json").write_text(json.dumps({"name": "broken", "status": "failed", "slide": "/x/broken.svs",
                                                    "error": "/x/broken.svs: is corrupt"}))
    summary = json.loads((out / "summaries" / "tiny" / "tumour" / f"{store.slide['name']}.json").read_text())
    for key in ("slide_id", "status", "n_tiles", "tissue_area_mm2", "mean_prob", "area_fraction", "slide_prob",
                "predicted", "model", "score_set", "seconds"):
        assert key in summary
    assert summary["tissue_area_mm2"] > 0.5  # CMU-1-Small-Region holds about 1 mm² of tissue
    df, csv_path, pq_path = summarize(out, set_name="tumour")
    assert list(df["slide_id"]) == ["CMU-1-Small-Region", "broken"]
    assert list(df["status"]) == ["ok", "failed"] and df["error"].iloc[1] == "/x/broken.svs: is corrupt"
    assert "slide_prob__tumour" in df.columns and "mean_prob__non_tumour" in df.columns
    back = pd.read_parquet(pq_path)
    assert list(back["slide_id"]) == list(df["slide_id"])
    assert pd.read_csv(csv_path).shape[0] == 2
    with pytest.raises(StoreError, match="no slide summaries"):
        summarize(tmp_path)


def test_table_columns_are_safe_names_and_never_shared(tmp_path):
    """Cohort table columns hold no spaces or colons: ``<metric>__<class>``; two classes that
    would share a column are refused where they are named (prompt set, examples CSV)."""
    from slide_clip.aggregate import summary_row
    from slide_clip.errors import ConfigError
    from slide_clip.examples import read_examples

    row = summary_row({"slide_id": "s", "classes": ["normal epithelium", "non-tumour"],
                       "mean_prob": {"normal epithelium": 0.25, "non-tumour": 0.75},
                       "slide_prob": {"normal epithelium": 0.1, "non-tumour": 0.9}})
    assert row["mean_prob__normal_epithelium"] == 0.25 and row["slide_prob__non_tumour"] == 0.9
    assert row["classes"] == "normal epithelium;non-tumour"
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", c) for c in row)
    ps = load_prompts("tissue_types")
    assert any(" " in c for c in ps.class_names)  # the shipped set has such names, and loads
    p = tmp_path / "p.yaml"
    p.write_text("name: x\ntemplates: ['{}']\nclasses:\n  - {name: a b, synonyms: [a]}\n"
                 "  - {name: a-b, synonyms: [b]}\n")
    with pytest.raises(ConfigError, match="would share the table column name 'a_b'"):
        load_prompts(p)
    csv = tmp_path / "ex.csv"
    csv.write_text("image,label\nx.png,a b\ny.png,a/b\n")
    with pytest.raises(ConfigError, match="labels 'a b' and 'a/b' would share the table column name 'a_b'"):
        read_examples(csv)


def test_a_classifier_cached_by_an_older_text_encoding_is_computed_again(tmp_path):
    """A cached classifier whose meta lacks this slide-clip's text version (written before CONCH's own
    mask was used for prompts holding <pad>) is not used; one of this version is."""
    import json

    from slide_clip.zeroshot import CLASSIFIER_VERSION, ClassifierCache

    cache, ps, w = ClassifierCache(tmp_path / "classifiers"), load_prompts("tumour"), "ab" * 32
    clf = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    p = cache.put("tiny", w, ps, clf)
    assert np.array_equal(cache.get("tiny", w, ps), clf)
    with np.load(p) as z:
        meta = json.loads(str(z["meta"]))
    assert meta["version"] == CLASSIFIER_VERSION
    del meta["version"]
    with open(p, "wb") as f:  # as an older slide-clip wrote it
        np.savez(f, classifier=clf, meta=np.array(json.dumps(meta)))
    assert cache.get("tiny", w, ps) is None
