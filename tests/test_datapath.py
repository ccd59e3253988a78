"""The data path: tiles read in strips, uint8 across processes, normalisation on the device,
a reader pool that outlives one slide (real OpenSlide, real slides, real open_clip)."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import torch

from slide_clip.loader import ReaderError, ReaderPool, tile_batches
from slide_clip.reading import groupable, read_tiles, strip_runs
from slide_clip.tiling import make_grid, read_tile


def _grid(osr, mpp, *, target_mpp=0.5, tile_size=224, overlap=0.0, block=None):
    """A grid over the whole slide (every tile kept), optionally keeping a block of tiles."""
    w, h = osr.dimensions
    mask = np.ones((max(1, h // 64), max(1, w // 64)), bool)
    g = make_grid((w, h), (mpp, mpp), osr.level_downsamples, mask, (w / mask.shape[1], h / mask.shape[0]),
                  target_mpp=target_mpp, tile_size=tile_size, overlap=overlap, min_tissue=0.0)
    return g


class CountingSlide:
    """A real OpenSlide handle that counts read_region calls (the reads still go to OpenSlide)."""

    def __init__(self, osr):
        self.osr, self.calls = osr, 0

    def read_region(self, *a):
        self.calls += 1
        return self.osr.read_region(*a)


def _per_tile(osr, grid, idx):
    return np.stack([np.asarray(read_tile(osr, int(x), int(y), grid)) for x, y in grid.coords[idx]])


@pytest.mark.parametrize("case", ["level0", "reduced_level_resampled", "overlap", "cmu_svs"])
def test_strip_reads_are_bit_identical_to_read_tile(case, make_slide, cmu_svs):
    if case == "cmu_svs":  # real H&E, JPEG tiles, 0.499 µm/px: resampled at level 0
        path, mpp, kw = cmu_svs, 0.499, {}
    elif case == "reduced_level_resampled":  # 0.25 µm/px slide, 0.6 µm/px tiles: level 1, 268.8 -> 224 px
        path, _ = make_slide("dp_fine", mpp=0.25, width_um=700, height_um=500)
        mpp, kw = 0.25, {"target_mpp": 0.6}
    else:
        path, _ = make_slide("dp_plain", mpp=0.5, width_um=1500, height_um=600)
        mpp, kw = 0.5, {"overlap": 0.5} if case == "overlap" else {}
    osr = openslide.OpenSlide(str(path))
    grid = _grid(osr, mpp, **kw)
    if case == "reduced_level_resampled":
        assert grid.read_level == 1 and grid.read_downsample == 2.0
    assert groupable(grid) and len(grid) > 12
    idx = np.arange(len(grid))[: 3 * grid.shape[1] + 5]  # whole grid rows and a part row
    counting = CountingSlide(osr)
    got = read_tiles(counting, grid.coords[idx], grid)
    want = _per_tile(osr, grid, idx)
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(got, want)
    assert counting.calls == len(strip_runs(grid.coords[idx], grid)) <= 4 + len(idx) // 8  # strips, not tiles
    # a strip cap splits long rows and changes nothing in the pixels
    assert np.array_equal(read_tiles(osr, grid.coords[idx], grid, max_width=600), want)
    osr.close()


def test_non_integer_downsample_reads_tile_by_tile(make_slide):
    path, _ = make_slide("dp_plain", mpp=0.5, width_um=1500, height_um=600)
    osr = openslide.OpenSlide(str(path))
    from dataclasses import replace

    grid = replace(_grid(osr, 0.5, target_mpp=1.0), read_level=1, read_downsample=2.0004)
    assert not groupable(grid)
    counting = CountingSlide(osr)
    got = read_tiles(counting, grid.coords[:6], grid)
    assert counting.calls == 6
    assert np.array_equal(got, _per_tile(osr, grid, np.arange(6)))
    osr.close()


def test_uint8_tiles_normalised_on_the_device_equal_the_pil_preprocess(cmu_svs, tiny_encoder):
    enc = tiny_encoder
    norm = enc.pixel_norm(224)
    assert norm is not None
    # mean/std come from the encoder's own preprocess config (open_clip's CLIP constants here)
    assert norm.mean == tuple(enc.preprocess_cfg["mean"]) and norm.std == tuple(enc.preprocess_cfg["std"])
    osr = openslide.OpenSlide(str(cmu_svs))
    grid = _grid(osr, 0.499)
    coords = grid.coords[:20]
    tiles = read_tiles(osr, coords, grid)
    old = torch.stack([enc.preprocess(read_tile(osr, int(x), int(y), grid)) for x, y in coords])
    osr.close()
    from slide_clip.encoders.pixels import to_model_input

    new = to_model_input(torch.from_numpy(tiles), norm, torch.device("cpu"))
    # same float32 operations in the same order as ToTensor + Normalize: exactly equal input
    assert new.shape == old.shape and torch.equal(new, old)
    a, b = enc.encode_images(old), enc.encode_uint8(torch.from_numpy(tiles), norm)
    # equal inputs in the same layout: the model gives the same numbers; the tolerance only
    # allows for a different kernel choice by the CPU backend (float32 rounding, ~1e-7)
    assert np.allclose(a, b, rtol=0, atol=1e-6)


def test_resampled_or_unusual_preprocess_keeps_the_pil_path(tiny_encoder):
    from torchvision import transforms as T

    enc = tiny_encoder
    assert enc.pixel_norm(160) is None  # tile 160 px must be resized to 224 by the preprocess
    odd = T.Compose([T.Resize(224), T.CenterCrop(224), T.ColorJitter(0.1), T.ToTensor(),
                     T.Normalize(enc.preprocess_cfg["mean"], enc.preprocess_cfg["std"])])
    from slide_clip.encoders.pixels import device_normalisation

    assert device_normalisation(odd, enc.preprocess_cfg, 224) is None
    wrong_mean = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    assert device_normalisation(wrong_mean, enc.preprocess_cfg, 224) is None


def _old_path_embeddings(store, slide, encoder):
    from slide_clip.pipeline import grid_from_store

    grid = grid_from_store(store)
    osr = openslide.OpenSlide(str(slide))
    rows = []
    for i in range(0, len(grid), 16):
        batch = torch.stack([encoder.preprocess(read_tile(osr, int(x), int(y), grid))
                             for x, y in grid.coords[i:i + 16]])
        rows.append(encoder.encode_images(batch))
    osr.close()
    return np.concatenate(rows)


@pytest.mark.parametrize("tile_size,workers", [(None, 1), (None, 0), (160, 1)])
def test_pipeline_embeddings_equal_the_per_tile_pil_path(tile_size, workers, make_slide, cfg, tmp_path,
                                                         tiny_encoder):
    from slide_clip.pipeline import embed_slide
    from slide_clip.store import SlideStore

    path, _ = make_slide("dp_pipe", mpp=0.5, width_um=900, height_um=500)
    c = cfg.with_overrides(encode={"num_workers": workers}, tiling={"tile_size": tile_size})
    r = embed_slide(path, tmp_path, c, progress=False, encoder=tiny_encoder)
    assert r.status == "ok" and r.n_tiles > 16
    store = SlideStore.open(r.store)
    assert store.embedding_attrs("tiny")["resampled"] is (tile_size is not None)
    got = store.embeddings("tiny")
    want = _old_path_embeddings(store, path, tiny_encoder)
    assert got.shape == want.shape
    assert np.allclose(got, want, rtol=0, atol=1e-6)  # see the tolerance note above


def test_pool_serves_several_slides_in_order_and_a_bad_slide_fails_alone(make_slide, tmp_path):
    a, _ = make_slide("dp_plain", mpp=0.5, width_um=1500, height_um=600)
    b, _ = make_slide("dp_fine", mpp=0.25, width_um=700, height_um=500)
    bad = tmp_path / "bad.tif"
    data = a.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # a truncated copy: OpenSlide cannot open it
    grids = {}
    for p, mpp, target in ((a, 0.5, 0.5), (b, 0.25, 0.6)):
        osr = openslide.OpenSlide(str(p))
        grids[p] = _grid(osr, mpp, target_mpp=target)
        osr.close()
    grids[bad] = grids[a]
    with ReaderPool(2, prefetch=2) as pool:
        # all three queued before any is read: the pool moves from one to the next by itself
        sa = tile_batches(str(a), grids[a], start=3, batch_size=7, pool=pool)
        sbad = tile_batches(str(bad), grids[bad], start=0, batch_size=7, pool=pool)
        sb = tile_batches(str(b), grids[b], start=0, batch_size=7, pool=pool)
        workers = [p.pid for p in pool._workers]
        for stream, p, start in ((sa, a, 3), (sbad, bad, 0), (sb, b, 0)):
            expect = start
            if p == bad:
                with pytest.raises(ReaderError, match="OpenSlide|TIFF|JPEG|openslide"):
                    for idx, tiles in stream:
                        expect += len(idx)
                assert expect < len(grids[p])
                continue
            osr = openslide.OpenSlide(str(p))
            for idx, tiles in stream:
                assert int(idx[0]) == expect and tiles.dtype == torch.uint8
                want = _per_tile(osr, grids[p], np.asarray(idx))
                assert np.array_equal(tiles.numpy(), want)
                expect += len(idx)
            assert expect == len(grids[p])
            osr.close()
        assert [p.pid for p in pool._workers] == workers  # the same processes served every slide


def test_embed_slides_shares_readers_prepares_ahead_and_isolates_a_bad_slide(make_slide, cfg, tmp_path,
                                                                             tiny_encoder):
    import multiprocessing as mp

    from slide_clip.pipeline import embed_slides
    from slide_clip.store import SlideStore, store_lock

    a, _ = make_slide("dp_pipe", mpp=0.5, width_um=900, height_um=500)
    b, _ = make_slide("dp_fine", mpp=0.25, width_um=700, height_um=500)
    bad = tmp_path / "slides" / "broken.tif"
    bad.parent.mkdir()
    bad.write_bytes(a.read_bytes()[:5000])
    readers_seen = []

    def on_result(r):
        readers_seen.append(sorted(p.pid for p in mp.active_children() if p.name == "slide-clip-reader"))

    out = tmp_path / "out"
    c = cfg.with_overrides(encode={"num_workers": 2})
    results = embed_slides([a, bad, b], out, c, progress=False, on_result=on_result)
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert "broken.tif" in results[1].error and "\n" not in results[1].error
    # one pool of reader processes for the whole run, not one per slide
    assert readers_seen[0] and readers_seen[0] == readers_seen[2]
    for r, p in ((results[0], a), (results[2], b)):
        store = SlideStore.open(r.store)
        assert store.is_complete("tiny")
        with store_lock(r.store):  # released after the run (another writer would get it at once)
            pass
        assert np.allclose(store.embeddings("tiny"), _old_path_embeddings(store, p, tiny_encoder), rtol=0, atol=1e-6)
    again = embed_slides([a, b], out, c, progress=False)
    assert [r.status for r in again] == ["skipped", "skipped"]


def test_without_a_pool_batches_are_read_one_ahead_in_a_thread(make_slide, monkeypatch):
    """No reader processes (``--workers 0``, ``auto`` on a CPU): batch k+1 is read in a
    background thread while the caller has batch k; order and pixels as read tile by tile,
    a read error reaches the caller, and leaving early leaves no reading thread behind."""
    import threading
    import time

    import slide_clip.loader as loader

    a, _ = make_slide("dp_plain", mpp=0.5, width_um=1500, height_um=600)
    osr = openslide.OpenSlide(str(a))
    grid = _grid(osr, 0.5, target_mpp=0.5)
    assert len(grid) > 20
    readers, original = [], loader.read_batch

    def spy(job, handles):
        readers.append((job.first, threading.current_thread().name))
        return original(job, handles)

    monkeypatch.setattr(loader, "read_batch", spy)
    expect = 2
    for idx, tiles in tile_batches(str(a), grid, start=2, batch_size=5):
        assert int(idx[0]) == expect and np.array_equal(tiles.numpy(), _per_tile(osr, grid, np.asarray(idx)))
        if expect + 5 < len(grid):  # the next batch is being read while the caller holds this one
            deadline = time.monotonic() + 10
            while not any(first == expect + 5 for first, _ in readers) and time.monotonic() < deadline:
                time.sleep(0.005)
            assert any(first == expect + 5 for first, _ in readers)
        expect += len(idx)
    assert expect == len(grid)
    assert all(name.startswith("tile-reader") for _, name in readers)
    assert [first for first, _ in readers] == list(range(2, len(grid), 5))  # each batch read once

    readers.clear()
    stream = tile_batches(str(a), grid, batch_size=5)
    for idx, _ in stream:
        break
    stream.close()
    assert not any(t.name.startswith("tile-reader") and t.is_alive() for t in threading.enumerate())
    assert len(readers) <= 2

    def broken(job, handles):
        if job.first >= 10:
            raise RuntimeError("OpenSlide error: a corrupt tile")
        return original(job, handles)

    monkeypatch.setattr(loader, "read_batch", broken)
    got = []
    with pytest.raises(RuntimeError, match="corrupt tile"):
        for idx, _ in tile_batches(str(a), grid, batch_size=5):
            got.append(int(idx[0]))
    assert got == [0, 5]
    osr.close()


def test_streams_queued_and_dropped_from_other_threads_never_disturb_the_one_being_read(make_slide):
    """The flow queues slides' tiles from several threads and a slide stopped while waiting
    for its turn drops its batches from its own thread, while another slide is being read:
    the slide being read still gets every batch, in order, and nothing is left behind."""
    import queue
    import threading
    import time

    a, _ = make_slide("dp_plain", mpp=0.5, width_um=1500, height_um=600)
    osr = openslide.OpenSlide(str(a))
    grid = _grid(osr, 0.5, target_mpp=0.5)
    with ReaderPool(2, prefetch=2) as pool:
        stop = threading.Event()
        errors: list = []

        def churn():  # queue and drop other slides' streams as fast as possible
            try:
                while not stop.is_set():
                    others = [tile_batches(str(a), grid, batch_size=1, pool=pool) for _ in range(3)]
                    for o in others:
                        o.close()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        got = []

        def consume():
            try:
                for _ in range(3):
                    for idx, tiles in tile_batches(str(a), grid, batch_size=3, pool=pool):
                        got.append((int(idx[0]), tiles.numpy().copy()))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        churners = [threading.Thread(target=churn) for _ in range(2)]
        reader = threading.Thread(target=consume)
        for t in (*churners, reader):
            t.start()
        reader.join(timeout=120)
        stop.set()
        for t in churners:
            t.join(timeout=30)
        assert not reader.is_alive(), "the slide being read waited forever for a batch"
        assert not errors, errors
        starts = list(range(0, len(grid), 3))
        assert [i for i, _ in got] == starts * 3
        for i, tiles in got[: len(starts)]:
            assert np.array_equal(tiles, _per_tile(osr, grid, np.arange(i, min(i + 3, len(grid)))))
        # every dropped batch was discarded as it came back: nothing kept, nothing owed
        deadline = time.monotonic() + 30
        while pool._inflight and time.monotonic() < deadline:
            try:
                pool._take(pool._results.get(timeout=1.0))
            except queue.Empty:
                pass
        assert not pool._inflight and not pool._done and not pool._streams
    osr.close()


def _open_files(pid: int) -> set[str]:
    import os

    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


def test_idle_readers_let_go_of_their_slides_and_still_read_after(tmp_path):
    """A pool kept by a long-lived process (a Prefect worker) holds no slide open between runs
    (a JPEG TIFF: its reader keeps the file open while in use)."""
    import time

    from conftest import tissue_scene

    from slide_clip.synthetic import write_slide

    a = write_slide(tmp_path / "jpeg.tif", tissue_scene(1500, 600, 0.5), 0.5, levels=2, compression="jpeg")
    osr = openslide.OpenSlide(str(a))
    grid = _grid(osr, 0.5, target_mpp=0.5)
    path = str(a.resolve())
    with ReaderPool(1, prefetch=2, idle_close=0.5) as pool:
        pid = pool._workers[0].pid
        for idx, tiles in tile_batches(str(a), grid, batch_size=8, pool=pool):
            pass
        assert path in _open_files(pid)  # read: the slide is open in the reader
        deadline = time.monotonic() + 20
        while path in _open_files(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert path not in _open_files(pid)  # idle: closed
        assert pool._workers[0].pid == pid  # by the same, living process
        got = [(idx, tiles) for idx, tiles in tile_batches(str(a), grid, start=4, batch_size=8, pool=pool)]
        assert int(got[0][0][0]) == 4
        assert np.array_equal(got[0][1].numpy(), _per_tile(osr, grid, np.asarray(got[0][0])))
    osr.close()


def test_thumbnail_bands_read_in_threads_equal_one_thread(cmu_svs, monkeypatch):
    import slide_clip.tissue as tissue

    osr = openslide.OpenSlide(str(cmu_svs))
    monkeypatch.setattr(tissue, "_STRIP_PIXELS", 400_000)  # many bands
    monkeypatch.setattr(tissue, "_THUMBNAIL_THREADS", 1)
    one = tissue.read_thumbnail(osr, 1024, 0.499)
    monkeypatch.setattr(tissue, "_THUMBNAIL_THREADS", 4)
    many = tissue.read_thumbnail(osr, 1024, 0.499)
    osr.close()
    assert np.array_equal(one.image, many.image) and one.downsample == many.downsample


def test_lookahead_queues_slides_in_order_whatever_order_they_are_prepared_in():
    import threading
    import time as _time

    from slide_clip.executor import LookAhead

    queued = []
    lock = threading.Lock()

    def prepare(i, turn):
        _time.sleep(0.05 * (3 - i % 3))  # later slides finish their own preparation first
        if i == 2:
            raise ValueError("slide 2 is bad")  # a failure never blocks the slides after it
        with turn:
            with lock:
                queued.append(i)
        return i

    ahead = LookAhead(6, prepare, depth=2, threads=3)
    got = []
    for i in range(6):
        f = ahead.take(i)
        got.append(f.exception() and "failed" or f.result())
    ahead.close()
    assert got == [0, 1, "failed", 3, 4, 5]
    assert queued == [0, 1, 3, 4, 5]


def test_a_reader_that_dies_fails_its_batch_and_is_replaced(make_slide):
    import os
    import signal

    a, _ = make_slide("dp_plain", mpp=0.5, width_um=1500, height_um=600)
    osr = openslide.OpenSlide(str(a))
    grid = _grid(osr, 0.5)
    with ReaderPool(2, prefetch=2) as pool:
        dead = pool._workers[0]
        os.kill(dead.pid, signal.SIGKILL)  # like a codec crash: no answer, no exception
        dead.join(timeout=10)
        first = tile_batches(str(a), grid, batch_size=5, pool=pool)
        with pytest.raises(ReaderError, match="tile-reading process died"):
            for _ in first:
                pass
        assert pool._workers[0].pid != dead.pid and pool._workers[0].is_alive()
        expect = 0
        for idx, tiles in tile_batches(str(a), grid, batch_size=5, pool=pool):  # the pool goes on
            assert int(idx[0]) == expect
            assert np.array_equal(tiles.numpy(), _per_tile(osr, grid, np.asarray(idx)))
            expect += len(idx)
        assert expect == len(grid)
    osr.close()


def test_a_lock_caught_between_taking_and_noting_is_tried_again(tmp_path):
    import threading

    from slide_clip.errors import StoreBusyError
    from slide_clip.store import store_lock

    store = tmp_path / "s.zarr"
    lock = tmp_path / "s.zarr.lock"
    released = threading.Event()

    def holder(ready):
        with store_lock(store):
            lock.write_text("")  # the note not written yet (or cleared while letting go)
            ready.set()
            released.wait(10)

    ready = threading.Event()
    t = threading.Thread(target=holder, args=(ready,))
    t.start()
    ready.wait(10)
    threading.Timer(0.2, released.set).start()
    with store_lock(store):  # not "an unknown process": the lock came free within the grace
        pass
    t.join()
    # a lock that stays held with no note is still refused, saying so
    ready, released = threading.Event(), threading.Event()
    t = threading.Thread(target=holder, args=(ready,))
    t.start()
    ready.wait(10)
    with pytest.raises(StoreBusyError, match="an unknown process"):
        with store_lock(store):
            pass
    released.set()
    t.join()


def test_turns_start_in_order_whatever_order_they_are_given_back_in():
    import threading

    from slide_clip.executor import Turns

    turns = Turns()
    started = []

    def take(i):
        turns.wait(i)
        started.append(i)

    turns.give_back(2)  # a later slide that needed no encoding: given back before its turn
    threads = [threading.Thread(target=take, args=(i,)) for i in (3, 1)]
    for t in threads:
        t.start()
    turns.wait(0)
    assert started == []  # 1 and 3 wait for 0
    turns.give_back(0)
    threads[1].join(timeout=10)
    assert started == [1]  # 3 still waits: 1 has not been given back
    turns.give_back(1)
    turns.give_back(1)  # idempotent
    threads[0].join(timeout=10)
    assert started == [1, 3]
