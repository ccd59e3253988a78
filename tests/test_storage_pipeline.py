"""The pipeline on object storage against a real S3 server (moto, tests/s3_server.py): slides
and stores at s3:// URLs give the same stores, scores, heatmaps and tables as local disks."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from slide_clip.pipeline import embed_slides
from slide_clip.results import read_status
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


@pytest.fixture(scope="module")
def local_run(two_slides, tiny_registry, tmp_path_factory):
    """The same slides embedded on local disk: what every s3 run must equal."""
    from slide_clip.config import load_config

    cfg = load_config().with_overrides(encode={"model": "tiny", "registries": (str(tiny_registry),), "batch_size": 16,
                                               "num_workers": 1, "device": "cpu"})
    out = tmp_path_factory.mktemp("local") / "out"
    return out, embed_slides(two_slides, out, cfg, progress=False)


def test_embed_on_s3_equals_local(s3, cfg, two_slides, local_run):
    bucket = s3.new_bucket()
    urls = [s3.upload(bucket, f"slides/{p.name}", p) for p in two_slides]
    out = f"s3://{bucket}/out"
    remote = embed_slides(urls, out, cfg, progress=False)
    local_out, local = local_run
    assert [r.status for r in remote] == ["ok", "ok"], [r.error for r in remote]
    for r, l in zip(remote, local):
        assert r.store.startswith(f"s3://{bucket}/out/") and r.name == l.name
        a, b = SlideStore.open(r.store), SlideStore.open(l.store)
        assert np.array_equal(a.embeddings("tiny"), b.embeddings("tiny"))

    prompts = load_prompts("tumour")
    rz = zeroshot(find_stores([out]), prompts, cfg)
    lz = zeroshot(find_stores([local_out]), prompts, cfg)
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
    ldf, _, _ = summarize(local_out, set_name="tumour")
    assert str(rcsv) == f"s3://{bucket}/out/cohort-tumour-tiny.csv"
    assert list(rdf["slide"]) == urls  # the slides' URLs; everything else as the local table
    cols = [c for c in ldf.columns if not c.startswith("seconds") and c not in ("slide", "scores_write_id")]
    pd.testing.assert_frame_equal(rdf[cols], ldf[cols])
    back = pd.read_csv(io.BytesIO(objects.read_bytes(str(rcsv))))
    assert list(back["slide_id"]) == list(ldf["slide_id"])

    # explore: clusters over the URL stores (their claims), written beside them, as locally
    from slide_clip.explore.clusters import cluster

    rc = cluster([out], k=2, maps=True, gallery=False)
    lc = cluster([local_out], k=2, maps=True, gallery=False)
    assert not rc["failed"] and str(rc["table_path"]).startswith(f"s3://{bucket}/out/tables/")
    pd.testing.assert_frame_equal(rc["table"], lc["table"])
    assert np.array_equal(rc["centroids"], lc["centroids"]) and all(p.exists() for p in rc["maps"])


_WORKER = """
import json, sys
from slide_clip.config import PipelineConfig
from slide_clip.pipeline import embed_slides
from slide_clip.results import read_status
cfg = PipelineConfig.model_validate_json(sys.argv[1])
rs = embed_slides(json.loads(sys.argv[2]), sys.argv[3], cfg, progress=False)
print(json.dumps([{"name": r.name, "status": r.status, "encoded": r.encoded, "error": r.error} for r in rs]))
"""


def test_two_workers_one_s3_cohort_each_slide_encoded_once(s3, cfg, two_slides, local_run):
    """Two runs in separate processes over one cohort at s3:// (in opposite orders) and one s3
    output folder: the claims give each slide to one of them; every tile is encoded once in all,
    a slide the other run holds is its busy line (never a second writer), and the stores equal
    the local run's."""
    import json
    import subprocess
    import sys

    bucket = s3.new_bucket()
    urls = [s3.upload(bucket, f"slides/{p.name}", p) for p in two_slides]
    out = f"s3://{bucket}/out"
    config = cfg.model_dump_json()
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, config, json.dumps(order), out],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for order in (urls, urls[::-1])]  # the environment carries the endpoint and credentials
    runs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-2000:]
        runs.append(json.loads(stdout.strip().splitlines()[-1]))
    local_out, local = local_run
    for l in local:
        mine = [r for run in runs for r in run if r["name"] == l.name]
        assert sum(r["encoded"] for r in mine) == l.n_tiles  # encoded once, by one run
        for r in mine:
            assert r["status"] in ("ok", "skipped") or "is being written by another run" in r["error"], r
        a, b = SlideStore.open(f"{out}/{l.name}.zarr"), SlideStore.open(l.store)
        assert a.is_complete("tiny") and np.array_equal(a.embeddings("tiny"), b.embeddings("tiny"))
        assert read_status(out, l.name)["status"] in ("ok", "skipped")  # the holder's, never the busy line
        assert np.array_equal(a.coords(), b.coords())


def test_cohort_folder_and_manifest_at_urls(s3, two_slides, tmp_path):
    """A folder URL is listed through fsspec by the local rules (slides taken, hidden files,
    stores and other formats skipped with reasons); a manifest CSV at a URL names slides by URL,
    relative paths being URLs beside it; ids are the slides' names."""
    from slide_clip.manifest import cohort_scan

    bucket = s3.new_bucket()
    base = f"s3://{bucket}/cohort"
    for p in two_slides:
        s3.upload(bucket, f"cohort/site/{p.name}", p)
    notes, vsi = tmp_path / "notes.txt", tmp_path / "x.vsi"
    notes.write_text("not a slide")
    vsi.write_text("olympus")
    s3.upload(bucket, "cohort/site/notes.txt", notes)
    s3.upload(bucket, "cohort/.hidden.svs", notes)
    s3.upload(bucket, "cohort/x.vsi", vsi)
    s3.upload(bucket, "cohort/old.zarr/zarr.json", notes)
    slides, skipped = cohort_scan([base])
    assert [c.path for c in slides] == [f"{base}/site/{p.name}" for p in two_slides]
    assert [c.slide_id for c in slides] == [p.stem for p in two_slides]
    reasons = {s.shown: s.reason for s in skipped}
    assert reasons[".hidden.svs"] == "hidden file" and reasons["site/notes.txt"] == "not a slide image"
    assert "Olympus" in reasons["x.vsi"] and "output" in reasons["./"], reasons
    from slide_clip.scan import record_skipped

    line, written = record_skipped(f"s3://{bucket}/out", skipped)  # the list beside the stores, at the URL
    assert str(written) == f"s3://{bucket}/out/skipped-files.csv" and "x.vsi" in line
    assert f"{base}/x.vsi," in objects.read_text(str(written))

    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"path,patient_id\nsite/{two_slides[0].name},p1\n{base}/site/{two_slides[1].name},p2\n")
    url = s3.upload(bucket, "cohort/cohort.csv", manifest)
    rows, _ = cohort_scan([url])
    assert [(c.path, c.patient_id) for c in rows] == [(f"{base}/site/{p.name}", f"p{i + 1}")
                                                      for i, p in enumerate(two_slides)]


def test_bad_credentials_and_missing_bucket_are_one_line(s3, cfg, two_slides, monkeypatch, tmp_path):
    """embed with a slide or an output folder the service refuses: one StorageError line naming the URL."""
    from slide_clip.errors import StorageError

    bucket = s3.new_bucket()
    url = s3.upload(bucket, f"slides/{two_slides[0].name}", two_slides[0])
    with pytest.raises(StorageError) as e:
        embed_slides([url], f"s3://no-such-bucket-{bucket}/out", cfg, progress=False)
    assert "bucket does not exist" in str(e.value) and f"s3://no-such-bucket-{bucket}/out" in str(e.value)
    assert "\n" not in str(e.value)
    [r] = embed_slides([f"s3://{bucket}/slides/missing.tif"], tmp_path / "out", cfg, progress=False)
    assert r.status == "failed" and "no such object" in r.error and "missing.tif" in r.error and "\n" not in r.error
    import os

    from slide_clip.storage.filesystems import filesystem

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    filesystem(url)[0].clear_instance_cache()  # a new client, with the wrong key
    try:
        [r] = embed_slides([url], tmp_path / "out2", cfg, progress=False)
    finally:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        filesystem(url)[0].clear_instance_cache()
    assert r.status == "failed" and url in r.error and "credentials" in r.error, r.error
    assert "\n" not in r.error


def test_reader_handles_of_a_url_are_keyed_by_its_etag(s3, monkeypatch, tmp_path):
    """A reader pool outliving a run never reads a slide replaced at the same URL from a stale
    handle: the handle's key holds the object's ETag (an object store has no inode or mtime)."""
    import slide_clip.loader as loader

    monkeypatch.setattr(loader, "REMOTE_KEY_SECONDS", 0.0)
    bucket = s3.new_bucket()
    f = tmp_path / "a.tif"
    f.write_bytes(b"II*\x00" + b"a" * 100)
    url = s3.upload(bucket, "a.tif", f)
    first = loader.file_key(url)
    assert first == loader.file_key(url)
    f.write_bytes(b"II*\x00" + b"b" * 100)  # the same size, other bytes
    s3.upload(bucket, "a.tif", f)
    assert loader.file_key(url) != first


def test_config_storage_section_reaches_the_urls(s3, cfg, two_slides):
    """A config whose storage section names the endpoint is enough (no process-wide settings):
    the library applies it before opening any URL."""
    from slide_clip.config import StorageConfig
    from slide_clip.storage import options

    bucket = s3.new_bucket()
    url = s3.upload(bucket, f"slides/{two_slides[0].name}", two_slides[0])
    section = options.current()
    options.configure(StorageConfig())  # the defaults: AWS itself, unreachable here
    [r] = embed_slides([url], f"s3://{bucket}/out", cfg.with_overrides(storage=section.model_dump()),
                       progress=False)
    assert r.status == "ok" and r.store == f"s3://{bucket}/out/s0.zarr", r.error
    assert options.current().endpoint_url == s3.endpoint


def test_executor_prefetches_the_next_slides_that_need_a_local_copy(s3, cmu_dicom):
    """While slide i encodes, the executor stages the slides after it that only a whole local
    copy serves (a DICOM folder at a URL), each once; opening one later is a cache hit."""
    from slide_clip.executor import Prefetch
    from slide_clip.storage.cache import default_cache

    bucket = s3.new_bucket()
    for f in sorted(p for p in cmu_dicom.iterdir() if p.is_file()):
        s3.upload(bucket, f"dicom/{cmu_dicom.name}/{f.name}", f)
    url = f"s3://{bucket}/dicom/{cmu_dicom.name}/"
    cache = default_cache()
    ahead = Prefetch(["/local/first.svs", url], ahead=2)
    ahead.after(0)
    ahead.after(0)  # asked again: nothing more to stage
    cache.close()  # waits for the background copies
    assert cache.misses == 1
    cache.stage(url)
    assert cache.hits == 1 and cache.misses == 1


def test_a_failed_encode_at_a_url_raises_its_own_error(s3, cfg, two_slides, monkeypatch):
    """An encode that fails mid-slide writes what it has while the store is still this run's
    (its claim), and the slide's own error is what is raised, never the lost-claim refusal."""
    import slide_clip.executor as executor
    from slide_clip.manifest import CohortSlide

    bucket = s3.new_bucket()
    url = s3.upload(bucket, f"slides/{two_slides[0].name}", two_slides[0])

    def boom(*a, **k):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(executor, "run_encoding", boom)
    with executor.SlideRun(cfg, f"s3://{bucket}/out") as run:
        prepared = run.prepare(CohortSlide(url, name="s0"))
        with pytest.raises(RuntimeError, match="the device fell over"):
            run.finish(prepared)
    assert not objects.exists(f"s3://{bucket}/out/s0.zarr.claim")  # released at the end


def test_the_commands_take_urls_and_storage_options(s3, cfg, two_slides, local_run, tiny_registry, tmp_path):
    """`embed`, `zeroshot`, `heatmap`, `summarize`, `search` and `map` on s3:// URLs from the command line, with the
    endpoint given by --storage-options over a --config file's storage section (the command line
    wins); the stores equal the local run's."""
    import os
    import subprocess
    import sys

    from slide_clip.storage import options

    bucket = s3.new_bucket()
    for p in two_slides:
        s3.upload(bucket, f"cli/slides/{p.name}", p)
    out = f"s3://{bucket}/cli/out"
    cfg_file = tmp_path / "config.yaml"  # a wrong endpoint in the file: --storage-options must win
    cfg_file.write_text("storage:\n  endpoint_url: http://127.0.0.1:9\n")
    env = {k: v for k, v in os.environ.items() if k != options.ENV}  # only the command line names the server
    env.update({**s3.credentials(), "AWS_DEFAULT_REGION": "us-east-1", "HF_HUB_OFFLINE": "1"})
    so = ["--storage-options", f"endpoint_url={s3.endpoint}"]
    common = ["--models", str(tiny_registry), "--config", str(cfg_file)]

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "slide_clip.cli", *so, *args], capture_output=True, text=True,
                           env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    r = cli("embed", f"s3://{bucket}/cli/slides", "--out", out, *common, "--model", "tiny", "--workers", "1",
            "--device", "cpu", "--batch-size", "16", "--no-progress")
    assert f"2 of 2 slides done, 0 failed; stores in {out}" in r.stdout
    local_out, local = local_run
    for l in local:
        a = SlideStore.open(f"{out}/{l.name}.zarr")
        assert np.array_equal(a.embeddings("tiny"), SlideStore.open(l.store).embeddings("tiny"))
    r = cli("zeroshot", out, "--prompts", "tumour", *common)
    assert "2 of 2 slides scored" in r.stdout and f"written into the slide stores in {out}" in r.stdout
    r = cli("heatmap", out, "--config", str(cfg_file))
    written = r.stdout.split()
    assert written and all(w.startswith(f"{out}/heatmaps/") for w in written)
    cli("summarize", out)
    df = pd.read_csv(io.BytesIO(objects.read_bytes(f"{out}/cohort-tumour-tiny.csv")))
    assert sorted(df["slide_id"]) == sorted(l.name for l in local)

    from slide_clip.explore.retrieval import read_hits, search

    x, y = SlideStore.open(local[0].store).coords()[0]
    tile = f"{local[0].name}:{x}:{y}"
    r = cli("search", out, "--tile", tile, "--top", "5", "--name", "q", "--no-gallery")
    assert f"{out}/explore/search/q/hits.csv" in r.stdout.split()
    lr = search([local_out], cfg, tiles=[tile], top=5, name="q", gallery=False)
    pd.testing.assert_frame_equal(read_hits(f"{out}/explore/search/q/hits.parquet"), lr["table"])
    r = cli("map", out, "--method", "pca", "--per-slide", "20")
    assert f"{out}/explore/maps/tiny/tiles-pca.csv" in r.stdout.split()
    assert objects.exists(f"{out}/explore/maps/tiny/tiles-pca-slide.png")


def test_run_on_s3_equals_local(s3, two_slides, local_run, tiny_registry, tmp_path):
    """`slide-clip run` (the cohort flow, its shard run and products, on a temporary Prefect
    server) with slides and output folder at s3:// URLs: stores equal to the local run's, status
    files, summaries and the cohort table beside them."""
    import json
    import os
    import subprocess
    import sys

    from slide_clip.storage import options

    bucket = s3.new_bucket()
    for p in two_slides:
        s3.upload(bucket, f"run/slides/{p.name}", p)
    out = f"s3://{bucket}/run/out"
    env = {k: v for k, v in os.environ.items() if k not in (options.ENV, "PREFECT_API_URL")}
    env.update({**s3.credentials(), "AWS_DEFAULT_REGION": "us-east-1", "HF_HUB_OFFLINE": "1",
                "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    r = subprocess.run([sys.executable, "-m", "slide_clip_flows.cli", "--storage-options",
                        f"endpoint_url={s3.endpoint}", "run", f"s3://{bucket}/run/slides", "--out", out,
                        "--models", str(tiny_registry), "--model", "tiny", "--workers", "1", "--device", "cpu",
                        "--batch-size", "16", "--no-heatmaps"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    _, local = local_run
    for l in local:
        a = SlideStore.open(f"{out}/{l.name}.zarr")
        assert np.array_equal(a.embeddings("tiny"), SlideStore.open(l.store).embeddings("tiny"))
        status = json.loads(objects.read_bytes(f"{out}/status/{l.name}.json"))
        assert status["status"] == "ok" and status["store"] == f"{out}/{l.name}.zarr"
    df = pd.read_csv(io.BytesIO(objects.read_bytes(f"{out}/cohort-tumour-tiny.csv")))
    assert sorted(df["slide_id"]) == sorted(l.name for l in local)
    # the live progress read the s3 folder: a line per slide as it finished
    done = [ln.split() for ln in r.stderr.splitlines() if ln.startswith("[") and "/2]" in ln]
    assert sorted((d[1], d[2]) for d in done) == [("ok", l.name) for l in sorted(local, key=lambda l: l.name)], \
        r.stderr[-3000:]


def _copy_stores(s3, local_out, bucket: str, prefix: str = "copy") -> str:
    """The local run's output folder copied object by object to ``s3://bucket/prefix`` (its stores
    as they are, so the remote cohort is the local one by construction); returns the URL."""
    for f in sorted(local_out.rglob("*")):
        if f.is_file() and not f.name.endswith(".lock"):
            s3.upload(bucket, f"{prefix}/{f.relative_to(local_out).as_posix()}", f)
    return f"s3://{bucket}/{prefix}"


def test_search_and_map_on_s3_equal_local(s3, cfg, local_run, tmp_path):
    """search (a stored tile's query, exact and with the FAISS index; an image query at a URL) and
    map over stores at an s3:// URL: tables, galleries, index, pictures and the AnnData export
    written beside the stores, results equal to the same calls on the local stores."""
    from slide_clip.explore.maps import embedding_map
    from slide_clip.explore.retrieval import read_hits, search

    local_out, local = local_run
    bucket = s3.new_bucket()
    out = _copy_stores(s3, local_out, bucket)
    x, y = SlideStore.open(local[0].store).coords()[0]
    q = f"{local[0].name}:{x}:{y}"
    for kw in ({}, {"build_index": True}):
        r = search([out], cfg, tiles=[q], top=5, name="q", html_page=True, **kw)
        lr = search([local_out], cfg, tiles=[q], top=5, name="q", html_page=True, **kw)
        assert not r["failed"] and str(r["dir"]) == f"{out}/explore/search/q"
        pd.testing.assert_frame_equal(r["table"], lr["table"])
        assert [str(f).removeprefix(out) for f in r["files"]] == [str(f).removeprefix(str(local_out))
                                                                 for f in lr["files"]]
        assert all(objects.exists(str(f)) for f in r["files"])
        pd.testing.assert_frame_equal(read_hits(f"{out}/explore/search/q/hits.parquet"), lr["table"])
        pd.testing.assert_frame_equal(read_hits(f"{out}/explore/search/q/hits.csv"), read_hits(lr["files"][0]))
    m = embedding_map([out], method="pca", colour_by=("slide",), mosaic=True, per_slide=20)
    lm = embedding_map([local_out], method="pca", colour_by=("slide",), mosaic=True, per_slide=20)
    pd.testing.assert_frame_equal(m["points"], lm["points"])
    assert [str(f).removeprefix(out) for f in m["files"]] == [str(f).removeprefix(str(local_out)) for f in lm["files"]]
    assert all(objects.exists(str(f)) for f in m["files"])
    back = pd.read_csv(io.BytesIO(objects.read_bytes(str(m["files"][-1]))))
    pd.testing.assert_frame_equal(back, pd.read_csv(lm["files"][-1]))

    # an image query read from a URL; the AnnData export written to one
    import anndata

    from slide_clip.explore.h5ad import export_h5ad
    from PIL import Image

    img = tmp_path / "query.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(img)
    url = s3.upload(bucket, "queries/query.png", img)
    r = search([out], cfg, images=[url], top=5, gallery=False)
    lr = search([local_out], cfg, images=[img], top=5, gallery=False)
    pd.testing.assert_frame_equal(r["table"], lr["table"])
    from slide_clip.errors import SlideClipError

    with pytest.raises(SlideClipError) as e:
        search([out], cfg, images=[f"s3://{bucket}/queries/none.png"], top=5, gallery=False)
    assert f"s3://{bucket}/queries/none.png" in str(e.value) and "\n" not in str(e.value)
    h = export_h5ad([out], f"{out}/tiles.h5ad", per_slide=20)
    lh = export_h5ad([local_out], tmp_path / "tiles.h5ad", per_slide=20)
    (tmp_path / "back.h5ad").write_bytes(objects.read_bytes(f"{out}/tiles.h5ad"))
    a, b = anndata.read_h5ad(tmp_path / "back.h5ad"), anndata.read_h5ad(lh["path"])
    assert str(h["path"]) == f"{out}/tiles.h5ad" and np.array_equal(a.X, b.X) and list(a.obs_names) == list(b.obs_names)


def test_fewshot_on_s3_equals_local(s3, cfg, local_run, tmp_path):
    """fewshot over stores at an s3:// URL, with the examples CSV local and at a URL (its image
    row a relative name, read beside it at the URL): the same scores as over the local stores."""
    from PIL import Image

    from slide_clip.examples import read_examples
    from slide_clip.scoring import fewshot

    local_out, local = local_run
    bucket = s3.new_bucket()
    out = _copy_stores(s3, local_out, bucket)
    (x0, y0), (x1, y1) = (SlideStore.open(l.store).coords()[0] for l in local)
    patch = tmp_path / "patch.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(patch)
    csv = tmp_path / "examples.csv"
    csv.write_text(f"slide,x,y,label,image\n{local[0].name},{x0},{y0},a,\n{local[1].name},{x1},{y1},b,\n,,,b,patch.png\n")
    url = s3.upload(bucket, "ex/examples.csv", csv)
    s3.upload(bucket, "ex/patch.png", patch)
    assert read_examples(url)[2].image == f"s3://{bucket}/ex/patch.png"
    want = fewshot(find_stores([local_out]), csv, cfg, name="fs")
    for examples in (csv, url):
        got = fewshot(find_stores([out]), examples, cfg, name="fs")
        assert [g["status"] for g in got] == ["ok", "ok"], got
        for a, b in zip(got, want):
            assert a["slide_prob"] == b["slide_prob"] and a["mean_prob"] == b["mean_prob"]
        for l in local:  # the score sets written into the stores at the URL
            a, b = SlideStore.open(f"{out}/{l.name}.zarr"), SlideStore.open(l.store)
            assert np.array_equal(a.scores("tiny", "fs")[0], b.scores("tiny", "fs")[0])


def test_bags_on_s3_equal_local(s3, local_run, tmp_path):
    """The survival cohort (stores, patients.csv written and read at the URL), its pooled tables
    and HDF5 bags with the output folder (and the bags' folder) at s3:// URLs: the same as over
    a local copy of the stores."""
    import shutil

    import h5py

    from slide_clip.manifest import CohortSlide, read_patients, record_patients
    from slide_clip.survival import export_h5, open_cohort, write_pooled_tables

    local_out, local = local_run
    bucket = s3.new_bucket()
    out = _copy_stores(s3, local_out, bucket)
    here = tmp_path / "out"
    shutil.copytree(local_out, here, ignore=shutil.ignore_patterns("*.lock"))
    slides = [CohortSlide(str(l.slide), patient_id="p1", name=l.name) for l in local]
    assert str(record_patients(out, slides)) == f"{out}/patients.csv"
    record_patients(here, slides)
    assert read_patients(out) == read_patients(here) == {l.name: "p1" for l in local}
    rc, lc = open_cohort(out), open_cohort(here)
    assert rc.patients == lc.patients == {"p1": sorted(l.name for l in local)}
    rt, lt = write_pooled_tables(rc), write_pooled_tables(lc)
    assert [str(p) for p in rt] == [f"{out}/tables/tiny/slides.parquet", f"{out}/tables/tiny/patients.parquet"]
    for r, l in zip(rt, lt):
        pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(objects.read_bytes(str(r)))), pd.read_parquet(l))
    # a manifest at a URL gives the slides their patients
    objects.write_text(f"s3://{bucket}/cohort.csv",
                       "path,patient_id\n" + "".join(f"{l.slide},p{i}\n" for i, l in enumerate(local)))
    assert open_cohort(out, manifest=f"s3://{bucket}/cohort.csv").patients == \
        {f"p{i}": [l.name] for i, l in enumerate(local)}
    # a clinical table at a URL reads as the local file does (CSV and Parquet); a missing one is one line
    from slide_clip.errors import ConfigError
    from slide_clip.survival.clinical import read_clinical

    clin = pd.DataFrame({"patient_id": ["p0", "p1", "p2"], "months": [12.5, 30.0, 7.0], "dead": [1, 0, 1]})
    clin.to_csv(tmp_path / "clinical.csv", index=False)
    clin.to_parquet(tmp_path / "clinical.parquet", index=False)
    for name in ("clinical.csv", "clinical.parquet"):
        url = s3.upload(bucket, f"clinical/{name}", tmp_path / name)
        a, b = read_clinical(url, "months", "dead"), read_clinical(tmp_path / name, "months", "dead")
        pd.testing.assert_frame_equal(a.table, b.table)
        assert a.source == url
    with pytest.raises(ConfigError, match=f"s3://{bucket}/clinical/none.csv: clinical table not found"):
        read_clinical(f"s3://{bucket}/clinical/none.csv", "months", "dead")

    rb = export_h5(rc, f"s3://{bucket}/bags", "patient")
    lb = export_h5(lc, tmp_path / "bags", "patient")
    assert [str(p) for p in rb] == [f"s3://{bucket}/bags/p1.h5"]
    with h5py.File(io.BytesIO(objects.read_bytes(str(rb[0]))), "r") as a, h5py.File(lb[0], "r") as b:
        for k in ("features", "coords", "slide_index"):
            assert np.array_equal(a[k][:], b[k][:])
        assert dict(a.attrs)["id"] == "p1" and list(a.attrs["slide_ids"]) == list(b.attrs["slide_ids"])


def test_survival_run_folder_at_a_url_is_uploaded_whole(s3):
    """A survival run folder at an s3:// URL: written locally, uploaded at commit with report.json
    last; the previous run's objects that the new run lacks are gone; a run that fails before its
    commit leaves the previous run's objects as they were."""
    from slide_clip.storage.filesystems import filesystem
    from slide_clip.survival.rundir import run_folder

    bucket = s3.new_bucket()
    final = f"s3://{bucket}/out/survival/coxnet/run"
    fs, root = filesystem(final)

    def write(rf, files):
        for rel, text in files.items():
            (rf.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (rf.path / rel).write_text(text)

    with run_folder(final) as rf:
        write(rf, {"report.json": "1", "risk.csv": "1", "models/fold0.json": "1"})
        assert not fs.exists(root) and rf.path.name.startswith(".run.partial-")
        assert str(rf.commit()) == final
    assert not rf.path.exists()
    with pytest.raises(RuntimeError):
        with run_folder(final) as rf:
            write(rf, {"report.json": "2", "risk.csv": "2"})
            raise RuntimeError("the training failed")
    fs.invalidate_cache()
    assert sorted(fs.find(root)) == [f"{root}/models/fold0.json", f"{root}/report.json", f"{root}/risk.csv"]
    assert objects.read_text(f"{final}/report.json") == "1"
    with run_folder(final) as rf:
        write(rf, {"report.json": "3", "risk.csv": "3", "km.png": "3"})
        rf.commit()
    fs.invalidate_cache()
    assert sorted(fs.find(root)) == [f"{root}/km.png", f"{root}/report.json", f"{root}/risk.csv"]
    assert all(objects.read_text(f"{final}/{n}") == "3" for n in ("report.json", "risk.csv", "km.png"))
    puts = [r[1] for r in s3.proxy.requests("PUT") if "/survival/coxnet/run/" in r[1]]
    assert puts[-1].split("?")[0].endswith("/run/report.json") and len(puts) == 6  # the marker last, each run


def test_run_progress_reads_an_output_folder_at_a_url(s3):
    """`run`'s progress over an s3:// output folder: a slide encoding from its store's rows written, a
    slide finished in this run from its status object; a status left by an earlier run is not
    news (versions listed at the start, no clock of the service compared)."""
    import json

    from slide_clip.storage.filesystems import upath
    from slide_clip_flows.progress import RunProgress
    from test_run_progress import D, N, _store_being_encoded

    from slide_clip.storage.owner import store_owner

    bucket = s3.new_bucket()
    out = f"s3://{bucket}/out"
    objects.write_text(f"{out}/status/old.json", json.dumps({"name": "old", "status": "ok", "n_tiles": 5}))
    feats = np.random.default_rng(1).standard_normal((N, D)).astype(np.float32)
    lines = []
    with store_owner(f"{out}/s1.zarr"):  # the writer's claim, as a run's
        w = _store_being_encoded(upath(out), "s1")
        w.append(feats[:64])
        w.flush()
        progress = RunProgress(out, ["old", "s1"], "tiny", lines.append, every=0.0)
        progress.look()
        assert lines == ["encoding s1: 300 tiles, 64 already written"]
        w.append(feats[64:128])
        w.flush()
        progress.look()
        assert lines[1] == "encoding s1: 128 of 300 tiles", lines
    objects.write_text(f"{out}/status/s1.json", json.dumps({"name": "s1", "status": "ok", "n_tiles": N,
                                                            "encoded": N}))
    objects.write_text(f"{out}/status/old.json", json.dumps({"name": "old", "status": "skipped", "n_tiles": 5}))
    progress.look()
    assert [ln for ln in lines if ln.startswith("[")] == ["[1/2] skipped old  5 tiles, 0 encoded",
                                                          "[2/2] ok      s1  300 tiles, 300 encoded"], lines


def test_an_object_written_by_another_process_is_seen_after_a_listing(s3, tmp_path):
    """A long-lived process (the cohort flow waiting for a worker's shard) lists a folder, then
    another process writes a slide's status into it: reading it must find it. (fsspec kept the
    listing and answered "absent" from it: `run --deployment` at s3 reported a slide the worker
    had finished as not processed.)"""
    import json

    from slide_clip.results import read_status
    from slide_clip.storage.filesystems import upath

    bucket = s3.new_bucket()
    out = f"s3://{bucket}/out"
    objects.write_text(f"{out}/status/a.json", json.dumps({"name": "a", "status": "ok"}))
    assert [p.name for p in (upath(out) / "status").glob("*.json")] == ["a.json"]  # listed, as a display does
    assert read_status(out, "b") is None
    (tmp_path / "b.json").write_text(json.dumps({"name": "b", "status": "ok"}))
    s3.upload(bucket, "out/status/b.json", tmp_path / "b.json")  # another client, as another process
    assert read_status(out, "b") == {"name": "b", "status": "ok"}
    assert sorted(p.name for p in (upath(out) / "status").glob("*.json")) == ["a.json", "b.json"]
    assert objects.exists(f"{out}/status/b.json")


def test_a_watched_slide_at_a_url_settles_by_its_objects_time(s3, two_slides, tmp_path):
    """`serve --watch s3://...`: a slide is left for the next run while its objects are younger than
    --settle (the storage service's LastModified); a folder's newest object counts."""
    import time

    from slide_clip.manifest import CohortSlide, last_modified, split_settled

    bucket = s3.new_bucket()
    url = s3.upload(bucket, "watch/s0.tif", two_slides[0])
    t = last_modified(url)
    assert abs(t - time.time()) < 120
    ready, waiting = split_settled([CohortSlide(url)], 60)
    assert (ready, [w.path for w in waiting]) == ([], [url])
    ready, waiting = split_settled([CohortSlide(url)], 60, now=t + 61)
    assert ([r.path for r in ready], waiting) == ([url], [])
    s3.upload(bucket, "watch/series/a.dcm", two_slides[0])
    time.sleep(1.1)
    s3.upload(bucket, "watch/series/b.dcm", two_slides[1])
    newest = last_modified(f"s3://{bucket}/watch/series")
    assert newest >= last_modified(f"s3://{bucket}/watch/series/a.dcm") + 1
    assert newest == last_modified(f"s3://{bucket}/watch/series/b.dcm")
