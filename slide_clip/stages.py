"""The stages of one slide before the encoder: check, tissue, tile grid, QC picture.

Stage 1 (:func:`detect_tissue`) checks the slide's resolution, reads the thumbnail and finds
tissue into a new store (or reuses a store of the same slide and settings); stage 2
(:func:`lay_tiles`) lays the tile grid at the exact target µm/px and draws the QC picture.
:func:`tile_slide` does both. :func:`embeddings_done` says, without loading a model where it
can, whether a store's embeddings of a model are complete. The executor
(:mod:`slide_clip.executor`) calls these for every slide of every path.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np

from slide_clip.config import TISSUE_ALGORITHM, PipelineConfig
from slide_clip.errors import SlideClipError, SlideError, StoreError
from slide_clip.slide import SlideInfo, check_mpp
from slide_clip.store import STATUS_CREATED, STATUS_TILED, SlideStore
from slide_clip.text import plural
from slide_clip.tiling import TileGrid, make_grid, thumbnail_boxes
from slide_clip.tissue import qc_image, read_thumbnail, tissue_mask

#: A thumbnail whose median brightness is below this is not a brightfield slide.
_MIN_BRIGHTFIELD_MEDIAN = 0.35


def tile_size_for(cfg: PipelineConfig) -> int:
    """The tile side in px: the configured one, or (``tile_size: null``, the default) the
    model's own: its entry's ``tile_size`` where its card cuts larger tiles and crops them
    (Prov-GigaPath: 256), else its input size, so that ``target_mpp`` is what the model sees.

    Every path (``embed``, ``run``, the shard deployments) asks here; the sizes are read
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
        if other != info.path and _exists(other):  # another file's store: never replaced
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


def _exists(slide_path: str) -> bool:
    """Whether the slide file (a local path or a URL) named in a store still exists."""
    from slide_clip.storage.objects import exists

    return exists(slide_path)


def _check_replaceable(path: Path, info: SlideInfo) -> None:
    """Refuse to replace (--overwrite) a store made from another slide file that still exists."""
    try:
        old = SlideStore.open(path).slide
    except SlideClipError:
        return  # half-created or foreign: nothing of another slide's to lose
    other = str(old.get("path"))
    if other != info.path and _exists(other) and old.get("fingerprint") != info.fingerprint:
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
    """``<slide_id>_qc.png`` beside the store (a Path, or a UPath beside a store at a URL)."""
    from slide_clip.storage.filesystems import upath

    p = upath(store_path)
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
    from slide_clip.storage.objects import replace_file

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
             f"{plural(n_tiles, 'tile')} of {grid.tile_size} px at {grid.target_mpp:g} µm/px",
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

        self._thread = threading.Thread(target=run, name=f"write-{getattr(path, 'name', path)}")
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


def finished(path: Path, spec) -> bool:
    """Whether the store at ``path`` already holds complete embeddings of ``spec`` (cheap check)."""
    if not (path / "zarr.json").is_file():
        return False
    try:
        return embeddings_done(SlideStore.open(path), spec)
    except SlideClipError:
        return False


def tissue_stage(slide: str | Path, out_dir: str | Path, cfg: PipelineConfig, *, mpp: float | None = None,
                 overwrite: bool = False, slide_id: str | None = None) -> str:
    """Stage 1 alone, for a slide file: the store with its tissue mask (reused if already made).

    ``slide_id`` names the store (default: assigned for this one slide within ``out_dir``).
    """
    from dataclasses import replace

    from slide_clip.output import ensure_out_dir, output_errors
    from slide_clip.slide import open_slide
    from slide_clip.slide_ids import assign_slide_ids
    from slide_clip.storage.owner import store_owner
    from slide_clip.store import store_path

    ensure_out_dir(out_dir)
    sid = slide_id or assign_slide_ids([slide], out_dir)[str(slide)]
    osr, info = open_slide(slide, mpp)
    info = replace(info, name=sid)
    try:
        path = store_path(out_dir, info.name)
        with output_errors(path), store_owner(path):
            detect_tissue(osr, info, cfg, path, overwrite=overwrite)
    finally:
        osr.close()
    return str(path)


def tiles_stage(store: str | Path, cfg: PipelineConfig) -> int:
    """Stage 2 alone, for a store: lay the tile grid; returns the number of tiles."""
    from slide_clip.output import output_errors
    from slide_clip.storage.owner import store_owner

    with output_errors(store), store_owner(store):
        st = SlideStore.open(store)
        st.check_tissue_algorithm()
        return lay_tiles(st, cfg).n_tiles
