"""One slide from file to store: open, find tissue, tile, encode, write.

These are the library's entry points; the command line and the Prefect tasks call them.
Each stage is also callable alone (:func:`tile_slide`, :func:`encode_store`).
"""

from __future__ import annotations

import functools
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from slide_clip.config import TISSUE_ALGORITHM, PipelineConfig
from slide_clip.encoding import encode_store  # noqa: F401 - stage 3, re-exported here
from slide_clip.errors import ConfigError, SlideClipError, SlideError, StoreError, WeightsError
from slide_clip.slide import SlideInfo, check_mpp, open_slide, resolve_slide_path
from slide_clip.store import STATUS_CREATED, STATUS_TILED, SlideStore, store_lock, store_path
from slide_clip.tiling import TileGrid, make_grid, thumbnail_boxes
from slide_clip.tissue import qc_image, read_thumbnail, tissue_mask

#: Slides prepared (tissue, grid, tiles queued) ahead of the one encoding, in ``embed_slides``,
#: by this many threads (tissue detection is numpy/scipy work that mostly releases the GIL;
#: with small slides it, not the encoder, sets the pace).
LOOKAHEAD_SLIDES = 2
LOOKAHEAD_THREADS = 2

#: A thumbnail whose median brightness is below this is not a brightfield slide.
_MIN_BRIGHTFIELD_MEDIAN = 0.35


@dataclass
class SlideResult:
    """What happened to one slide (JSON-able via :meth:`to_dict`)."""

    slide: str
    name: str
    status: str  # "ok", "skipped" (already complete) or "failed"
    store: str | None = None
    n_tiles: int | None = None
    encoded: int = 0  # tiles encoded in this run
    seconds: float = 0.0
    error: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def tile_size_for(cfg: PipelineConfig) -> int:
    """The tile side in px: the configured one, or (``tile_size: null``, the default) the
    model's own: its entry's ``tile_size`` where its card cuts larger tiles and crops them
    (Prov-GigaPath: 256), else its input size, so that ``target_mpp`` is what the model sees.

    Every stage of every path (``embed``, the Prefect tasks) asks here; the sizes are read
    from the registry and the model's config without building it.
    """
    if cfg.tiling.tile_size is not None:
        return int(cfg.tiling.tile_size)
    return _model_tile_size(cfg.encode.model, tuple(cfg.encode.registries), cfg.encode.checkpoint)


#: Tile resolution when neither the user nor the model's registry entry gives one, µm/px.
DEFAULT_TARGET_MPP = 0.5


def target_mpp_for(cfg: PipelineConfig) -> float:
    """The tile resolution in µm/px: the configured one, or (``target_mpp: null``, the
    default) the µm/px the model was trained at (``training_mpp`` of its registry entry),
    else 0.5. Every stage of every path asks here."""
    if cfg.tiling.target_mpp is not None:
        return float(cfg.tiling.target_mpp)
    return _model_training_mpp(cfg.encode.model, tuple(cfg.encode.registries), cfg.encode.checkpoint)


@functools.lru_cache(maxsize=32)
def _model_training_mpp(model: str, registries: tuple, checkpoint: str | None) -> float:
    from slide_clip.encoders import resolve_model

    return float(resolve_model(model, registries, checkpoint).training_mpp or DEFAULT_TARGET_MPP)


@functools.lru_cache(maxsize=32)
def _model_input_size(model: str, registries: tuple, checkpoint: str | None) -> int:
    from slide_clip.encoders import model_input_size, resolve_model

    return model_input_size(resolve_model(model, registries, checkpoint))


@functools.lru_cache(maxsize=32)
def _model_tile_size(model: str, registries: tuple, checkpoint: str | None) -> int:
    from slide_clip.encoders import resolve_model
    from slide_clip.encoders.arch_configs import model_tile_size

    return model_tile_size(resolve_model(model, registries, checkpoint))


def resampling_note(cfg: PipelineConfig) -> str | None:
    """One line for the console when the model does not see the tiles pixel for pixel (tiles
    resampled to its input, or centre-cropped as its card does), else None. The µm/px and
    area it gives are what the stores record (:mod:`slide_clip.encoders.tile_view`)."""
    from slide_clip.encoders import resolve_model
    from slide_clip.encoders.tile_view import spec_view

    e = cfg.encode
    spec = resolve_model(e.model, tuple(e.registries), e.checkpoint)
    try:
        view = spec_view(spec, tile_size_for(cfg), target_mpp_for(cfg))
        return view.note(spec.name, _model_tile_size(e.model, tuple(e.registries), e.checkpoint))
    except SlideClipError:  # the model's input size is not known offline (--tile-size given): said later
        return None


def _settings(cfg: PipelineConfig) -> dict:
    """The store's ``tiling`` attributes that decide the tiles (the grid geometry is added later)."""
    t = cfg.tiling
    return {"target_mpp": target_mpp_for(cfg), "tile_size": tile_size_for(cfg), "overlap": t.overlap,
            "min_tissue": t.min_tissue, "tissue": cfg.tissue.model_dump(), "tissue_algorithm": TISSUE_ALGORITHM}


def _tile_size_attrs(cfg: PipelineConfig) -> dict:
    """How the tile size was chosen (recorded beside the settings in ``tiling``)."""
    from slide_clip.encoders import resolve_model
    from slide_clip.encoders.tile_view import spec_view

    e = cfg.encode
    size = tile_size_for(cfg)
    try:
        view = spec_view(resolve_model(e.model, tuple(e.registries), e.checkpoint), size, target_mpp_for(cfg))
        model_tile = _model_tile_size(e.model, tuple(e.registries), e.checkpoint)
    except SlideClipError:  # the model's input size is unknown offline; --tile-size was given
        view = model_tile = None
    return {"target_mpp_from": "model" if cfg.tiling.target_mpp is None else "user",
            "tile_size_from": "model" if cfg.tiling.tile_size is None else "user",
            "model_input_size": view.input_size if view else None, "model_tile_size": model_tile,
            "resampled": bool(view and view.resampled)}


def _reusable(path: Path, info: SlideInfo, cfg: PipelineConfig, mpp_xy, overwrite: bool) -> SlideStore | None:
    """The existing store at ``path`` if it holds this slide at these settings; None to rebuild."""
    if not (path / "zarr.json").is_file():
        return None
    store = SlideStore.open(path)
    if store.status == STATUS_CREATED or overwrite:
        return None
    old = store.slide
    if old.get("fingerprint") != info.fingerprint:
        other = str(old.get("path"))
        if other != info.path and Path(other).exists():  # another file's store: never replaced
            raise StoreError(f"holds the slide {other}, not {info.path}", path=path,
                             hint="Ids are unique per output folder when slides are given together "
                                  "(see docs/FORMAT.md); use another --out for this slide.")
        raise StoreError(f"was made from another version of {info.path} (fingerprint differs)", path=path,
                         hint=f"Name {info.path} with --overwrite to replace it, or use another --out.")
    store.check_tissue_algorithm()  # another algorithm's mask: refused, never mixed with this one's
    tiling = store.tiling
    wanted = _settings(cfg)
    if cfg.tiling.tile_size is None:  # tile size from the model: a store tiled for another model is kept
        wanted["tile_size"] = tiling.get("tile_size")
    recorded = {k: tiling.get(k) for k in wanted}
    if isinstance(recorded["tissue"], dict):
        # a tissue setting added after the store was made: the store was made as its default does
        recorded["tissue"] = {**type(cfg.tissue)().model_dump(), **recorded["tissue"]}
    if recorded != wanted or old.get("mpp_x") != mpp_xy[0]:
        raise StoreError("was tiled with other settings", path=path,
                         hint="Use --overwrite to re-tile it, or another --out.")
    return store


def _check_replaceable(path: Path, info: SlideInfo) -> None:
    """Refuse to replace (--overwrite) a store made from another slide file that still exists."""
    try:
        old = SlideStore.open(path).slide
    except SlideClipError:
        return  # half-created or foreign: nothing of another slide's to lose
    other = str(old.get("path"))
    if other != info.path and Path(other).exists() and old.get("fingerprint") != info.fingerprint:
        raise StoreError(f"holds the slide {other}, not {info.path}; --overwrite only replaces a store "
                         "of the same file", path=path, hint="Use another --out for this slide.")


def detect_tissue(osr, info: SlideInfo, cfg: PipelineConfig, path: Path, *, overwrite: bool = False,
                  checked=None) -> SlideStore:
    """Stage 1: check the resolution, read the thumbnail, find tissue; write them to a new store.

    An existing store is reused when it holds the same slide (fingerprint) at the same
    settings; another slide or other settings are an error unless ``overwrite``.
    ``checked`` (a callable) is called once the slide has passed these checks, before the
    thumbnail is read (``embed`` starts building the model there).
    """
    mpp_xy = check_mpp(info, target_mpp_for(cfg))
    store = _reusable(path, info, cfg, mpp_xy, overwrite)
    if checked is not None:
        checked()
    if store is not None:
        return store
    thumb = _read_thumbnail(osr, info, cfg)
    median = float(np.median(thumb.image)) / 255
    if median < _MIN_BRIGHTFIELD_MEDIAN:
        raise SlideError(
            f"has a dark background (median brightness {median:.2f}): it looks like a "
            "fluorescence or dark-field image, not brightfield H&E", path=info.path,
            hint="slide-clip handles brightfield RGB slides only.",
        )
    mask = tissue_mask(thumb.image, thumb.mpp, cfg.tissue)
    if overwrite and (path / "zarr.json").is_file():
        _check_replaceable(path, info)
    slide_attrs = {**info.to_dict(), "mpp_x": mpp_xy[0], "mpp_y": mpp_xy[1]}
    store = SlideStore.create(path, slide_attrs, {**_settings(cfg), **_tile_size_attrs(cfg)})
    area = float(mask.sum()) * thumb.downsample[0] * thumb.downsample[1] * mpp_xy[0] * mpp_xy[1] / 1e6
    store.write_tissue(mask, thumb.image, {"downsample": list(thumb.downsample), "mpp": thumb.mpp,
                                           "tissue_area_mm2": area})
    return store


def _read_thumbnail(osr, info: SlideInfo, cfg: PipelineConfig):
    """The slide's thumbnail; tiled JPEG TIFF levels are decoded by tifffile + imagecodecs, which
    gives OpenSlide's pixels faster (:mod:`slide_clip.jpeg_tiff`, checked when opened)."""
    from slide_clip.jpeg_tiff import open_jpeg_tiff

    reader = open_jpeg_tiff(osr, info.path, cache_bytes=0)  # a level is read once, band by band
    try:
        return read_thumbnail(reader, cfg.tissue.thumbnail_max_side, info.mpp, info.path)
    finally:
        if reader is not osr:
            reader.release()


def qc_path(store_path: str | Path) -> Path:
    """``<slide_id>_qc.png`` beside the store."""
    p = Path(store_path)
    return p.with_name(p.name[: -len(".zarr")] + "_qc.png")


def lay_tiles(store: SlideStore, cfg: PipelineConfig, *, background: list | None = None) -> SlideStore:
    """Stage 2: lay the tile grid over the stored mask, write it and the QC picture.

    With ``background`` (a list), the QC picture is drawn and written in a thread, off the
    way to the first encoded batch; the thread is appended to the list as a
    :class:`BackgroundWrite` and the caller joins it (its error, if any, is raised there).
    A store already tiled keeps its grid; its QC picture, if missing (lost to a full disk,
    or deleted), is drawn again from the store, exactly as it was.
    """
    if store.status == STATUS_TILED:
        if not qc_path(store.path).is_file():
            _write_qc(store, grid_from_store(store), background)
        return store
    s = store.slide
    tissue = store.group["tissue"].attrs
    downsample = tuple(tissue["downsample"])
    mask, thumb = store.mask(), store.thumbnail()
    t = cfg.tiling
    grid = make_grid((s["width"], s["height"]), (s["mpp_x"], s["mpp_y"]), s["level_downsamples"], mask,
                     downsample, target_mpp=float(store.tiling["target_mpp"]), tile_size=int(store.tiling["tile_size"]),
                     overlap=t.overlap,
                     min_tissue=t.min_tissue)
    path = _write_qc(store, grid, background, mask, thumb)
    store.group["tissue"].attrs.update({"qc_image": path.name})
    store.write_tiles(grid.coords, grid.grid, grid.tissue_fraction, {
        "tile_extent_level0": list(grid.extent),
        "stride_level0": list(grid.stride),
        "grid_shape": list(grid.shape),
        "read_level": grid.read_level,
        "read_downsample": grid.read_downsample,
    })
    return store


def _write_qc(store: SlideStore, grid: TileGrid, background: list | None, mask=None, thumb=None) -> Path:
    """Draw the QC picture of ``grid`` over the store's thumbnail and write it (atomically)."""
    from slide_clip.atomic import replace_file

    tissue = store.group["tissue"].attrs
    downsample = tuple(tissue["downsample"])
    mask = store.mask() if mask is None else mask
    thumb = store.thumbnail() if thumb is None else thumb
    path = qc_path(store.path)
    boxes = thumbnail_boxes(grid, downsample)
    title = qc_title(store.slide, grid, len(grid), tissue.get("tissue_area_mm2"))

    def write_qc():
        # compress_level 1: zlib's default (6) spends over a second on a 2048 px picture for a few % of size
        with replace_file(path) as tmp:  # a picture is whole or absent: a rerun redraws an absent one
            qc_image(thumb, mask, boxes, title=title).save(tmp, compress_level=1)

    if background is None:
        write_qc()
    else:
        background.append(BackgroundWrite(write_qc, path))
    return path


def qc_title(slide: dict, grid: TileGrid, n_tiles: int, tissue_mm2: float | None) -> str:
    """The QC picture's title: slide, the mpp used (and where it came from), tiles kept, tissue area.

    ``slide`` is the store's slide attributes (``mpp_x`` is the resolution used, override or
    metadata); ``grid`` the tile grid laid (its tile size and target mpp).
    """
    mpp = slide.get("mpp_x")
    source = slide.get("mpp_source")
    parts = [str(slide.get("name")),
             f"slide {mpp:.4g} µm/px" + (f" ({source})" if source else "") if mpp else "slide mpp unknown",
             f"{n_tiles} tiles of {grid.tile_size} px at {grid.target_mpp:g} µm/px",
             f"tissue {tissue_mm2:.2f} mm²" if tissue_mm2 is not None else "tissue area unknown"]
    return "  |  ".join(parts)


def tile_slide(osr, info: SlideInfo, cfg: PipelineConfig, path: Path, *, overwrite: bool = False,
               background: list | None = None, checked=None) -> SlideStore:
    """Find tissue and lay the tile grid (stages 1 and 2) into the store at ``path``
    (``background``: see :func:`lay_tiles`; ``checked``: see :func:`detect_tissue`)."""
    return lay_tiles(detect_tissue(osr, info, cfg, path, overwrite=overwrite, checked=checked), cfg,
                     background=background)


class BackgroundWrite:
    """A file written in a (non-daemon) thread; :meth:`join` waits and raises its error."""

    def __init__(self, fn, path):
        self.path = path
        self._error: BaseException | None = None

        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - handed to join()
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"write-{Path(path).name}")
        self._thread.start()

    def join(self) -> None:
        from slide_clip.output import output_errors

        self._thread.join()
        if self._error is not None:
            err, self._error = self._error, None
            with output_errors(self.path):
                raise err


def grid_from_store(store: SlideStore) -> TileGrid:
    """Rebuild the :class:`TileGrid` a store was tiled with."""
    t = store.tiling
    return TileGrid(
        coords=store.coords(),
        grid=store.grid(),
        tissue_fraction=store.tissue_fraction(),
        tile_size=int(t["tile_size"]),
        target_mpp=float(t["target_mpp"]),
        overlap=float(t["overlap"]),
        extent=tuple(t["tile_extent_level0"]),
        stride=tuple(t["stride_level0"]),
        shape=tuple(t["grid_shape"]),
        read_level=int(t["read_level"]),
        read_downsample=float(t["read_downsample"]),
    )


def embeddings_done(store: SlideStore, spec, encoder=None) -> bool:
    """Whether ``store`` already holds complete embeddings from this model and weights.

    Decided without loading the model where possible: by the loaded encoder's weights hash
    if one is given, else by the checkpoint file's sha256 (local weights), the weights
    source (hub or pretrained tag), or the random-weights flag (``random:ARCH``).
    """
    from slide_clip.encoders import file_sha256
    from slide_clip.encoders.spec import made_as

    if not store.is_complete(spec.name):
        return False
    a = store.embedding_attrs(spec.name)
    if not made_as(a, spec):  # another architecture or output under this name: made again
        return False
    if encoder is not None:
        return a.get("weights_sha256") == encoder.weights_sha256
    if spec.weights_kind == "random":
        return bool(a.get("random_weights")) and a.get("seed", 0) == spec.seed
    if spec.weights_kind == "file":
        return Path(spec.weights).is_file() and a.get("checkpoint_sha256") == file_sha256(spec.weights)
    return a.get("weights_source") == spec.weights


def _finished(path: Path, spec) -> bool:
    """Whether the store at ``path`` already holds complete embeddings of ``spec`` (cheap check)."""
    if not (path / "zarr.json").is_file():
        return False
    try:
        return embeddings_done(SlideStore.open(path), spec)
    except SlideClipError:
        return False


class EncoderCache:
    """Loads the configured encoder once, on first need (so finished slides load no model).

    :meth:`preload` starts loading in a background thread (and the tile readers' fork server,
    :func:`_start_workers_early`), so that building the model overlaps a slide's tissue
    detection; :meth:`get` waits for it (and raises its error). Callers preload once a slide
    has passed its checks (opened, resolution valid, store reusable or new): a refused slide
    never waits for a model it will not use.
    """

    def __init__(self, cfg: PipelineConfig, encoder=None):
        from slide_clip.encoders import resolve_model

        e = cfg.encode
        self.cfg = cfg
        self.encoder = encoder
        self.spec = encoder.spec if encoder is not None else resolve_model(e.model, e.registries, e.checkpoint)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._workers_started = False

    def _load(self) -> None:
        from slide_clip.encoders import load_encoder

        with self._lock:
            if self.encoder is None:
                e = self.cfg.encode
                self.encoder = load_encoder(self.spec, e.device, e.precision)

    def _load_in_background(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - handed to get()
            self._error = exc

    def preload(self) -> None:
        """Start loading in a background thread (no-op if loaded or already loading)."""
        if not self._workers_started:
            self._workers_started = True
            _start_workers_early(self.cfg)  # the fork server's imports overlap tissue detection
        if self.encoder is None and self._thread is None:
            # Not a daemon: the interpreter waits for it at exit. A daemon thread still inside
            # torch's C++ code when the interpreter shuts down aborts the process
            # ("terminate called without an active exception", exit 134).
            self._thread = threading.Thread(target=self._load_in_background, name="load-encoder", daemon=False)
            self._thread.start()

    def wait(self) -> None:
        """Wait for a background load to end (its error, if any, is kept for :meth:`get`)."""
        t = self._thread
        if t is not None:
            t.join()

    def get(self):
        """The encoder, loaded on first call (thread-safe: loaded once)."""
        t = self._thread  # read once: slides prepared in parallel threads may call this together
        if t is not None:
            t.join()
            self._thread = None
            if self._error is not None:
                err, self._error = self._error, None
                raise err
        self._load()
        return self.encoder


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


def embed_slide(
    slide: str | Path,
    out_dir: str | Path,
    cfg: PipelineConfig | None = None,
    *,
    mpp: float | None = None,
    encoder=None,
    encoders: EncoderCache | None = None,
    overwrite: bool = False,
    progress: bool = True,
    slide_id: str | None = None,
    readers=None,
) -> SlideResult:
    """Process one slide into ``out_dir/<slide_id>.zarr``: tissue, tiles, embeddings.

    ``slide_id`` names the store; by default it is assigned by
    :func:`slide_clip.slide_ids.assign_slide_ids` (unique within ``out_dir``).

    Raises :class:`~slide_clip.errors.SlideClipError` for bad input. The encoder is loaded
    from ``cfg`` only if the slide needs encoding; pass ``encoder`` (from
    :func:`slide_clip.encoders.load_encoder`) or an :class:`EncoderCache` to share one
    across slides; ``readers`` (:class:`slide_clip.lookahead.Readers`) shares the tile
    reader processes the same way.
    """
    from slide_clip.lookahead import Readers, finish_slide, prepare_slide
    from slide_clip.output import ensure_out_dir
    from slide_clip.slide_ids import assign_slide_ids

    from slide_clip.mpp_overrides import check_mpp_value

    cfg = cfg or PipelineConfig()
    mpp = check_mpp_value(mpp)
    own_cache = encoders is None
    encoders = encoders or EncoderCache(cfg, encoder)
    out = ensure_out_dir(out_dir)
    slide_id = slide_id or assign_slide_ids([slide], out)[str(slide)]
    own_readers = readers is None
    readers = readers or Readers(cfg)
    try:
        p = prepare_slide(slide, out, cfg, encoders, readers, mpp=mpp, overwrite=overwrite, slide_id=slide_id)
        return finish_slide(p, progress=progress)
    finally:
        if own_readers:
            readers.close()
        if own_cache:
            encoders.wait()


def embed_slides(
    slides: list[str | Path],
    out_dir: str | Path,
    cfg: PipelineConfig | None = None,
    *,
    mpps=None,
    mpp: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_result=None,
) -> list[SlideResult]:
    """Process several slides; a failing slide is recorded and the others go on.

    ``mpp`` overrides every slide's resolution; ``mpps`` (a
    :class:`slide_clip.mpp_overrides.MppTable` from ``read_mpp_csv``) per slide. Both are
    checked before any slide is read: a bad value, or a CSV row matching no slide or
    several, or two rows giving one slide different values, is a :class:`ConfigError`.

    The encoder is loaded once, when the first slide needs it, and one pool of tile-reader
    processes serves every slide. While a slide encodes, the next one is opened, checked,
    masked and tiled in a background thread and its first tile batches are queued behind
    this slide's (:mod:`slide_clip.lookahead`). Each slide's outcome is also written to
    ``out/status/<slide_id>.json``.
    """
    from slide_clip.errors import OutputError
    from slide_clip.lookahead import LookAhead, Readers, finish_slide, prepare_slide
    from slide_clip.output import ensure_out_dir
    from slide_clip.mpp_overrides import check_mpp_value
    from slide_clip.slide_ids import assign_slide_ids

    if not slides:
        raise ConfigError("no slides to process (an empty folder, or a pattern that matches nothing)",
                          hint="Check the input paths and --pattern.")
    cfg = cfg or PipelineConfig()
    mpp = check_mpp_value(mpp)
    ensure_out_dir(out_dir)
    ids = assign_slide_ids(slides, out_dir)
    overrides = mpps.match([(s, ids[str(s)]) for s in slides]) if mpps is not None else {}
    encoders = EncoderCache(cfg)
    readers = Readers(cfg)  # one pool of reader processes for every slide of the run
    results: list[SlideResult] = []

    def prepare(i: int, turn):
        s = slides[i]
        sid = ids[str(s)]
        override = mpp if mpp is not None else overrides.get(str(s))
        return prepare_slide(s, out_dir, cfg, encoders, readers, mpp=override, overwrite=overwrite, slide_id=sid,
                             turn=turn)

    # the next slides are checked, masked and tiled while this one encodes; the model build
    # (and the readers' fork server) starts once a slide has passed its checks (prepare_slide)
    ahead = LookAhead(len(slides), prepare, depth=LOOKAHEAD_SLIDES, threads=LOOKAHEAD_THREADS)
    try:
        for i, s in enumerate(slides):
            t0 = time.perf_counter()
            sid = ids[str(s)]
            try:
                r = finish_slide(ahead.take(i).result(), progress=progress)
            except SlideClipError as exc:
                if isinstance(exc, (WeightsError, ConfigError)):
                    raise  # a problem with the model or config fails every slide: stop now
                r = failed_result(s, str(exc), t0, name=sid)
            except Exception as exc:  # noqa: BLE001 - one bad slide never loses the others
                r = failed_result(s, unexpected_error(s, exc), t0, name=sid)
                r.extra["traceback"] = traceback.format_exc()
            results.append(r)
            try:
                record_status(out_dir, r)
            except OutputError as exc:  # a full disk: the slide's own line says so already
                r.extra["status_not_recorded"] = str(exc)
            if on_result:
                on_result(r)
    finally:
        ahead.close()  # slides prepared but not reached (a run stopped early) release their locks
        readers.close()
        encoders.wait()  # never exit while the model is still being built in the background
    return results


# ----------------------------------------------------------------------------- stage functions
# Path-in, small-values-out wrappers of the stages above, for orchestration layers (the
# Prefect tasks): nothing returned holds a model, an array or an open slide.

def check_slide(slide: str | Path, mpp: float | None, target_mpp: float) -> dict:
    """Open the slide, validate it and its resolution; returns its SlideInfo as a dict."""
    osr, info = open_slide(slide, mpp)
    osr.close()
    check_mpp(info, target_mpp)
    return info.to_dict()


def tissue_stage(slide: str | Path, out_dir: str | Path, cfg: PipelineConfig, *, mpp: float | None = None,
                 overwrite: bool = False, slide_id: str | None = None) -> str:
    """Stage 1 for a slide file: the store with its tissue mask (reused if already made).

    ``slide_id`` names the store (default: assigned for this one slide within ``out_dir``).
    """
    from slide_clip.output import ensure_out_dir, output_errors
    from slide_clip.slide_ids import assign_slide_ids

    ensure_out_dir(out_dir)
    sid = slide_id or assign_slide_ids([slide], out_dir)[str(slide)]
    osr, info = open_slide(slide, mpp)
    info = replace(info, name=sid)
    try:
        path = store_path(out_dir, info.name)
        with output_errors(path), store_lock(path):
            detect_tissue(osr, info, cfg, path, overwrite=overwrite)
    finally:
        osr.close()
    return str(path)


def tiles_stage(store: str | Path, cfg: PipelineConfig) -> int:
    """Stage 2 for a store: lay the tile grid; returns the number of tiles."""
    from slide_clip.output import output_errors

    with output_errors(store), store_lock(store):
        st = SlideStore.open(store)
        st.check_tissue_algorithm()
        return lay_tiles(st, cfg).n_tiles


def encode_stage(store: str | Path, slide: str | Path, cfg: PipelineConfig, encoders: EncoderCache, *,
                 force: bool = False, progress: bool = False, readers=None, turns=None, hold=None) -> dict:
    """Stage 3 for a store: encode its tiles unless complete for this model and weights.

    Returns ``{"model", "encoded", "skipped"}``. ``force`` re-encodes from scratch, beside the
    old embeddings (swapped in when complete; a rerun with ``force`` resumes it).

    For callers that encode many slides from several threads (the Prefect cohort flow):
    ``readers`` (:class:`slide_clip.lookahead.Readers`) is a reader pool shared across
    calls (else one is started for this store); ``turns``
    (:class:`slide_clip.lookahead.DeviceTurns`) makes the tiles be queued in that pool
    first and encoded when this slide's turn on the device comes, so the readers go from one
    slide to the next without a gap; ``hold`` (a context manager factory, e.g. a global
    concurrency slot) is entered once the turn is taken, around the encoding.
    """
    import contextlib

    from slide_clip.encoding import begin_encoding, run_encoding
    from slide_clip.loader import ReaderPool, resolve_workers
    from slide_clip.output import output_errors

    _start_workers_early(cfg)
    with output_errors(store), store_lock(store), contextlib.ExitStack() as stack:
        st = SlideStore.open(store)
        if st.status != STATUS_TILED:
            raise StoreError("is not tiled yet", path=store, hint="Run the tissue and tile stages first.")
        st.check_tissue_algorithm()
        # force: a new group is encoded beside the old one and swapped in when complete
        if not force and embeddings_done(st, encoders.spec, encoders.encoder):
            return {"model": encoders.spec.name, "encoded": 0, "skipped": True}
        encoder = encoders.get()
        if readers is not None:
            pool = readers.get(encoder.device)
        else:
            n = resolve_workers(cfg.encode.num_workers, encoder.device)
            pool = stack.enter_context(ReaderPool(n)) if n > 0 else None

        def queue():
            return begin_encoding(st, str(resolve_slide_path(slide)), encoder, cfg, pool=pool, replace=force)

        if turns is None:
            enc, turn = queue(), contextlib.nullcontext()
        else:
            enc, t = turns.queue(queue)
            turn = turns.turn(t)
        n = 0
        try:
            with turn:  # a slide with nothing to encode gives its turn back at once
                if enc is not None:
                    with hold() if hold is not None else contextlib.nullcontext():
                        n = run_encoding(enc, encoder, progress=progress)
        except BaseException:
            if enc is not None:
                enc.cancel()  # its queued tiles leave the pool (if it never got to encode)
            raise
    return {"model": encoders.spec.name, "encoded": n, "skipped": False}


def unexpected_error(slide, exc: BaseException) -> str:
    """One line for an error that is not the user's (a bug or a system fault)."""
    from slide_clip.errors import shown_path

    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]
    return f"{shown_path(slide)}: unexpected error: {detail}"


def record_status(out_dir, r: SlideResult) -> None:
    """Record what happened to a slide in ``out/status/<slide_id>.json`` (read by summaries).

    ``extra.seconds_embed`` (seconds from opening the slide to its last embedding written,
    in the run that encoded it) is carried over from the previous record when this run
    encoded nothing (a finished slide skipped, or only re-scored).
    """
    import json

    import os

    from slide_clip.output import output_errors

    d = Path(out_dir) / "status"
    data = r.to_dict()
    data["path"] = str(Path(r.slide).expanduser().resolve())
    data["extra"] = {k: v for k, v in data["extra"].items() if k != "traceback"}
    path = d / f"{r.name}.json"
    if "seconds_embed" not in data["extra"] and r.status != "failed" and not r.encoded:
        try:
            previous = json.loads(path.read_text()).get("extra", {}).get("seconds_embed")
        except (OSError, ValueError, AttributeError):
            previous = None
        if previous is not None:
            data["extra"]["seconds_embed"] = previous
    with output_errors(path):
        d.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # never a half-written status
        try:
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def failed_result(slide, message: str, t0: float, name: str | None = None) -> SlideResult:
    from slide_clip.slide import slide_id

    return SlideResult(slide=str(slide), name=name or slide_id(slide), status="failed", error=message,
                       seconds=round(time.perf_counter() - t0, 3))
