"""The pipeline on object storage against a real S3 server (moto, tests/s3_server.py): slides
and stores at s3:// URLs give the same stores, scores, heatmaps and tables as local disks."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from slide_clip.pipeline import embed_slides
from slide_clip.prompts import load_prompts
from slide_clip.scoring import find_stores, heatmaps, heatmaps_current, summarize, zeroshot
from slide_clip.storage import objects
from slide_clip.store import SlideStore


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory):
    from conftest import tissue_scene

    from slide_clip.synthetic import write_slide

    d = tmp_path_factory.mktemp("cohort")
    return [write_slide(d / f"s{i}.tif", tissue_scene(600 + 100 * i, 500, 0.5), 0.5, levels=2, compression="jpeg")
            for i in range(2)]


def test_embed_on_s3_equals_local(s3, cfg, two_slides, tmp_path):
    bucket = s3.new_bucket()
    urls = [s3.upload(bucket, f"slides/{p.name}", p) for p in two_slides]
    out = f"s3://{bucket}/out"
    remote = embed_slides(urls, out, cfg, progress=False)
    local = embed_slides(two_slides, tmp_path / "out", cfg, progress=False)
    assert [r.status for r in remote] == ["ok", "ok"], [r.error for r in remote]
    for r, l in zip(remote, local):
        assert r.store.startswith(f"s3://{bucket}/out/") and r.name == l.name
        a, b = SlideStore.open(r.store), SlideStore.open(l.store)
        assert np.array_equal(a.embeddings("tiny"), b.embeddings("tiny"))

    prompts = load_prompts("tumour")
    rz = zeroshot(find_stores([out]), prompts, cfg)
    lz = zeroshot(find_stores([tmp_path / "out"]), prompts, cfg)
    assert [s["status"] for s in rz] == ["ok", "ok"], rz
    for a, b in zip(rz, lz):
        assert a["slide_prob"] == b["slide_prob"] and a["mean_prob"] == b["mean_prob"]
    for r, l in zip(remote, local):
        hr = heatmaps(r.store, None, cfg)
        hl = heatmaps(l.store, None, cfg)
        assert [p.name for p in hr] == [p.name for p in hl]
        assert all(str(p).startswith(f"s3://{bucket}/out/heatmaps/") for p in hr)
        assert hr[-1].read_text() == hl[-1].read_text()  # the GeoJSON of the tiles' scores
        assert heatmaps_current(r.store, "tumour", cfg)
    rdf, rcsv, rpq = summarize(out, set_name="tumour")
    ldf, _, _ = summarize(tmp_path / "out", set_name="tumour")
    assert str(rcsv) == f"s3://{bucket}/out/cohort-tumour-tiny.csv"
    assert list(rdf["slide"]) == urls  # the slides' URLs; everything else as the local table
    cols = [c for c in ldf.columns if not c.startswith("seconds") and c not in ("slide", "scores_write_id")]
    pd.testing.assert_frame_equal(rdf[cols], ldf[cols])
    back = pd.read_csv(io.BytesIO(objects.read_bytes(str(rcsv))))
    assert list(back["slide_id"]) == list(ldf["slide_id"])
