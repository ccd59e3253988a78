"""The executor: one device's encoder, tile-reader pool and look-ahead, over the slides of a run.

Every path that embeds slides goes through :class:`SlideRun`: ``slide-clip embed``
(:func:`slide_clip.pipeline.embed_slides`), the shard flow of ``slide-clip run`` and every
shard deployment on a work pool. A slide goes through it in two halves::

    prepare(slide)   open and check it, find tissue, lay the tile grid, draw the QC picture,
                     take the store's lock, queue the tiles still to encode in the reader pool
    finish(prepared) encode the queued tiles on the device, write them, release the lock

:meth:`SlideRun.run` pipelines a list of slides: while slide k encodes in the caller's thread,
the next ``depth`` slides are prepared in background threads and their tiles are queued
behind slide k's, in slide order, so the readers and the device go from one slide to the next
without a gap. The caller's thread is the pool's only consumer. One ``SlideRun`` holds one
device; a machine with several runs one per device (``slide-clip run --devices``), each in its
own process.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from slide_clip.config import PipelineConfig
from slide_clip.encoders.cache import EncoderCache
from slide_clip.encoding import Encoding, begin_encoding, run_encoding
from slide_clip.errors import ConfigError, SlideClipError, StoreBusyError, WeightsError
from slide_clip.manifest import CohortSlide
from slide_clip.output import output_errors
from slide_clip.results import SlideResult, failed_result, unexpected_error
from slide_clip.slide import open_slide, resolve_slide_path
from slide_clip.stages import embeddings_done, finished, tile_slide
from slide_clip.storage.filesystems import upath
from slide_clip.storage.owner import store_owner
from slide_clip.storage.urls import is_url
from slide_clip.store import SlideStore, store_path

#: Slides prepared (tissue, grid, tiles queued) ahead of the one encoding, by this many
#: threads (tissue detection is numpy/scipy work that mostly releases the GIL; with small
#: slides it, not the encoder, sets the pace).
LOOKAHEAD_SLIDES = 2
LOOKAHEAD_THREADS = 2
#: Slides at URLs that only a whole local copy serves (not TIFF/SVS read by range) are staged
#: into the local cache (:mod:`slide_clip.storage.cache`) this many slides beyond the look-ahead.
PREFETCH_SLIDES = 2


@dataclass
class Prepared:
    """A slide with its store tiled and locked, and its missing tiles queued (``enc``)."""

    item: CohortSlide
    path: Path
    store: SlideStore
    done: bool  # nothing to encode, nothing redrawn
    enc: Encoding | None
    encoder: object | None  # the encoder ``enc`` was queued for
    hold: contextlib.ExitStack  # the store lock and the disk-error translation
    t0: float
    background: list  # files still being written in threads (the QC picture)
    ready_at: float = 0.0  # epoch seconds when preparation ended (tiles queued)

    def join_background(self) -> None:
        for b in self.background:
            b.join()
        self.background = []

    def abandon(self) -> None:
        """Give up on this slide: drop its queued tiles, write what was encoded, release the lock."""
        try:
            if self.enc is not None:
                self.enc.cancel()
        finally:
            try:
                _join_quietly(self.background)
            finally:
                self.hold.close()


class SlideRun:
    """One device's executor (see the module text). Use as a context manager, or :meth:`close`.

    ``cfg`` names the model, device, batch size and reader processes (``cfg.encode``) and
    the tiling; ``encoders`` shares an :class:`EncoderCache` with other work of the process
    (scoring reuses the model that embedded). Slides already complete load no model.
    """

    def __init__(self, cfg: PipelineConfig, out_dir: str | Path, *, encoders: EncoderCache | None = None,
                 overwrite: bool = False, progress: bool = False, depth: int = LOOKAHEAD_SLIDES,
                 threads: int = LOOKAHEAD_THREADS):
        from slide_clip.storage.options import apply

        apply(cfg)  # the config's storage section (endpoint, profile...) before any URL is opened
        self.cfg = cfg
        self.out = upath(out_dir)  # a Path, or a UPath for a URL (never Path(url): s3://x -> s3:/x)
        self.encoders = encoders or EncoderCache(cfg)
        self.overwrite = overwrite
        self.progress = progress
        self.depth, self.threads = depth, threads
        self._pool = None
        self._pool_lock = threading.Lock()
        self._workers_started = False
        self.batch_size = cfg.encode.batch_size

    @property
    def spec(self):
        return self.encoders.spec

    # ------------------------------------------------------------------ resources
    def _readers(self, device):
        """The reader pool (started on first need; None where tiles are read in a thread)."""
        from slide_clip.loader import ReaderPool, resolve_workers

        with self._pool_lock:
            n = resolve_workers(self.cfg.encode.num_workers, device)
            if self._pool is None and n > 0:
                self._pool = ReaderPool(n)
            return self._pool

    def _start_model(self) -> None:
        """Build the model in the background and start the readers' fork server (once a slide
        has passed its checks: a refused slide never waits for a model it will not use)."""
        if not self._workers_started:
            self._workers_started = True
            _start_workers_early(self.cfg)  # the fork server's imports overlap tissue detection
        self.encoders.preload()

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
        self.encoders.wait()  # never exit while the model is still being built in the background

    def __enter__(self) -> "SlideRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ one slide, two halves
    def prepare(self, item: CohortSlide, turn=None) -> Prepared:
        """Open and check the slide, find tissue, lay the grid, lock the store, queue the tiles.

        ``turn`` (a context manager) is held while the tiles are queued, so that slides
        prepared in parallel queue them in slide order. Bad input raises its
        :class:`SlideClipError`.
        """
        t0 = time.perf_counter()
        background: list = []
        osr, info = open_slide(item.path, item.mpp)
        info = replace(info, name=item.slide_id)
        try:
            path = store_path(self.out, info.name)
            with contextlib.ExitStack() as stack:
                stack.enter_context(output_errors(path))
                stack.enter_context(store_owner(path))  # flock locally, a claim at a URL
                checked = self._start_model if self.overwrite or not finished(path, self.spec) else None
                stack.callback(_join_quietly, background)  # a failure below: never leave a writer behind
                store = tile_slide(osr, info, self.cfg, path, overwrite=self.overwrite, background=background,
                                   checked=checked)
                done = embeddings_done(store, self.spec, self.encoders.loaded())
                enc = encoder = None
                redrawn = bool(background)  # a lost QC picture drawn again: the slide was not skipped
                if not done:
                    encoder = self.encoders.get()
                    with turn if turn is not None else contextlib.nullcontext():
                        enc = self._queue(store, item, encoder)
                hold = stack.pop_all()
        finally:
            osr.close()
        return Prepared(item, path, store, done and not redrawn, enc, encoder, hold, t0, background, time.time())

    def _queue(self, store: SlideStore, item: CohortSlide, encoder) -> Encoding | None:
        cfg = self.cfg if self.batch_size == self.cfg.encode.batch_size else \
            self.cfg.with_overrides(encode={"batch_size": self.batch_size})
        return begin_encoding(store, _slide_file(item.path), encoder, cfg,
                              pool=self._readers(encoder.device), replace=self.overwrite)

    def finish(self, p: Prepared) -> SlideResult:
        """Encode what :meth:`prepare` queued, release the store; the slide's result.

        ``extra.encode_window`` is the wall-clock [start, end] (epoch seconds) in which the
        slide held the device, ``extra.ready_at`` when its preparation had ended (a gap before
        a window that starts long after ``ready_at`` is the executor's own hand-off time). A
        CUDA out-of-memory error halves the batch size (for this and the following slides) and
        resumes the rows already written.
        """
        window = None
        with p.hold:
            try:
                encoded = 0
                if p.enc is not None:
                    start = time.time()
                    encoded = self._encode(p)
                    window = [start, time.time()]
            except BaseException:
                # what was encoded is written while the store is still this run's (its lock or
                # claim); the slide's own error is the one raised
                if p.enc is not None:
                    with contextlib.suppress(Exception):
                        p.enc.cancel()
                raise
            finally:
                p.join_background()  # the QC picture, written while the first batches encoded
        seconds = round(time.perf_counter() - p.t0, 3)
        extra = {"seconds_embed": seconds, "encode_window": window, "ready_at": p.ready_at,
                 "batch_size": self.batch_size} if encoded else {}
        return SlideResult(slide=p.item.path, name=p.item.slide_id, status="skipped" if p.done else "ok",
                           store=str(p.path), n_tiles=p.store.n_tiles, encoded=encoded, seconds=seconds, extra=extra)

    def _encode(self, p: Prepared) -> int:
        import torch

        encoded = 0
        while True:
            try:
                return encoded + run_encoding(p.enc, p.encoder, progress=self.progress)
            except torch.cuda.OutOfMemoryError:
                encoded += p.enc.writer.next_row - p.enc.start
                p.enc.cancel()
                torch.cuda.empty_cache()
                if self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                p.enc = self._queue(p.store, p.item, p.encoder)
                if p.enc is None:
                    return encoded

    # ------------------------------------------------------------------ many slides
    def run(self, items: list[CohortSlide], on_result=None) -> list[SlideResult]:
        """Every slide of ``items`` in order, pipelined; a failing slide is a ``failed``
        result and the others go on. A problem with the model or the configuration (it
        would fail every slide) is raised at once. ``on_result(result)`` is called as each
        slide is done, in the caller's thread."""
        ahead = LookAhead(len(items), lambda i, turn: self.prepare(items[i], turn), self.depth, self.threads)
        prefetch = Prefetch([it.path for it in items], self.depth + PREFETCH_SLIDES)
        results: list[SlideResult] = []
        try:
            for i, item in enumerate(items):
                t0 = time.perf_counter()
                prefetch.after(i)  # the next slides' whole copies are fetched while this one encodes
                try:
                    r = self.finish(ahead.take(i).result())
                except SlideClipError as exc:
                    if isinstance(exc, (WeightsError, ConfigError)):
                        raise  # a problem with the model or config fails every slide: stop now
                    r = failed_result(item.path, str(exc), t0, name=item.slide_id)
                    if isinstance(exc, StoreBusyError):  # another run's slide: its status is that run's
                        r.extra["busy"] = True
                except Exception as exc:  # noqa: BLE001 - one bad slide never loses the others
                    r = failed_result(item.path, unexpected_error(item.path, exc), t0, name=item.slide_id)
                    r.extra["traceback"] = traceback.format_exc()
                results.append(r)
                if on_result is not None:
                    on_result(r)
        finally:
            ahead.close()  # slides prepared but not reached (a run stopped early) release their locks
        return results


# ----------------------------------------------------------------------------- look-ahead
class Prefetch:
    """Stage the slides after the current one (URLs that need a whole local copy) into the
    process's slide cache in the background, each once; local paths and TIFF/SVS read by
    range need nothing. A failed fetch is the slide's own error when it is opened."""

    def __init__(self, paths: list, ahead: int):
        self.paths = [str(p) for p in paths]
        self.ahead = ahead
        self.done = 0  # slides [0, done) were handed to the cache
        self.remote = any(is_url(p) for p in self.paths)

    def after(self, i: int) -> None:
        if not self.remote:
            return
        end = min(len(self.paths), i + 1 + self.ahead)
        start = max(self.done, i + 1)
        if start < end:
            from slide_clip.storage.cache import prefetch

            prefetch(self.paths[start:end])
            self.done = end


class Turns:
    """Numbered turns taken in order: turn i starts once every earlier turn is given back
    (used, failed, or never needed), whatever order they are given back in."""

    def __init__(self):
        self._cv = threading.Condition()
        self._current = 0
        self._returned: set[int] = set()

    def wait(self, i: int) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._current >= i)

    def give_back(self, i: int) -> None:
        """Give turn ``i`` back; idempotent."""
        with self._cv:
            if i >= self._current:
                self._returned.add(i)
            while self._current in self._returned:
                self._returned.discard(self._current)
                self._current += 1
            self._cv.notify_all()


class LookAhead:
    """Prepare slides in order in ``threads`` background threads, at most ``depth`` ahead of
    the consumer; each queues its tiles in slide order (:meth:`turn`).

    ``prepare(i, turn)`` is called for i = 0, 1, ...; :meth:`take` returns slide i's Future.
    Prepared slides never taken (a run stopped early) are abandoned by :meth:`close`.
    """

    def __init__(self, n: int, prepare, depth: int = 1, threads: int = 1):
        self.n = n
        self.prepare = prepare
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="slide-lookahead")
        self._futures: collections.OrderedDict[int, Future] = collections.OrderedDict()
        self._next = 0
        self._turns = Turns()  # turn i: slide i may queue its tiles

    @contextlib.contextmanager
    def turn(self, i: int):
        """Held while slide ``i`` queues its tiles: waits until every earlier slide has queued
        its own (or failed, or needed none)."""
        self._turns.wait(i)
        try:
            yield
        finally:
            self._turns.give_back(i)

    def _run(self, i: int):
        try:
            return self.prepare(i, self.turn(i))
        finally:
            self._turns.give_back(i)  # a slide that failed or needs no encoding never blocks the next

    def _submit_upto(self, last: int) -> None:
        while self._next <= min(last, self.n - 1):
            self._futures[self._next] = self._pool.submit(self._run, self._next)
            self._next += 1

    def take(self, i: int) -> Future:
        self._submit_upto(i + self.depth)
        return self._futures.pop(i)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for f in self._futures.values():
            if f.done() and not f.cancelled() and f.exception() is None:
                f.result().abandon()
        self._futures.clear()


def _slide_file(path) -> str:
    """What the tile readers open: the resolved local file, or the URL (read by range or from the cache)."""
    return str(path) if is_url(path) else str(resolve_slide_path(path))


def _join_quietly(background: list) -> None:
    for b in background:
        try:
            b.join()
        except Exception:  # noqa: BLE001 - the slide already fails with its own error
            pass


def _start_workers_early(cfg: PipelineConfig) -> None:
    """Start the loader's fork server now if this run will use worker processes.

    In a background thread when that needs the device (``auto`` workers): picking the device
    imports torch, which the calling thread does not need before the slide is tiled.
    """
    if cfg.encode.num_workers == 0:
        return
    if cfg.encode.num_workers == "auto":
        # not a daemon: a daemon thread inside torch's import at interpreter exit can abort it
        threading.Thread(target=_start_workers_now, args=(cfg,), name="start-readers", daemon=False).start()
    else:
        _start_workers_now(cfg)


def _start_workers_now(cfg: PipelineConfig) -> None:
    from slide_clip.encoders import pick_device
    from slide_clip.loader import resolve_workers, start_worker_server

    e = cfg.encode
    try:
        n = resolve_workers(e.num_workers, pick_device(e.device) if e.num_workers == "auto" else None)
        start_worker_server(n)
    except SlideClipError:
        pass  # a bad device name: loading the encoder says so, in the calling thread
