"""One slide in two halves, so a run over many slides can prepare the next while this one encodes.

:func:`prepare_slide` opens and checks the slide, finds tissue, lays the tile grid, takes
the store's lock and queues the tiles to encode (in the reader pool, when there is one);
:func:`finish_slide` encodes them and releases the lock. :class:`LookAhead` runs the
preparing half of the next ``depth`` slides in one background thread, in slide order, so
that while slide k encodes, slide k+1's tissue and grid are made and its first tile
batches are already queued behind slide k's: the readers go from one slide to the next
without a gap. The store lock is held from preparing to finishing; a slide whose
preparation fails fails alone, when its turn comes.

Orchestrators that run each slide in its own thread (the Prefect cohort flow) get the same
hand-over from :class:`DeviceTurns`: a slide queues its tiles in the shared reader pool and
takes a turn in one step, then encodes when its turn comes, so slides encode in the order
their tiles were queued and the readers go on to the next slide's tiles as the current
slide's are handed out.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from slide_clip.config import PipelineConfig


@dataclass
class Prepared:
    """A slide with its store tiled and locked, and its missing tiles queued (``enc``)."""

    slide: str
    name: str
    path: Path
    store: object
    done: bool  # nothing to do: embeddings complete and the QC picture there
    enc: object | None  # slide_clip.encoding.Encoding
    encoder: object | None  # the encoder ``enc`` was queued for
    hold: contextlib.ExitStack  # the store lock and the disk-error translation
    t0: float
    background: list  # files still being written in threads (the QC picture)

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
                self.join_background()
            finally:
                self.hold.close()


class Readers:
    """The run's reader pool, started on first need (from any thread), closed at the end."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.pool = None
        self._lock = threading.Lock()

    def get(self, device):
        from slide_clip.loader import ReaderPool, resolve_workers

        with self._lock:
            n = resolve_workers(self.cfg.encode.num_workers, device)
            if self.pool is None and n > 0:
                self.pool = ReaderPool(n)
            return self.pool

    def close(self) -> None:
        with self._lock:
            if self.pool is not None:
                self.pool.close()
                self.pool = None


def prepare_slide(slide, out_dir, cfg: PipelineConfig, encoders, readers: Readers | None, *, mpp=None,
                  overwrite: bool = False, slide_id: str, turn=None) -> Prepared:
    """The first half of :func:`slide_clip.pipeline.embed_slide` (see the module text).

    ``turn`` (a context manager) is held while the slide's tiles are queued, so that
    slides prepared in parallel queue them in slide order.
    """
    from slide_clip.encoding import begin_encoding
    from slide_clip.output import output_errors
    from slide_clip.pipeline import _finished, embeddings_done, tile_slide
    from slide_clip.slide import open_slide, resolve_slide_path
    from slide_clip.store import store_lock, store_path

    t0 = time.perf_counter()
    background: list = []
    osr, info = open_slide(slide, mpp)
    info = replace(info, name=slide_id)
    try:
        path = store_path(out_dir, info.name)
        with contextlib.ExitStack() as stack:
            stack.enter_context(output_errors(path))
            stack.enter_context(store_lock(path))
            # the model builds while tissue is found, once the slide has passed its checks: a
            # refused slide (resolution, another file's store) never waits for a model build
            checked = encoders.preload if overwrite or not _finished(path, encoders.spec) else None
            stack.callback(_join_quietly, background)  # a failure below: never leave a writer behind
            store = tile_slide(osr, info, cfg, path, overwrite=overwrite, background=background, checked=checked)
            done = embeddings_done(store, encoders.spec, encoders.encoder)
            enc = encoder = None
            redrawn = bool(background)  # a lost QC picture drawn again: the slide was not skipped
            if not done:
                encoder = encoders.get()
                pool = readers.get(encoder.device) if readers is not None else None
                with turn if turn is not None else contextlib.nullcontext():
                    enc = begin_encoding(store, str(resolve_slide_path(slide)), encoder, cfg, pool=pool)
            hold = stack.pop_all()
    finally:
        osr.close()
    return Prepared(str(slide), info.name, path, store, done and not redrawn, enc, encoder, hold, t0, background)


def finish_slide(p: Prepared, *, progress: bool = True):
    """The second half: encode what :func:`prepare_slide` queued; returns the SlideResult."""
    from slide_clip.encoding import run_encoding
    from slide_clip.pipeline import SlideResult

    try:
        with p.hold:
            try:
                encoded = 0 if p.enc is None else run_encoding(p.enc, p.encoder, progress=progress)
            finally:
                p.join_background()  # the QC picture, written while the first batches encoded
    except BaseException:
        if p.enc is not None:
            p.enc.cancel()
        raise
    seconds = round(time.perf_counter() - p.t0, 3)
    return SlideResult(
        slide=p.slide, name=p.name, status="skipped" if p.done else "ok", store=str(p.path),
        n_tiles=p.store.n_tiles, encoded=encoded, seconds=seconds,
        extra={"seconds_embed": seconds} if encoded else {},
    )


class _Turns:
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


class DeviceTurns:
    """First come, first served turns on one device for slides encoded from several threads.

    :meth:`queue` runs a function (one that queues a slide's tiles in a reader pool) and
    hands out the next turn in one step, so turns follow the pool's queue order; :meth:`turn`
    waits for that turn and holds it while the slide encodes. A turn that is never used must
    be given back with :meth:`skip` (a slide that failed before encoding, or needed none),
    or every later slide would wait for it.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._issued = 0
        self._turns = _Turns()

    def queue(self, fn):
        """``(fn(), turn)``; ``fn`` runs while no other thread can queue (keep it short)."""
        with self._lock:
            out = fn()
            t = self._issued
            self._issued += 1
        return out, t

    @contextlib.contextmanager
    def turn(self, t: int):
        """Wait for turn ``t`` and hold it; the next turn starts when this one ends."""
        try:
            self._turns.wait(t)
            yield
        finally:
            self.skip(t)

    def skip(self, t: int) -> None:
        """Give turn ``t`` back (used or not); idempotent."""
        self._turns.give_back(t)


def _join_quietly(background: list) -> None:
    for b in background:
        try:
            b.join()
        except Exception:  # noqa: BLE001 - the slide already fails with its own error
            pass


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
        self._turns = _Turns()  # turn i: slide i may queue its tiles

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
