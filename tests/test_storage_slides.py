"""Slides at URLs against a real S3 server (moto, tests/s3_server.py): the same SlideInfo and
pixels as the local file, tiled TIFF/SVS read by byte range (bytes per tile counted at the
server's proxy), other formats staged in a bounded, verified cache."""

from __future__ import annotations

import numpy as np
import pytest

from slide_clip.errors import StorageError
from slide_clip.reading import open_for_reading, read_tiles
from slide_clip.slide import open_slide
from slide_clip.storage.cache import SlideCache
from slide_clip.synthetic import write_slide
from slide_clip.tiling import make_grid


def _same_info(remote, local):
    a, b = remote.to_dict(), local.to_dict()
    assert a.pop("path").startswith("s3://")
    b.pop("path")
    assert a == b


def _same_level0(remote, local):
    w, h = local.dimensions
    assert np.array_equal(np.asarray(remote.read_region((0, 0), 0, (w, h))),
                          np.asarray(local.read_region((0, 0), 0, (w, h))))


def _grid(info, tile_size=224, target_mpp=0.5, level_target=None):
    mask = np.ones((64, 64), bool)
    return make_grid((info.width, info.height), (info.mpp_x, info.mpp_y), info.level_downsamples, mask,
                     (info.width / 64, info.height / 64), target_mpp=target_mpp, tile_size=tile_size)


@pytest.fixture(scope="module")
def jpeg_tiff(tmp_path_factory):
    """A 3-level JPEG pyramidal TIFF (as scanners write), 6000 x 4000 px at level 0."""
    from conftest import tissue_scene

    return write_slide(tmp_path_factory.mktemp("remote") / "scan.tif", tissue_scene(3000, 2000, 0.5), 0.5,
                       levels=3, compression="jpeg")


def test_remote_svs_same_info_pixels_and_tiles(s3, cmu_svs):
    """The CMU SVS at an s3:// URL: OpenSlide's SlideInfo (quickhash fingerprint included), its
    pixels, and a loader's tiles are those of the local file."""
    url = s3.upload(s3.new_bucket(), "slides/CMU-1-Small-Region.svs", cmu_svs)
    remote, info = open_slide(url)
    local, linfo = open_slide(cmu_svs)
    try:
        _same_info(info, linfo)
        assert info.path == url and info.name == "CMU-1-Small-Region"
        assert info.fingerprint.startswith("quickhash1:")
        _same_level0(remote, local)
    finally:
        remote.close()
        local.close()
    r, lr = open_for_reading(url), open_for_reading(str(cmu_svs))
    try:  # the per-level self-check ran against OpenSlide (on the mirror) and kept the same levels
        assert sorted(r._levels) == sorted(lr._levels) == [0]
        grid = _grid(linfo)
        assert np.array_equal(read_tiles(r, grid.coords, grid), read_tiles(lr, grid.coords, grid))
    finally:
        r.close()
        lr.close()


def test_remote_jpeg_tiff_by_range_bytes_per_tile(s3, jpeg_tiff):
    """A multi-level JPEG TIFF: opened from a fraction of its bytes; each tile read costs exactly
    its file tiles' bytes (counted at the server); tiles and every level equal the local file's."""
    import tifffile

    url = s3.upload(s3.new_bucket(), "slides/scan.tif", jpeg_tiff)
    size = jpeg_tiff.stat().st_size
    s3.proxy.reset()
    remote, info = open_slide(url)
    local, linfo = open_slide(jpeg_tiff)
    try:
        opened = s3.proxy.bytes_served()
        assert opened < size / 4, (opened, size)
        _same_info(info, linfo)
        for level, (w, h) in enumerate(local.level_dimensions):  # OpenSlide on the mirror: exact at every level
            box = (min(w, 700), min(h, 500))
            loc = (int(local.level_downsamples[level]) * 100, int(local.level_downsamples[level]) * 60)
            assert np.array_equal(np.asarray(remote.read_region(loc, level, box)),
                                  np.asarray(local.read_region(loc, level, box)))
    finally:
        remote.close()
        local.close()

    r, lr = open_for_reading(url), open_for_reading(str(jpeg_tiff))
    try:
        assert sorted(r._levels) == sorted(lr._levels) == [0, 1, 2]
        with tifffile.TiffFile(jpeg_tiff) as tif:
            page = tif.pages[0]
            tw, th, cols = page.tilewidth, page.tilelength, -(-page.imagewidth // page.tilewidth)
            counts = [int(n) for n in page.databytecounts]
        s3.proxy.reset()
        for k in (cols + 1, 2 * cols + 3, 3 * cols + 2):  # one file tile each, none cached yet
            r_, c_ = divmod(k, cols)
            a = np.asarray(r.read_region((c_ * tw, r_ * th), 0, (tw, th)))
            assert np.array_equal(a, np.asarray(lr.read_region((c_ * tw, r_ * th), 0, (tw, th))))
        gets = s3.proxy.requests("GET")
        assert len(gets) == 3 and all(g[2] and g[2].startswith("bytes=") for g in gets)
        assert [g[3] for g in gets] == [counts[cols + 1], counts[2 * cols + 3], counts[3 * cols + 2]]
        grid = _grid(linfo)
        assert np.array_equal(read_tiles(r, grid.coords, grid), read_tiles(lr, grid.coords, grid))
        assert r.remote.bytes_read < size  # never the whole file
    finally:
        r.close()
        lr.close()


def test_dicom_folder_staged_same_slide_and_cache_hit(s3, cmu_dicom):
    """A DICOM series folder at a URL is staged whole into the cache, opened there: the same
    SlideInfo and pixels; prefetch stages it ahead, and the open is then a cache hit."""
    from slide_clip.storage.cache import default_cache, prefetch

    bucket = s3.new_bucket()
    files = sorted(p for p in cmu_dicom.iterdir() if p.is_file())
    for f in files:
        s3.upload(bucket, f"dicom/{cmu_dicom.name}/{f.name}", f)
    url = f"s3://{bucket}/dicom/{cmu_dicom.name}/"
    cache = default_cache()
    [done] = prefetch([url])
    staged = done.result(timeout=120)
    assert staged is not None and staged.is_dir() and cache.misses == 1
    remote, info = open_slide(url)
    local, linfo = open_slide(cmu_dicom)
    try:
        _same_info(info, linfo)
        assert info.name == cmu_dicom.name and cache.hits == 1
        _same_level0(remote, local)
    finally:
        remote.close()
        local.close()


def test_cache_limit_lru_and_etag(s3, tmp_path):
    """The cache keeps at most its size, evicts the least recently used copy, and fetches a copy
    again when the remote object changed (same size, other ETag): never a stale slide."""
    bucket = s3.new_bucket()
    urls = []
    for name in "abc":
        (tmp_path / name).write_bytes(name.encode() * 1000)
        urls.append(s3.upload(bucket, f"slides/{name}.mrxs", tmp_path / name))
    cache = SlideCache(tmp_path / "cache", max_bytes=2500)
    import slide_clip.storage.cache as cache_module

    old_age, cache_module.MIN_AGE_S = cache_module.MIN_AGE_S, 0.0
    try:
        pa = cache.stage(urls[0])
        cache.release(urls[0])
        cache.stage(urls[1])
        cache.release(urls[1])
        assert pa.read_bytes() == b"a" * 1000 and cache.stage(urls[0]).is_file() and cache.hits == 1
        cache.release(urls[0])
        cache.stage(urls[2])  # 3000 bytes > 2500: b, least recently used, goes
        names = sorted(e.name for _, _, e in cache.entries())
        assert len(names) == 2 and cache.evicted == 1
        assert not (cache.folder / cache._key(urls[1])).exists()
        assert (cache.folder / cache._key(urls[0])).exists()
        (tmp_path / "a").write_bytes(b"A" * 1000)  # same size, other content: other ETag
        s3.upload(bucket, "slides/a.mrxs", tmp_path / "a")
        misses = cache.misses
        assert cache.stage(urls[0]).read_bytes() == b"A" * 1000 and cache.misses == misses + 1
        assert cache.hit_rate == pytest.approx(cache.hits / (cache.hits + cache.misses))
    finally:
        cache_module.MIN_AGE_S = old_age


def test_missing_object_bucket_and_bad_credentials_one_line(s3, cmu_svs, monkeypatch):
    bucket = s3.new_bucket()
    for url, words in ((f"s3://{bucket}/slides/nope.svs", "no such object"),
                       (f"s3://no-such-bucket-zz/slides/a.svs", "bucket does not exist")):
        with pytest.raises(StorageError) as e:
            open_slide(url)
        assert url in str(e.value) and words in str(e.value) and "\n" not in str(e.value)
    url = s3.upload(bucket, "slides/CMU-1-Small-Region.svs", cmu_svs)
    from slide_clip.config import StorageConfig
    from slide_clip.storage import options

    st = options.current()
    options.configure(StorageConfig(endpoint_url=st.endpoint_url,
                                    options={**st.options, "key": s3.moto.key, "secret": "wrong"}))
    with pytest.raises(StorageError) as e:
        open_slide(url)
    assert url in str(e.value) and "credentials" in str(e.value) and "\n" not in str(e.value)


def test_throttled_reads_retried_then_one_line(s3, jpeg_tiff):
    url = s3.upload(s3.new_bucket(), "slides/scan.tif", jpeg_tiff)
    r = open_for_reading(url)
    try:
        s3.proxy.throttle = 2  # two 503 SlowDown answers: retried with backoff, then read
        a = np.asarray(r.read_region((512, 512), 0, (256, 256)))
        assert a.shape == (256, 256, 3) and s3.proxy.throttle == 0
        s3.proxy.throttle = -1  # the service keeps refusing: one line naming the URL
        with pytest.raises(StorageError) as e:
            r.read_region((2048, 1024), 0, (256, 256))
        assert url in str(e.value) and "throttled" in str(e.value) and "\n" not in str(e.value)
        s3.proxy.throttle = 0
        s3.proxy.cut_body = -1  # every answer cut mid-body: the network is gone
        with pytest.raises(StorageError) as e:
            r.read_region((3072, 1024), 0, (256, 256))
        assert url in str(e.value) and "connection" in str(e.value)
        s3.proxy.cut_body = 1  # one answer cut: retried, and the pixels are right
        lr = open_for_reading(str(jpeg_tiff))
        try:
            assert np.array_equal(np.asarray(r.read_region((3072, 1536), 0, (256, 256))),
                                  np.asarray(lr.read_region((3072, 1536), 0, (256, 256))))
        finally:
            lr.close()
    finally:
        s3.proxy.reset()
        r.close()
