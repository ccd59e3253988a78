"""One cache of loaded encoders: each model is built at most once per cache, on first need.

A run embeds with the configured model (:attr:`EncoderCache.spec`) and may score or search
with the models its stores were made with (:meth:`EncoderCache.for_store`); both come from
here, so a model that embedded a shard also gives its text classifiers without a second
build. :meth:`EncoderCache.preload` builds a model in a background thread, so that the build
overlaps a slide's tissue detection; :meth:`EncoderCache.get` waits for it and raises its
error. Nothing is built for a run whose slides are all finished.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

from slide_clip.config import PipelineConfig
from slide_clip.encoders.spec import ModelSpec, resolve_model, same_build
from slide_clip.errors import StoreError


class EncoderCache:
    """Encoders of one device and precision (those of ``cfg.encode``), by model spec.

    ``encoder`` adopts an already loaded encoder as the configured model's.
    """

    def __init__(self, cfg: PipelineConfig, encoder=None):
        self.cfg = cfg
        self._lock = threading.Lock()
        self._builds: dict[ModelSpec, Future] = {}
        self._threads: list[threading.Thread] = []
        self._spec: ModelSpec | None = None
        if encoder is not None:
            self._spec = encoder.spec
            self._builds[encoder.spec] = _done(encoder)

    @property
    def spec(self) -> ModelSpec:
        """The configured model (``cfg.encode.model``), resolved without building it."""
        if self._spec is None:
            e = self.cfg.encode
            self._spec = resolve_model(e.model, e.registries, e.checkpoint)
        return self._spec

    def loaded(self, spec: ModelSpec | None = None):
        """The encoder of ``spec`` (default: the configured model) if it is built already, else
        None; never builds, never waits."""
        f = self._builds.get(spec or self.spec)
        return f.result() if f is not None and f.done() and f.exception() is None else None

    # ------------------------------------------------------------------ building
    def _build(self, spec: ModelSpec, f: Future) -> None:
        from slide_clip.encoders.loading import load_encoder

        e = self.cfg.encode
        try:
            f.set_result(load_encoder(spec, e.device, e.precision))
        except BaseException as exc:  # noqa: BLE001 - raised by get()
            f.set_exception(exc)

    def _start(self, spec: ModelSpec, background: bool) -> Future:
        with self._lock:
            f = self._builds.get(spec)
            if f is not None:
                return f
            f = self._builds[spec] = Future()
            if background:
                # Not a daemon: the interpreter waits for it at exit. A daemon thread still inside
                # torch's C++ code when the interpreter shuts down aborts the process
                # ("terminate called without an active exception", exit 134).
                t = threading.Thread(target=self._build, args=(spec, f), name="load-encoder", daemon=False)
                self._threads.append(t)
                t.start()
                return f
        self._build(spec, f)
        return f

    def preload(self, spec: ModelSpec | None = None) -> None:
        """Start building ``spec`` (default: the configured model) in a background thread;
        no-op if it is built or being built."""
        self._start(spec or self.spec, background=True)

    def get(self, spec: ModelSpec | None = None):
        """The encoder of ``spec`` (default: the configured model), built on first need, once
        (thread-safe). A failed build raises its error here; the next call builds again."""
        spec = spec or self.spec
        f = self._start(spec, background=False)
        try:
            return f.result()
        except BaseException:
            with self._lock:
                if self._builds.get(spec) is f:
                    del self._builds[spec]
            raise

    def wait(self) -> None:
        """Wait for every background build (their errors are kept for :meth:`get`)."""
        for t in list(self._threads):
            t.join()

    # ------------------------------------------------------------------ stores' models
    def for_store(self, name: str, expected_sha256: str, where: Path, attrs: dict | None = None):
        """The encoder of the stored model ``name``, checked to be the one that made the store.

        With ``attrs`` (the store's embedding attributes) the model is rebuilt from what the
        store recorded (no ``--models`` registry needed); without, it is looked up by name. Other
        weights than ``expected_sha256``, or another build of the model, is a one-line error.
        """
        from slide_clip.encoders.loading import resolve_stored_model

        e = self.cfg.encode
        own = self.loaded(self._spec) if self._spec is not None else None
        if own is not None and own.spec.name == name:
            enc = own  # the model this run embeds with: the checks below decide if it made the store
        else:
            ckpt = e.checkpoint if e.model == name or attrs is not None and e.checkpoint else None
            spec = (resolve_stored_model(name, attrs, e.registries, ckpt, where) if attrs is not None
                    else resolve_model(name, e.registries, ckpt))
            enc = self.get(spec)
        if enc.weights_sha256 != expected_sha256:
            raise StoreError(
                f"embeddings were made by other weights than model {name!r} loads now "
                f"(stored {expected_sha256[:12]}…, loaded {enc.weights_sha256[:12]}…)", path=where,
                hint="Give the weights the store was made with (--checkpoint), or re-embed the slide.")
        if attrs is not None and not same_build(attrs, enc):
            raise StoreError(
                f"embeddings of {name!r} were made by another build of the model than the one it loads now "
                f"(an older slide-clip built open_clip's hub config for these weights)", path=where,
                hint=f"Re-embed the slides with --model {name} (the stored group is replaced).")
        return enc


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f
