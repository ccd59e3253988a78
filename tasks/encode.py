"""Stage: CLIP image embeddings of every tile, resumable.

The encoder is loaded once per worker process and model (not per slide), and so is the pool
of tile-reader processes (one per device and worker count, closed when the process exits;
the readers close their slide files after :data:`slide_clip.loader.IDLE_CLOSE_SECONDS`
without work): slides of a cohort flow share both. Within a process one slide encodes at a time per device,
in the order the slides queued their tiles in the pool (:class:`slide_clip.lookahead.DeviceTurns`):
a slide that reaches this stage while another encodes queues its tiles at once, so the
readers go on to them as the other slide's are handed out (other slides' tissue and tiling
go on meanwhile, in the flow's other threads). Across processes, a Prefect global
concurrency limit named by ``limit`` holds a machine's GPU for one slide at a time: the limit
is created with one slot the first time a machine uses it. A CUDA out-of-memory error
retries the slide with half the batch size.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import threading
import time

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from slide_clip.config import PipelineConfig
from slide_clip.errors import ConfigError
from slide_clip.lookahead import DeviceTurns, Readers
from slide_clip.pipeline import EncoderCache, encode_stage
from slide_clip_tasks._policy import RETRIES, RETRY_DELAY_SECONDS, transient

_lock = threading.Lock()
_encoders: dict[str, EncoderCache] = {}
_device_turns: dict[str, DeviceTurns] = {}
_readers: dict[tuple, Readers] = {}
_limits_ensured: set[str] = set()


def limit_name(template: str) -> str:
    """The concurrency limit's name here: ``{host}`` is the machine's name, ``{gpu}`` the
    process's ``CUDA_VISIBLE_DEVICES`` (``all`` if unset), for one worker per GPU."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip().replace(",", "+") or "all"
    try:
        return template.format(host=socket.gethostname(), gpu=gpu)
    except (KeyError, IndexError, ValueError):
        raise ConfigError(f"encoder limit name {template!r} may only use the fields {{host}} and {{gpu}}") from None


def ensure_limit(name: str, slots: int = 1) -> None:
    """Create the global concurrency limit ``name`` with ``slots`` unless it exists.

    Prefect treats a limit that does not exist as no limit at all, so a worker on a new
    machine would otherwise run encoders side by side on one GPU.
    """
    if name in _limits_ensured:
        return
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        except ObjectAlreadyExists:
            pass
    _limits_ensured.add(name)


def _turns(config: PipelineConfig) -> DeviceTurns:
    with _lock:
        return _device_turns.setdefault(config.encode.device, DeviceTurns())


def readers_for(config: PipelineConfig) -> Readers:
    """One pool of tile-reader processes per device and worker count in this process."""
    key = (config.encode.device, str(config.encode.num_workers))
    with _lock:
        if key not in _readers:
            _readers[key] = Readers(config)
        return _readers[key]


@atexit.register
def _close_readers() -> None:
    with _lock:
        pools = list(_readers.values())
        _readers.clear()
    for r in pools:
        r.close()


def encoders_for(config: PipelineConfig) -> EncoderCache:
    """One EncoderCache per encode configuration in this process."""
    key = config.encode.model_dump_json(exclude={"batch_size", "num_workers", "chunk_rows", "flush_seconds"})
    with _lock:
        if key not in _encoders:
            _encoders[key] = EncoderCache(config)
        return _encoders[key]


@task(name="encode", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS,
      retry_condition_fn=transient)
def encode_task(store: str, slide: str, config: PipelineConfig, force: bool = False,
                limit: str | None = None) -> dict:
    """Encode the store's tiles.

    Returns ``{"model", "encoded", "skipped", "batch_size", "window"}``: ``window`` is the
    wall-clock [start, end] (epoch seconds) during which this slide held the device (None
    when there was nothing to encode).
    """
    import torch

    encoders = encoders_for(config)
    cfg = config
    name = limit_name(limit) if limit else None
    if name:
        ensure_limit(name)
    while True:
        window = []

        @contextlib.contextmanager
        def hold():
            with concurrency(name, occupy=1) if name else contextlib.nullcontext():
                window.append(time.time())
                try:
                    yield
                finally:
                    window.append(time.time())

        try:
            out = encode_stage(store, slide, cfg, encoders, force=force, readers=readers_for(cfg), turns=_turns(cfg),
                               hold=hold)
            return {**out, "batch_size": cfg.encode.batch_size, "window": window or None}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if cfg.encode.batch_size == 1:
                raise
            cfg = cfg.with_overrides(encode={"batch_size": max(1, cfg.encode.batch_size // 2)})
            # force stays: the forced re-encode written beside the old group resumes where it stopped
