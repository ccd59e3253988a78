"""Slides and stores on object storage against a local S3 server (moto, as the tests start it).

Sections:

* ``read``: tiles/s of a loader's reads (``open_for_reading`` + ``read_tiles``, 224 px tiles at
  0.5 µm/px, one thread) from local disk and from an ``s3://`` URL of the same slides; bytes
  received at open and per tile (counted at the server's proxy), and the slide's size.
* ``stores``: a features array of 20,000 x 512 float32 rows (2048-row chunks, Blosc zstd, as a
  store's embeddings) written and read back: local disk; S3 through zarr's ``FsspecStore``
  (s3fs) and ``ObjectStore`` (obstore); each without and with the sharding codec (8 chunks a
  shard); objects per store and seconds.
* ``cache``: three slides only OpenSlide reads (DICOM series folders) opened twice: the first
  pass with ``prefetch`` of the next slide while the current one is read, the second from the
  cache; hit rate and seconds per open.

``python benchmarks/bench_s3.py`` prints a Markdown table per section.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from s3_server import S3  # noqa: E402


def _configure(s3, cache_dir):
    from slide_clip.config import StorageConfig
    from slide_clip.storage import options

    options.configure(StorageConfig(endpoint_url=s3.endpoint, cache_dir=str(cache_dir)))


def bench_read(s3, slides, work):
    from slide_clip.reading import open_for_reading, read_tiles
    from slide_clip.slide import open_slide
    from slide_clip.tiling import make_grid

    rows = []
    bucket = s3.new_bucket()
    for path in slides:
        url = s3.upload(bucket, f"slides/{path.name}", path)
        _, info = open_slide(path)
        mask = np.ones((64, 64), bool)
        grid = make_grid((info.width, info.height), (info.mpp_x, info.mpp_y), info.level_downsamples, mask,
                         (info.width / 64, info.height / 64), target_mpp=0.5, tile_size=224)
        out = {}
        for where, target in (("local", str(path)), ("s3", url)):
            s3.proxy.reset()
            t0 = time.perf_counter()
            h = open_for_reading(target)
            t_open = time.perf_counter() - t0
            opened = s3.proxy.bytes_served()
            t0 = time.perf_counter()
            for i in range(0, len(grid.coords), 64):
                read_tiles(h, grid.coords[i:i + 64], grid)
            dt = time.perf_counter() - t0
            out[where] = (len(grid.coords) / dt, t_open, opened, s3.proxy.bytes_served() - opened,
                          len(s3.proxy.requests("GET")))
            h.close()
        rows.append((path.name, path.stat().st_size, len(grid.coords), out))
    print("\n### read\n")
    print("| slide | file bytes | tiles | local tiles/s | s3 tiles/s | s3 open s (bytes) | s3 bytes per tile | GETs |")
    print("|---|---|---|---|---|---|---|---|")
    for name, size, n, out in rows:
        s = out["s3"]
        print(f"| {name} | {size:,} | {n} | {out['local'][0]:.0f} | {s[0]:.0f} | {s[1]:.2f} ({s[2]:,}) | "
              f"{s[3] / n:,.0f} | {s[4]} |")


def _count(s3, bucket, prefix):
    return sum(len(p.get("Contents", [])) for p in
               s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix))


def bench_stores(s3, work, n=20000, d=512):
    import zarr
    from zarr.codecs import BloscCodec
    from zarr.storage import FsspecStore, ObjectStore

    data = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    bucket = s3.new_bucket()
    creds = s3.credentials()
    rows = []
    for backend in ("local", "fsspec", "obstore"):
        for sharded in (False, True):
            name = f"{backend}-{'sharded' if sharded else 'plain'}.zarr"
            if backend == "local":
                target = str(work / name)
            elif backend == "fsspec":
                target = FsspecStore.from_url(f"s3://{bucket}/{name}", storage_options={"endpoint_url": s3.endpoint})
            else:
                from obstore.store import S3Store

                target = ObjectStore(S3Store(bucket, prefix=name, endpoint=s3.endpoint, region="us-east-1",
                                             access_key_id=creds["AWS_ACCESS_KEY_ID"],
                                             secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
                                             client_options={"allow_http": True}))
            kw = {"shards": (2048 * 8, d)} if sharded else {}
            t0 = time.perf_counter()
            g = zarr.open_group(target, mode="w", zarr_format=3)
            arr = g.create_array("features", shape=(n, d), chunks=(2048, d), dtype="float32", fill_value=np.nan,
                                 compressors=(BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),),
                                 config={"write_empty_chunks": True}, **kw)
            for start in range(0, n, 2048):  # one chunk at a time, as EmbeddingWriter flushes
                arr[start:start + 2048] = data[start:start + 2048]
                g.attrs.update({"rows_written": min(n, start + 2048)})
            w = time.perf_counter() - t0
            t0 = time.perf_counter()
            back = zarr.open_group(target, mode="r")["features"][:]
            r = time.perf_counter() - t0
            assert np.array_equal(back, data)
            count = (sum(len(f) for _, _, f in os.walk(work / name)) if backend == "local"
                     else _count(s3, bucket, name + "/"))
            rows.append((backend, sharded, count, w, r))
    print(f"\n### stores ({n} x {d} float32, 2048-row chunks, written a chunk at a time)\n")
    print("| backend | sharding | objects | write s | read s |")
    print("|---|---|---|---|---|")
    for b, sh, c, w, r in rows:
        print(f"| {b} | {'8 chunks/shard' if sh else 'none'} | {c} | {w:.2f} | {r:.2f} |")


def bench_cache(s3, dicom, work):
    from slide_clip.slide import open_slide
    from slide_clip.storage.cache import default_cache, prefetch

    bucket = s3.new_bucket()
    urls = []
    for k in range(3):
        for f in sorted(dicom.iterdir()):
            if f.is_file():
                s3.upload(bucket, f"dicom/copy{k}/{f.name}", f)
        urls.append(f"s3://{bucket}/dicom/copy{k}/")
    cache = default_cache()
    rows = []
    for rnd in (1, 2):
        h0, m0 = cache.hits, cache.misses
        t0 = time.perf_counter()
        for i, url in enumerate(urls):
            ahead = prefetch(urls[i + 1:i + 2])
            h, _ = open_slide(url)
            h.read_region((0, 0), 0, (512, 512))
            h.close()
            for f in ahead:
                f.result()
        rows.append((rnd, cache.hits - h0, cache.misses - m0, (time.perf_counter() - t0) / len(urls)))
    print("\n### cache (3 DICOM series folders, 2 passes; pass 1 prefetches the next slide)\n")
    print("| pass | hits | misses | hit rate | s per slide |")
    print("|---|---|---|---|---|")
    for rnd, h, m, s in rows:
        print(f"| {rnd} | {h} | {m} | {h / (h + m):.2f} | {s:.2f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="read,stores,cache")
    args = ap.parse_args(argv)
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    s3 = S3(work)
    os.environ.update(s3.credentials())
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    _configure(s3, work / "cache")
    try:
        sections = args.sections.split(",")
        if "read" in sections:
            from conftest import tissue_scene

            from slide_clip.synthetic import write_slide

            slides = [write_slide(work / "scan.tif", tissue_scene(6000, 4000, 0.5), 0.5, levels=4, compression="jpeg")]
            cmu = Path.home() / ".cache" / "slide-clip" / "tests" / "CMU-1-Small-Region.svs"
            if cmu.is_file():
                slides.append(cmu)
            bench_read(s3, slides, work)
        if "stores" in sections:
            bench_stores(s3, work)
        if "cache" in sections:
            dicom = ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region-dicom"
            dicom = dicom if dicom.is_dir() else Path("/work/shared/data/slides/CMU-1-Small-Region-dicom")
            bench_cache(s3, dicom, work)
    finally:
        s3.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
