"""The Prefect flows under one test harness: a cohort with a broken slide, skip-done reruns."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slide_clip.store import SlideStore
from slide_clip.synthetic import Region, Scene

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, make_slide):
    d = tmp_path_factory.mktemp("cohort")
    a, _ = make_slide("tissue_0.5", mpp=0.5)
    b, _ = make_slide("tissue_0.263", mpp=0.263)
    c, _ = make_slide("no_mpp", write_mpp=None)
    broken = d / "broken.svs"
    broken.write_bytes(b"\x00" * 1000)
    manifest = d / "manifest.csv"
    manifest.write_text(
        "path,mpp,patient_id,site\n"
        f"{a},,P1,left\n{b},,P2,right\n{c},0.5,P3,left\n{broken},,P4,right\n"
    )
    return manifest


def _read_artifact(key):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from prefect.client.schemas.sorting import ArtifactSort

    # the newest version of the key: other tests of the session (test_faults' `run`) make the same keys
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                     sort=ArtifactSort.CREATED_DESC, limit=1)


def test_cohort_flow_with_a_broken_slide_then_a_skipping_rerun(cohort, cfg, tmp_path):
    from slide_clip_flows.process_cohort import process_cohort

    out = tmp_path / "out"
    r = process_cohort(slides=[str(cohort)], out=str(out), config=cfg, prompts=["tumour"], max_concurrency=2)
    status = {s["slide_id"]: s for s in r["slides"]}
    assert {k: v["status"] for k, v in status.items()} == {
        "tissue_0.5": "ok", "tissue_0.263": "ok", "no_mpp": "ok", "broken": "failed"}
    assert r["failed"] == 1
    assert "broken.svs: is not a whole-slide image" in status["broken"]["error"]
    for sid in ("tissue_0.5", "tissue_0.263", "no_mpp"):
        store = SlideStore.open(out / f"{sid}.zarr")
        assert store.is_complete("tiny")
        assert store.scores("tiny", "tumour")[0].shape == (store.n_tiles, 2)
        assert (out / "heatmaps" / "tiny" / "tumour" / f"{sid}_tumour.png").is_file()
    assert SlideStore.open(out / "no_mpp.zarr").slide["mpp_source"] == "override"
    # the cohort table: every slide, the broken one with its error, the manifest's metadata
    df = pd.read_csv(r["tables"]["tumour"]["csv"]).set_index("slide_id")
    assert sorted(df.index) == ["broken", "no_mpp", "tissue_0.263", "tissue_0.5"]
    assert df.loc["broken", "status"] == "failed" and "not a whole-slide image" in df.loc["broken", "error"]
    assert df.loc["tissue_0.263", "patient_id"] == "P2" and df.loc["no_mpp", "site"] == "left"
    assert pd.read_parquet(r["tables"]["tumour"]["parquet"]).shape[0] == 4
    # artifacts: the summary table and the markdown report
    [table] = _read_artifact("cohort-summary-tumour")
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {row["slide_id"] for row in rows} == set(df.index)
    [report] = _read_artifact("cohort-report")
    assert report.type == "markdown" and "broken" in report.data and "tissue_0.5_tumour.png" in report.data
    assert _read_artifact("cohort-progress")

    finished = {sid: SlideStore.open(out / f"{sid}.zarr").embedding_attrs("tiny")["finished"]
                for sid in ("tissue_0.5", "tissue_0.263", "no_mpp")}
    # second run: every finished slide is skipped (nothing encoded, nothing re-scored)
    r2 = process_cohort(slides=[str(cohort)], out=str(out), config=cfg, prompts=["tumour"])
    again = {s["slide_id"]: s for s in r2["slides"]}
    for sid, when in finished.items():
        assert again[sid]["status"] == "skipped" and again[sid]["encoded"] == 0
        assert not again[sid]["extra"]["scores"]["tumour"]["rescored"]
        assert SlideStore.open(out / f"{sid}.zarr").embedding_attrs("tiny")["finished"] == when
    assert again["broken"]["status"] == "failed"


def _shard(*slides):
    return [{"path": str(p), "name": Path(p).stem} for p in slides]


def test_changed_prompts_only_rescore_and_force_redoes(make_slide, cfg, tmp_path):
    from slide_clip_flows.process_shard import process_shard

    slide, _ = make_slide("tissue_0.5", mpp=0.5)
    out = tmp_path / "out"
    [first] = process_shard(_shard(slide), str(out), config=cfg, prompts=["tumour"])
    assert first["status"] == "ok" and first["encoded"] > 0
    store = SlideStore.open(first["store"])
    feats = store.embeddings("tiny").copy()
    finished = store.embedding_attrs("tiny")["finished"]
    [second] = process_shard(_shard(slide), str(out), config=cfg, prompts=["tumour", "tissue_types"])
    assert second["encoded"] == 0 and second["status"] == "ok"
    assert second["extra"]["scores"]["tissue_types"]["rescored"] is True
    assert second["extra"]["scores"]["tumour"]["rescored"] is False
    assert SlideStore.open(first["store"]).embedding_attrs("tiny")["finished"] == finished
    [forced] = process_shard(_shard(slide), str(out), config=cfg, prompts=["tumour"], force=True)
    assert forced["encoded"] == store.n_tiles
    assert np.array_equal(SlideStore.open(first["store"]).embeddings("tiny"), feats)


def test_a_bad_slide_fails_alone_in_its_shard_with_its_one_line_error(make_slide, tmp_path, cfg):
    from PIL import Image

    from slide_clip.results import read_status
    from slide_clip_flows.process_shard import process_shard

    good, _ = make_slide("tissue_0.5", mpp=0.5)
    bad = tmp_path / "plain.png"
    Image.new("RGB", (100, 100), "white").save(bad)
    out = tmp_path / "out"
    state = process_shard(_shard(bad, good), str(out), config=cfg, heatmaps=False, shard="shard-1",
                          return_state=True)
    assert state.is_completed()  # one slide's failure never fails its shard
    got = {r["name"]: r for r in state.result()}
    assert got["plain"]["status"] == "failed" and got["plain"]["error"].startswith(f"{bad}: is a plain image")
    assert got["tissue_0.5"]["status"] == "ok" and got["tissue_0.5"]["encoded"] > 0
    for sid in ("plain", "tissue_0.5"):  # each slide's status file, written by this shard run
        assert read_status(out, sid)["status"] == got[sid]["status"]
        assert read_status(out, sid)["extra"]["flow_run_id"] == got[sid]["extra"]["flow_run_id"]
    [table] = _read_artifact("shard-1-slides")
    assert {row["slide"]: row["status"] for row in json.loads(table.data)} == {"plain": "failed",
                                                                                "tissue_0.5": "ok"}
    [prog] = _read_artifact("shard-1-progress")
    assert float(prog.data) == 100.0


def test_cohort_leaves_slides_still_being_copied_for_the_next_run(make_slide, cfg, tmp_path):
    import shutil

    from slide_clip_flows.process_cohort import process_cohort

    src, _ = make_slide("tissue_0.5", mpp=0.5)
    watch = tmp_path / "watch"
    watch.mkdir()
    shutil.copy(src, watch / "arriving.tif")  # copied just now: its mtime is fresh
    out = tmp_path / "out"
    r = process_cohort(slides=[str(watch)], out=str(out), config=cfg, settle_seconds=3600)
    [s] = r["slides"]
    assert s["slide_id"] == "arriving" and s["status"] == "waiting" and r["failed"] == 0
    assert not (out / "arriving.zarr").exists() and not (out / "status" / "arriving.json").exists()


def _corrupt_middle_tile(path):
    """Overwrite one level-0 tile in the middle of the slide with garbage (the file still opens
    and its last tile and reduced levels read: only reading that tile fails)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        k = len(page.dataoffsets) // 2
        offset, size = page.dataoffsets[k], page.databytecounts[k]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * size)


def test_cohort_flow_shares_reader_processes_and_a_slide_failing_mid_read_fails_alone(make_slide, cfg, tmp_path):
    import shutil

    from slide_clip_flows.process_cohort import process_cohort

    src, _ = make_slide("tissue_0.5", mpp=0.5)
    d = tmp_path / "slides"
    d.mkdir()
    for i in range(4):
        shutil.copy(src, d / f"s{i}.tif")
    _corrupt_middle_tile(d / "s1.tif")
    c = cfg.with_overrides(tissue={"thumbnail_max_side": 512})  # the thumbnail comes from a reduced level
    out = tmp_path / "out"
    r = process_cohort(slides=[str(d)], out=str(out), config=c, prompts=["tumour"], heatmaps=False,
                       max_concurrency=3)
    status = {s["slide_id"]: s for s in r["slides"]}
    assert {k: v["status"] for k, v in status.items()} == {"s0": "ok", "s1": "failed", "s2": "ok", "s3": "ok"}
    assert "has corrupt image data at level 0" in status["s1"]["error"] and "\n" not in status["s1"]["error"]
    # the same file three times: the same embeddings, every row in its own store and in order
    ref = SlideStore.open(out / "s0.zarr").embeddings("tiny")
    for sid in ("s2", "s3"):
        assert np.array_equal(SlideStore.open(out / f"{sid}.zarr").embeddings("tiny"), ref)
    # one shard, one executor: one flow run, one encoder at a time, slides in order
    assert r["shards"] == 1
    assert len({status[s]["extra"]["flow_run_id"] for s in status}) == 1
    windows = [status[s]["extra"]["encode_window"] for s in ("s0", "s2", "s3")]
    assert all(a[1] <= b[0] for a, b in zip(windows, windows[1:])), windows
    # a slide's status file is written once it is done, not at the shard's end: s0's at the
    # latest when s2 (two slides on) has encoded, before s3 starts encoding
    assert (out / "status" / "s0.json").stat().st_mtime <= windows[-1][0], windows
