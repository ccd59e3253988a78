"""Stores, claims and files at URLs against a real S3 server (moto, tests/s3_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from slide_clip.errors import ConfigError, StorageError, StoreBusyError, StoreError
from slide_clip.storage.claims import claim, check_claimed
from slide_clip.store import SlideStore, store_path

N, D = 300, 16


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    coords = np.stack([np.arange(N) * 224, np.arange(N) % 7 * 224], 1).astype(np.int64)
    grid = np.stack([np.arange(N) // 20, np.arange(N) % 20], 1).astype(np.int32)
    return {"coords": coords, "grid": grid, "frac": rng.random(N).astype(np.float32),
            "mask": rng.random((40, 60)) > 0.5, "thumb": rng.integers(0, 255, (40, 60, 3), dtype=np.uint8),
            "feats": rng.standard_normal((N, D)).astype(np.float32)}


PROV = {"name": "tiny", "embed_dim": D, "weights_sha256": "a" * 64}


def _write(path, a, *, rows=64, stop_after=None, provenance=PROV):
    """Write a store through the SlideStore API; stop (as a killed run) after ``stop_after`` rows."""
    st = SlideStore.create(path, {"name": "s"}, {"tile_size": 224})
    st.write_tissue(a["mask"], a["thumb"], {"algorithm": 2})
    st.write_tiles(a["coords"], a["grid"], a["frac"], {"n": N})
    return _embed(st, a, rows=rows, stop_after=stop_after, provenance=provenance)


def _embed(st, a, *, rows=64, stop_after=None, provenance=PROV):
    w = st.begin_embeddings(provenance, chunk_rows=rows)
    for start in range(w.next_row, N, 32):
        if stop_after is not None and start >= stop_after:
            return st
        w.append(a["feats"][start:start + 32])
    w.flush()
    return st


def _same(a: SlideStore, b: SlideStore, model="tiny"):
    for get in (lambda s: s.coords(), lambda s: s.grid(), lambda s: s.tissue_fraction(), lambda s: s.mask(),
                lambda s: s.thumbnail(), lambda s: s.embeddings(model)):
        x, y = get(a), get(b)
        assert x.dtype == y.dtype and np.array_equal(x, y)
    keep = lambda d: {k: v for k, v in d.items() if k not in ("created", "started", "updated", "finished")}  # noqa: E731
    assert keep(a.embedding_attrs(model)) == keep(b.embedding_attrs(model))


def _objects(s3, bucket, prefix=""):
    return [o["Key"] for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]


def test_store_on_s3_equals_local_and_replaces_by_pointer(s3, tmp_path):
    """A store written at an s3:// URL equals, array for array, the same store written locally;
    replacing a score set or an embedding group there goes through the parent's pointer: readers
    see one version, the old one is deleted, no temporary object is left."""
    a = _arrays()
    bucket = s3.new_bucket()
    url = store_path(f"s3://{bucket}/out", "s")
    assert str(url) == f"s3://{bucket}/out/s.zarr"
    local = _write(tmp_path / "s.zarr", a)
    with claim(url):
        remote = _write(url, a)
    remote = SlideStore.open(str(url))
    assert remote.status == "tiled" and remote.is_complete("tiny")
    _same(remote, local)

    with claim(url):
        st = SlideStore.open(str(url))
        probs = np.full((N, 2), 0.5, np.float32)
        first = st.write_scores("tiny", "tumour", probs, probs, np.eye(2, D, dtype=np.float32), {"classes": ["a", "b"]})
        second = st.write_scores("tiny", "tumour", probs, probs * 0 + 0.25, np.eye(2, D, dtype=np.float32),
                                 {"classes": ["a", "b"]})
        b = _arrays(1)
        _embed(st, b, provenance={**PROV, "weights_sha256": "b" * 64})  # other weights: replaced beside
    st = SlideStore.open(str(url))
    p, _, attrs = st.scores("tiny", "tumour")
    assert attrs["write_id"] == second != first and np.all(p == 0.25)
    assert st.score_sets() == [("tiny", "tumour")] and st.models() == ["tiny"]
    assert np.array_equal(st.embeddings("tiny"), b["feats"])
    keys = _objects(s3, bucket, "out/s.zarr/")
    pointed = json.loads(s3.client().get_object(Bucket=bucket, Key="out/s.zarr/scores/tiny/zarr.json")["Body"].read())
    live = pointed["attributes"]["current"]["tumour"]
    assert live.startswith("~new~") and all(("/scores/tiny/" not in k) or f"/{live}/" in k or k.endswith("tiny/zarr.json")
                                            for k in keys)
    assert sum("/embeddings/" in k and "/features/c/" in k for k in keys) == -(-N // 64)  # one version's chunks

    # a store copied from object storage to a local disk reads the same, and a local
    # replacement there swaps by rename and drops the pointer
    import fsspec

    from slide_clip.storage.filesystems import filesystem

    fs, path = filesystem(str(url))
    fs.get(path, str(tmp_path / "copy.zarr"), recursive=True)
    copy = SlideStore.open(tmp_path / "copy.zarr")
    assert np.array_equal(copy.scores("tiny", "tumour")[0], p)
    copy.write_scores("tiny", "tumour", probs, probs * 0 + 0.75, np.eye(2, D, dtype=np.float32), {"classes": ["a", "b"]})
    assert np.all(copy.scores("tiny", "tumour")[0] == 0.75) and copy.score_sets() == [("tiny", "tumour")]
    assert sorted(x.name for x in (tmp_path / "copy.zarr" / "scores" / "tiny").iterdir()) == ["tumour", "zarr.json"]
    del fsspec


def test_remote_writes_need_the_claim_and_two_runs_never_write_one_store(s3):
    a = _arrays()
    url = f"s3://{s3.new_bucket()}/out/s.zarr"
    with pytest.raises(StoreError, match="does not hold its claim"):
        SlideStore.create(url, {"name": "s"}, {})
    with claim(url, ttl=30) as mine:
        _write(url, a, stop_after=128)
        with pytest.raises(StoreBusyError) as e:  # a second run: refused, naming the holder
            with claim(url):
                pass
        assert f"pid {os.getpid()}" in str(e.value) and "\n" not in str(e.value)
        mine._stop.set()  # this run stalls (no renewal) ...
        mine.renewed_at -= 30
        with pytest.raises(StoreBusyError, match="no longer this run's"):  # ... and stops writing
            _embed(SlideStore.open(url), a)
        check = mine.check
    with pytest.raises(StoreBusyError):
        check()


def test_killed_runs_claim_expires_and_is_taken_again(s3, tmp_path):
    """A run killed while holding a claim: its store is taken by the next run once the claim expires."""
    url = f"s3://{s3.new_bucket()}/out/s.zarr"
    code = ("import sys, time; from slide_clip.storage.claims import claim\n"
            f"with claim({url!r}, ttl=3):\n    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=os.environ.copy(), text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(StoreBusyError):
            with claim(url):
                pass
        proc.kill()
        proc.wait()
        t = time.monotonic()
        with claim(url, wait=20) as c:
            assert c.took_over is not None and c.took_over["pid"] == proc.pid
            assert time.monotonic() - t < 15
            check_claimed(url)
    finally:
        proc.kill()


def test_network_cut_mid_write_is_one_line_and_the_store_resumes(s3, tmp_path):
    """The connection is cut while rows are written: one line naming the store, the group stays
    partial at the last rows written; with the network back the same call resumes and the store
    ends equal to one written without a fault."""
    a = _arrays()
    url = f"s3://{s3.new_bucket()}/out/s.zarr"
    local = _write(tmp_path / "s.zarr", a)
    with claim(url):
        _write(url, a, stop_after=128)
        st = SlideStore.open(url)
        w = st.begin_embeddings(PROV, chunk_rows=64)
        assert w.rows_written == 128
        s3.proxy.cut = -1
        with pytest.raises(StorageError) as e:
            for start in range(128, N, 32):
                w.append(a["feats"][start:start + 32])
        assert url in str(e.value) and "connection" in str(e.value) and "\n" not in str(e.value)
        s3.proxy.cut = 0
        attrs = SlideStore.open(url).embedding_attrs("tiny")
        assert attrs["status"] == "partial" and attrs["rows_written"] == 128
        _embed(SlideStore.open(url), a)
    _same(SlideStore.open(url), local)


def test_server_killed_mid_write_restarted_and_resumed(tmp_path, monkeypatch):
    """The S3 server itself is killed (kill -9) while a store is written; restarted with its
    objects (moto's recording replayed), the write resumes and the store equals a local one."""
    pytest.importorskip("moto.server")
    from s3_server import S3

    from slide_clip.config import StorageConfig
    from slide_clip.storage import options

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    server = S3(tmp_path, auth=False, record=True)
    before = options._current
    try:
        options.configure(StorageConfig(endpoint_url=server.endpoint, options={"config_kwargs": {
            "retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 5, "read_timeout": 30}}))
        a = _arrays()
        local = _write(tmp_path / "s.zarr", a)
        url = f"s3://{server.new_bucket()}/out/s.zarr"
        with claim(url, ttl=60):
            _write(url, a, stop_after=128)
            w = SlideStore.open(url).begin_embeddings(PROV, chunk_rows=64)
            server.moto.kill()
            with pytest.raises(StorageError) as e:
                for start in range(128, N, 32):
                    w.append(a["feats"][start:start + 32])
            assert url in str(e.value) and "\n" not in str(e.value)
            server.moto.start(replay=True)
            st = SlideStore.open(url)
            assert st.embedding_attrs("tiny")["rows_written"] == 128 and not st.is_complete("tiny")
            _embed(st, a)
        _same(SlideStore.open(url), local)
    finally:
        options._current = before
        os.environ.pop(options.ENV, None)
        server.close()


def test_store_missing_bucket_and_bad_credentials_one_line(s3):
    for url, words in ((f"s3://no-such-bucket-zz/out/s.zarr", "bucket does not exist"),
                       (f"s3://{s3.new_bucket()}/out/none.zarr", "not a slide-clip store")):
        with pytest.raises((StorageError, StoreError)) as e:
            SlideStore.open(url)
        assert url in str(e.value) and words in str(e.value) and "\n" not in str(e.value)
    from slide_clip.config import StorageConfig
    from slide_clip.storage import options

    st = options.current()
    options.configure(StorageConfig(endpoint_url=st.endpoint_url, options={**st.options, "key": "nobody",
                                                                           "secret": "nothing"}))
    url = f"s3://{s3.moto.key and 'any'}-bucket/out/s.zarr"
    with pytest.raises(StorageError) as e:
        SlideStore.open(url)
    assert url in str(e.value) and "credentials" in str(e.value)


def test_objects_beside_stores_written_whole(s3, tmp_path):
    from slide_clip.output import ensure_out_dir
    from slide_clip.storage import objects

    bucket = s3.new_bucket()
    out = ensure_out_dir(f"s3://{bucket}/out")
    assert str(out) == f"s3://{bucket}/out"
    table = f"s3://{bucket}/out/cohort-tumour-tiny.csv"
    objects.write_text(table, "a,b\n1,2\n")
    with pytest.raises(RuntimeError):
        with objects.replace_file(table) as tmp:
            tmp.write_text("half")
            raise RuntimeError("a writer failed")
    assert objects.read_text(table) == "a,b\n1,2\n"  # the old object, never the half-written one
    with objects.replace_file(table) as tmp:
        import pandas as pd

        pd.DataFrame({"a": [3]}).to_csv(tmp, index=False)
    assert objects.read_text(table) == "a\n3\n"
    assert not [k for k in _objects(s3, bucket) if "write-test" in k]
    with pytest.raises(StorageError, match="bucket does not exist"):
        ensure_out_dir("s3://no-such-bucket-zz/out")


def test_storage_options_parsing():
    from slide_clip.storage.options import fsspec_options, merged, parse_storage_options

    assert parse_storage_options('{"endpoint": "http://h:9000", "anon": true, "requester_pays": true}') == {
        "endpoint_url": "http://h:9000", "anonymous": True, "options": {"requester_pays": True}}
    assert parse_storage_options("endpoint_url=http://h:9000,profile=lab,region=eu-west-1,max_concurrency=4") == {
        "endpoint_url": "http://h:9000", "profile": "lab", "region": "eu-west-1", "options": {"max_concurrency": 4}}
    for bad in ("endpoint_url", "{not json", "[1, 2]"):
        with pytest.raises(ConfigError) as e:
            parse_storage_options(bad)
        assert "--storage-options" in str(e.value) and "\n" not in str(e.value)
    from slide_clip.config import StorageConfig

    st = merged(StorageConfig(), "endpoint=http://h:9000,anonymous=true,region=eu-west-1")
    assert fsspec_options("s3", st) == {"endpoint_url": "http://h:9000", "anon": True,
                                        "client_kwargs": {"region_name": "eu-west-1"},
                                        "use_listings_cache": False}  # every listing asks the service
    assert fsspec_options("gs", st)["token"] == "anon"
    assert fsspec_options("az", st)["use_listings_cache"] is False
    assert "use_listings_cache" not in fsspec_options("https", st)
    # a user's own options win
    assert fsspec_options("s3", merged(StorageConfig(), "use_listings_cache=true"))["use_listings_cache"] is True


def test_missing_extra_is_one_line():
    import importlib.util

    from slide_clip.storage.filesystems import filesystem

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here: nothing is missing")
    with pytest.raises(StorageError) as e:
        filesystem("gs://bucket/slide.svs")
    assert "gs://bucket/slide.svs" in str(e.value) and "slide-clip[gcs]" in str(e.value)
