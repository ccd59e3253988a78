"""Batches of tiles from slides, read in a thread of the calling process or by reader processes.

A batch is a range of consecutive tile indices of one slide (``batch_size`` tiles), read
with :func:`slide_clip.reading.read_tiles` (one ``read_region`` per strip of a grid row).
It comes back as ``(n, h, w, 3)`` uint8 tiles (normalised later, on the device: see
:mod:`slide_clip.encoders.pixels`), or, when the encoder needs its per-tile PIL preprocess
(a tile resampled to the model's input, an unusual pipeline), as ``(n, 3, h, w)`` float32
from that preprocess.

:class:`ReaderPool` is a set of reader processes that outlives one slide: each keeps a
few slide handles open (an LRU keyed by path and file identity) and the pool takes batches of the next
slide's :class:`TileStream` as soon as the current slide's are all handed out, so the
readers move on to the next slide without a gap. Results come back in submission order;
every batch says which tile rows it holds, and the caller checks them against the rows it
expects. A read error fails that slide's stream only; a reader process that dies (a
crash in a codec) fails the batch it was reading and is replaced.

Only paths, level-0 coordinates and small geometry cross process boundaries one way, and
uint8 tiles (shared memory) the other.
"""

from __future__ import annotations

import collections
import itertools
import queue as queue_mod
import traceback
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch

from slide_clip.errors import SlideError
from slide_clip.tiling import TileGrid

#: Batches each reader process may hold read ahead of the consumer.
PREFETCH_PER_WORKER = 4
#: Open slide handles a reader process keeps (least recently used closed first).
HANDLES_PER_WORKER = 4
#: Seconds without a batch to read after which a reader process closes its slide handles
#: (and their tile caches): a pool kept by a long-lived process (a Prefect worker, ``serve``)
#: holds no files or cache memory between runs.
IDLE_CLOSE_SECONDS = 30.0


@dataclass(frozen=True)
class TileJob:
    """One batch to read: tiles ``first:first+len(coords)`` of a slide (small, picklable)."""

    job_id: int
    slide_file: str
    first: int
    coords: np.ndarray  # (n, 2) level-0 x, y
    grid: TileGrid  # geometry only (no coordinate arrays)
    preprocess: Callable | None  # None: uint8 tiles


def read_batch(job: TileJob, handles: "collections.OrderedDict") -> tuple[torch.Tensor, torch.Tensor]:
    """Read one job with handles from ``handles`` (an LRU of open slides, updated here).

    Returns the tile indices and the pixels: ``(n, h, w, 3)`` uint8, or the stacked
    per-tile preprocess output.
    """
    from slide_clip.reading import open_for_reading, read_tiles

    key = file_key(job.slide_file)
    osr = handles.pop(key, None)
    if osr is None:
        osr = open_for_reading(job.slide_file)
    handles[key] = osr
    while len(handles) > HANDLES_PER_WORKER:
        _, old = handles.popitem(last=False)
        old.close()
    tiles = read_tiles(osr, job.coords, job.grid, path=job.slide_file)
    idx = torch.arange(job.first, job.first + len(job.coords))
    if job.preprocess is None:
        return idx, torch.from_numpy(tiles)
    from PIL import Image

    return idx, torch.stack([job.preprocess(Image.fromarray(t)) for t in tiles])


#: A URL's identity (size, ETag) is asked of the service at most this often per worker, seconds.
REMOTE_KEY_SECONDS = 5.0
_remote_keys: dict = {}  # url -> (time asked, key)


def file_key(path: str) -> tuple:
    """A handle's key: the path and the file's identity, so that a pool that outlives one run
    (a Prefect worker's) never reads a slide replaced at the same path from a stale handle.
    A local file's identity is its inode, size and mtime; a URL's its size and ETag (an
    object store's mtime is the upload's, and a folder of a DICOM series has none)."""
    import os

    from slide_clip.storage.urls import is_url

    if is_url(path):
        return _url_key(path)
    try:
        st = os.stat(path)
    except OSError:
        return (path,)
    return (path, st.st_ino, st.st_size, st.st_mtime_ns)


def _url_key(url: str) -> tuple:
    import time

    from slide_clip.storage.cache import SlideCache, etag_of

    now = time.monotonic()
    hit = _remote_keys.get(url)
    if hit is not None and now - hit[0] < REMOTE_KEY_SECONDS:
        return hit[1]
    try:
        files = SlideCache.remote_files(url)
    except Exception:  # noqa: BLE001 - opening the slide reports what is wrong with it
        return (url,)
    key = (url, *sorted((n, int(i.get("size") or 0), etag_of(i)) for n, i in files.items()))
    if len(_remote_keys) > 256:
        _remote_keys.clear()
    _remote_keys[url] = (now, key)
    return key


#: Environment variables that say how to reach slides at URLs: the storage options
#: (:mod:`slide_clip.storage.options`) and each service's credential chain.
STORAGE_ENV_PREFIXES = ("SLIDE_CLIP_STORAGE", "AWS_", "GOOGLE_", "GCE_", "AZURE_", "FSSPEC_")


def storage_env() -> dict:
    """This process's storage environment, handed to each reader process when it starts."""
    import os

    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}


def _use_storage_env(env: dict | None) -> None:
    """Take the pool owner's storage environment: a reader forked from a fork server started
    earlier inherits the server's (the credentials or endpoint set since would be missing)."""
    import os

    if env is None:
        return
    for k in [k for k in os.environ if k.startswith(STORAGE_ENV_PREFIXES) and k not in env]:
        del os.environ[k]
    os.environ.update(env)
    from slide_clip.storage.options import reload

    reload()  # read again from SLIDE_CLIP_STORAGE_OPTIONS


def _worker_main(tasks, results, idle_close: float = IDLE_CLOSE_SECONDS, env: dict | None = None) -> None:
    """A reader process: read jobs from ``tasks`` until None, answer on ``results``; its
    slide handles are closed after ``idle_close`` seconds without a job. ``env``: the pool
    owner's storage environment (:func:`storage_env`)."""
    _use_storage_env(env)
    torch.set_num_threads(1)
    handles: collections.OrderedDict = collections.OrderedDict()
    while True:
        try:
            job = tasks.get(timeout=idle_close) if handles else tasks.get()
        except queue_mod.Empty:  # idle: let go of the files and their caches
            while handles:
                handles.popitem(last=False)[1].close()
            continue
        if job is None:
            break
        try:
            out = ("ok", job.job_id, read_batch(job, handles))
        except SlideError as e:  # the slide's own one-line error (corrupt image data)
            out = ("slide-error", job.job_id, str(e))
        except Exception:  # noqa: BLE001 - handed to the consumer, which fails that slide
            out = ("error", job.job_id, traceback.format_exc())
        results.put(out)
        del out
    for osr in handles.values():
        osr.close()


class ReaderError(RuntimeError):
    """A batch could not be read (the text holds the reader's traceback)."""


def _jobs(slide_file: str, grid: TileGrid, start: int, batch_size: int, preprocess, ids) -> list[TileJob]:
    geometry = replace(grid, coords=np.zeros((0, 2), np.int64), grid=np.zeros((0, 2), np.int32),
                       tissue_fraction=np.zeros(0, np.float32))
    coords = np.asarray(grid.coords)
    return [TileJob(next(ids), str(slide_file), i, np.ascontiguousarray(coords[i:i + batch_size]), geometry,
                    preprocess) for i in range(start, len(coords), batch_size)]


class TileStream:
    """The batches of one slide from tile ``start`` on, in order: iterate for ``(indices, pixels)``.

    Made by :func:`tile_batches`. Without a pool, batches are read in a thread of the calling
    process, one batch ahead of the consumer. With a pool they are read ahead by the pool;
    :meth:`close` (or leaving the iteration early) drops what is still queued.
    """

    def __init__(self, jobs: list[TileJob], pool: "ReaderPool | None"):
        self.jobs = jobs
        self.pool = pool
        self.closed = False
        if pool is not None:
            pool._add(self)

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            if self.pool is None:
                yield from _read_ahead_in_thread(self.jobs)
            else:
                for job in self.jobs:
                    yield self.pool._result(job)
        finally:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.pool is not None:
                self.pool._drop(self)


def _read_ahead_in_thread(jobs: list[TileJob]):
    """The batches of ``jobs`` in order, each read in one background thread while the caller
    encodes the one before (decoding and resampling release the GIL), so that without reader
    processes the model does not wait for every batch to be read. One batch is read ahead;
    leaving early waits for that read and closes the slide."""
    from concurrent.futures import ThreadPoolExecutor

    handles: collections.OrderedDict = collections.OrderedDict()  # used by the reading thread only
    ex = ThreadPoolExecutor(1, thread_name_prefix="tile-reader")
    pending = None
    try:
        for k in range(len(jobs)):
            batch = (pending if pending is not None else ex.submit(read_batch, jobs[k], handles)).result()
            pending = ex.submit(read_batch, jobs[k + 1], handles) if k + 1 < len(jobs) else None
            yield batch
    finally:
        ex.shutdown(wait=True, cancel_futures=True)  # the read under way ends; none starts
        for osr in handles.values():
            osr.close()


def tile_batches(slide_file: str, grid: TileGrid, *, start: int = 0, batch_size: int = 64,
                 preprocess: Callable | None = None, pool: "ReaderPool | None" = None) -> TileStream:
    """Batches of tiles ``start:`` of ``grid`` in grid order (never shuffled: rows follow tiles).

    ``preprocess`` None gives uint8 ``(n, h, w, 3)`` tiles; a callable (PIL image -> tensor)
    is applied to every tile in the reader. ``pool`` None reads in a thread of the calling
    process, one batch ahead.
    """
    ids = pool._ids if pool is not None else itertools.count()
    return TileStream(_jobs(slide_file, grid, start, batch_size, preprocess, ids), pool)


class ReaderPool:
    """``num_workers`` reader processes shared by every slide of a run (see the module text).

    Use as a context manager, or call :meth:`close`. Thread-safe: streams may be made, read
    and closed from different threads (the Prefect flow queues a slide's tiles in one thread
    while another slide's are read, and a slide stopped while waiting for its turn drops its
    queued batches from its own thread); the pool's bookkeeping is under one lock, held
    only between waits.
    """

    def __init__(self, num_workers: int, prefetch: int = PREFETCH_PER_WORKER,
                 idle_close: float = IDLE_CLOSE_SECONDS):
        import threading

        if num_workers < 1:
            raise ValueError("a ReaderPool needs at least one worker")
        self._ctx = worker_context()
        self._idle_close = float(idle_close)
        self._results = self._ctx.Queue()
        self._workers: list = []
        self._tasks: list = []
        for _ in range(num_workers):
            self._start_worker()
        self.window = num_workers * prefetch
        self._ids = _LockedCounter()
        self._lock = threading.RLock()
        self._streams: collections.deque[TileStream] = collections.deque()
        self._next: collections.deque[TileJob] = collections.deque()  # of the stream being queued
        self._inflight: dict[int, int] = {}  # job id -> worker
        self._order: list[collections.deque] = [collections.deque() for _ in range(num_workers)]
        self._done: dict[int, tuple] = {}
        self._dropped: set[int] = set()
        self._rr = 0

    # -- processes
    def _start_worker(self, slot: int | None = None) -> None:
        tasks = self._ctx.Queue()
        p = self._ctx.Process(target=_worker_main, args=(tasks, self._results, self._idle_close, storage_env()),
                              daemon=True, name="slide-clip-reader")
        p.start()
        if slot is None:
            self._workers.append(p)
            self._tasks.append(tasks)
        else:
            self._workers[slot], self._tasks[slot] = p, tasks

    def close(self) -> None:
        for q in self._tasks:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._workers:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self._results.close()
        for q in self._tasks:
            q.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- streams
    def _add(self, stream: TileStream) -> None:
        with self._lock:
            self._streams.append(stream)

    def _drop(self, stream: TileStream) -> None:
        with self._lock:
            if stream in self._streams:
                self._streams.remove(stream)
            ids = {j.job_id for j in stream.jobs}
            self._next = collections.deque(j for j in self._next if j.job_id not in ids)
            for i in ids:
                if i in self._inflight:
                    self._dropped.add(i)
                self._done.pop(i, None)

    def _fill(self) -> None:
        """Submit jobs in stream order until ``window`` are in flight."""
        with self._lock:
            while len(self._inflight) < self.window:
                while self._streams and not self._next:
                    s = self._streams.popleft()
                    self._next = collections.deque(s.jobs)
                if not self._next:
                    return
                job = self._next.popleft()
                w = self._rr % len(self._workers)
                self._rr += 1
                self._tasks[w].put(job)
                self._inflight[job.job_id] = w
                self._order[w].append(job)

    def _take(self, msg) -> None:
        with self._lock:
            self._take_locked(msg)

    def _take_locked(self, msg) -> None:
        status, job_id, payload = msg
        w = self._inflight.pop(job_id, None)
        if w is not None and self._order[w] and self._order[w][0].job_id == job_id:
            self._order[w].popleft()
        elif w is not None:
            self._order[w] = collections.deque(j for j in self._order[w] if j.job_id != job_id)
        if job_id in self._dropped:
            self._dropped.discard(job_id)
            return
        self._done[job_id] = (status, payload)

    def _check_workers(self) -> None:
        with self._lock:
            self._check_workers_locked()

    def _check_workers_locked(self) -> None:
        for w, p in enumerate(self._workers):
            if p.is_alive():
                continue
            while True:  # answers it sent before dying
                try:
                    self._take(self._results.get_nowait())
                except queue_mod.Empty:
                    break
            pending = list(self._order[w])
            self._order[w] = collections.deque()
            self._start_worker(w)
            for k, job in enumerate(pending):
                self._inflight.pop(job.job_id, None)
                if k == 0:  # the one it was reading
                    if job.job_id in self._dropped:
                        self._dropped.discard(job.job_id)
                    else:
                        self._done[job.job_id] = ("error", f"a tile-reading process died (exit code "
                                                           f"{p.exitcode}) while reading tiles of "
                                                           f"{job.slide_file}")
                else:
                    self._tasks[w].put(job)
                    self._inflight[job.job_id] = w
                    self._order[w].append(job)

    def _result(self, job: TileJob):
        while True:
            with self._lock:
                if job.job_id in self._done:
                    status, payload = self._done.pop(job.job_id)
                    break
            self._fill()
            try:
                msg = self._results.get(timeout=1.0)  # never under the lock: other threads go on
            except queue_mod.Empty:
                self._check_workers()
            else:
                self._take(msg)
        self._fill()
        if status == "error":
            raise ReaderError(payload)
        if status == "slide-error":
            raise SlideError(payload)  # already one line naming the file
        return payload


class _LockedCounter:
    def __init__(self):
        import threading

        self._it = itertools.count()
        self._lock = threading.Lock()

    def __next__(self) -> int:
        with self._lock:
            return next(self._it)


def resolve_workers(num_workers, device) -> int:
    """Loader worker processes for ``num_workers`` (an int, or ``"auto"``) on ``device``.

    ``auto`` reads tiles in a thread of the calling process on a CPU (one batch ahead): there
    the model costs ~40x more than reading and preprocessing a tile, and a worker process
    would preempt torch's own threads (measured in docs/BENCHMARKS.md). On a GPU, decoding dominates: ``min(8,
    cores - 1)`` workers.
    """
    import os

    if num_workers != "auto":
        return int(num_workers)
    if getattr(device, "type", str(device)) == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def worker_context():
    """How loader workers start: a fork server on Linux, ``spawn`` elsewhere.

    Workers are never forked from the calling process itself: it runs other threads (Zarr's
    I/O loop, an orchestrator's event loop, thread pools) and holds file locks, and a forked
    child would inherit both. The fork server imports torch and OpenSlide once, so workers
    forked from it start in a fraction of a second; :func:`start_worker_server` starts it
    early so that import overlaps other work.
    """
    import multiprocessing as mp
    import sys

    if not sys.platform.startswith("linux"):
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchvision", "openslide", "tifffile", "imagecodecs", "slide_clip.loader",
                              "slide_clip.reading", "slide_clip.jpeg_tiff"])
    return ctx


def start_worker_server(num_workers: int) -> None:
    """Start the fork server in the background (no wait) if loader workers will be needed."""
    if num_workers > 0:
        ctx = worker_context()
        if ctx.get_start_method() == "forkserver":
            from multiprocessing import forkserver

            forkserver.ensure_running()
