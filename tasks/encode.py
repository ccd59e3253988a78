"""Stage: CLIP image embeddings of every tile, resumable.

The encoder is loaded once per worker process and model (not per slide). Within a process
one slide encodes at a time per device (other slides' tissue and tiling go on meanwhile);
across processes, a Prefect global concurrency limit named by ``limit`` does the same for a
machine's GPU. A CUDA out-of-memory error retries the slide with half the batch size.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from slide_clip.config import PipelineConfig
from slide_clip.pipeline import EncoderCache, encode_stage
from tasks._policy import RETRIES, RETRY_DELAY_SECONDS, transient

#: The global concurrency limit deployments use around encoding; "{host}" is this machine's
#: name, so `prefect gcl create slide-clip-encoder-<host> --limit 1` gives one encoder per GPU
#: machine. A limit that does not exist does not block (Prefect logs a warning).
DEFAULT_LIMIT = "slide-clip-encoder-{host}"

_lock = threading.Lock()
_encoders: dict[str, EncoderCache] = {}
_device_locks: dict[str, threading.Lock] = {}


def _device_lock(config: PipelineConfig) -> threading.Lock:
    with _lock:
        return _device_locks.setdefault(config.encode.device, threading.Lock())


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
    """Encode the store's tiles; returns ``{"model", "encoded", "skipped", "batch_size"}``."""
    import torch

    encoders = encoders_for(config)
    cfg = config
    name = limit.format(host=socket.gethostname()) if limit else None
    while True:
        try:
            with _device_lock(cfg), (concurrency(name, occupy=1) if name else contextlib.nullcontext()):
                out = encode_stage(store, slide, cfg, encoders, force=force)
            return {**out, "batch_size": cfg.encode.batch_size}
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if cfg.encode.batch_size == 1:
                raise
            cfg = cfg.with_overrides(encode={"batch_size": max(1, cfg.encode.batch_size // 2)})
            force = False  # resume the rows already written
