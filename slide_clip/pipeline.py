"""One slide from file to store: open, find tissue, tile, encode, write.

These are the library's entry points; the command line and the Prefect tasks call them.
Each stage is also callable alone (:func:`tile_slide`, :func:`encode_store`).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from slide_clip.config import PipelineConfig
from slide_clip.errors import SlideClipError, SlideError, StoreError
from slide_clip.slide import SlideInfo, check_mpp, open_slide, resolve_slide_path
from slide_clip.store import SlideStore, store_lock, store_path
from slide_clip.tiling import TileGrid, make_grid, thumbnail_boxes
from slide_clip.tissue import qc_image, read_thumbnail, tissue_mask

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


def tiling_attrs(cfg: PipelineConfig, info: SlideInfo, grid: TileGrid) -> dict:
    """The store's ``tiling`` attributes: what decides the tiles."""
    t = cfg.tiling
    return {
        "target_mpp": t.target_mpp,
        "tile_size": t.tile_size,
        "overlap": t.overlap,
        "min_tissue": t.min_tissue,
        "tile_extent_level0": list(grid.extent),
        "stride_level0": list(grid.stride),
        "grid_shape": list(grid.shape),
        "read_level": grid.read_level,
        "read_downsample": grid.read_downsample,
        "tissue": cfg.tissue.model_dump(),
    }


def _settings_key(tiling: dict) -> dict:
    return {k: tiling[k] for k in ("target_mpp", "tile_size", "overlap", "min_tissue", "tissue")}


def tile_slide(osr, info: SlideInfo, cfg: PipelineConfig, path: Path, *, overwrite: bool = False) -> SlideStore:
    """Find tissue and lay the tile grid; write them (and a QC picture) to the store at ``path``.

    An existing store is reused when it was tiled from the same slide (fingerprint) with the
    same settings; with other settings or another slide it is an error unless ``overwrite``.
    """
    mpp_xy = check_mpp(info, cfg.tiling.target_mpp)
    if (path / "zarr.json").is_file():
        store = SlideStore.open(path)
        if store.status != "tiling" and not overwrite:
            old = store.slide
            if old.get("fingerprint") != info.fingerprint:
                raise StoreError("was made from another slide file (fingerprint differs)", path=path,
                                 hint="Use --overwrite to replace it, or another --out.")
            probe = {"target_mpp": cfg.tiling.target_mpp, "tile_size": cfg.tiling.tile_size,
                     "overlap": cfg.tiling.overlap, "min_tissue": cfg.tiling.min_tissue,
                     "tissue": cfg.tissue.model_dump()}
            if _settings_key(store.tiling) != probe or old.get("mpp_x") != mpp_xy[0]:
                raise StoreError("was tiled with other settings", path=path,
                                 hint="Use --overwrite to re-tile it, or another --out.")
            return store
    thumb = read_thumbnail(osr, cfg.tissue.thumbnail_max_side, info.mpp)
    median = float(np.median(thumb.image)) / 255
    if median < _MIN_BRIGHTFIELD_MEDIAN:
        raise SlideError(
            f"has a dark background (median brightness {median:.2f}): it looks like a "
            "fluorescence or dark-field image, not brightfield H&E", path=info.path,
            hint="slide-clip handles brightfield RGB slides only.",
        )
    mask = tissue_mask(thumb.image, thumb.mpp, cfg.tissue)
    t = cfg.tiling
    grid = make_grid((info.width, info.height), mpp_xy, info.level_downsamples, mask, thumb.downsample,
                     target_mpp=t.target_mpp, tile_size=t.tile_size, overlap=t.overlap,
                     min_tissue=t.min_tissue)
    slide_attrs = {**info.to_dict(), "mpp_x": mpp_xy[0], "mpp_y": mpp_xy[1]}
    store = SlideStore.create(path, slide_attrs, tiling_attrs(cfg, info, grid))
    qc = qc_image(thumb.image, mask, thumbnail_boxes(grid, thumb.downsample))
    qc_path = path.with_name(path.name[: -len(".zarr")] + "_qc.png")
    qc.save(qc_path)
    tissue_area_mm2 = float(mask.sum()) * thumb.downsample[0] * thumb.downsample[1] * mpp_xy[0] * mpp_xy[1] / 1e6
    store.write_tiles(grid.coords, grid.grid, grid.tissue_fraction, mask, thumb.image, {
        "downsample": list(thumb.downsample),
        "mpp": thumb.mpp,
        "tissue_area_mm2": tissue_area_mm2,
        "qc_image": qc_path.name,
    })
    return store


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


def encode_store(store: SlideStore, slide_file: str, encoder, cfg: PipelineConfig, *, progress: bool = True) -> int:
    """Encode the store's tiles not yet written with ``encoder``; returns how many were encoded.

    Resumes at the first row not on disk; a complete group is left alone.
    """
    from tqdm.auto import tqdm

    from slide_clip.loader import make_loader

    e = cfg.encode
    writer = store.begin_embeddings(encoder.provenance(), chunk_rows=e.chunk_rows)
    writer.flush_seconds = e.flush_seconds
    if writer.complete:
        return 0
    start = writer.next_row
    grid = grid_from_store(store)
    loader = make_loader(slide_file, grid, encoder.preprocess, start=start, batch_size=e.batch_size,
                         num_workers=e.num_workers, pin_memory=encoder.device.type == "cuda")
    done = 0
    bar = tqdm(total=len(grid), initial=start, unit="tile", desc=store.path.stem, disable=not progress,
               dynamic_ncols=True, leave=False)
    try:
        for idx, pixels in loader:
            if int(idx[0]) != writer.next_row:  # tile order is the row order; never skip or repeat
                raise RuntimeError(f"loader returned tile {int(idx[0])}, expected {writer.next_row}")
            writer.append(encoder.encode_images(pixels))
            done += len(idx)
            bar.update(len(idx))
    except SlideClipError:
        raise
    except Exception as exc:  # noqa: BLE001 - a worker's read error arrives here
        text = str(exc).strip().splitlines()
        reason = next((ln for ln in reversed(text) if ln.strip()), type(exc).__name__)
        if "OpenSlide" in reason or "openslide" in "".join(text) or "TIFF" in reason:
            raise SlideError(f"failed while reading tiles ({reason.strip()[:200]})", path=slide_file,
                             hint="The file may be truncated or corrupt; copy it again.") from None
        raise
    finally:
        bar.close()
        writer.flush()
    return done


def embed_slide(
    slide: str | Path,
    out_dir: str | Path,
    cfg: PipelineConfig | None = None,
    *,
    mpp: float | None = None,
    encoder=None,
    overwrite: bool = False,
    progress: bool = True,
) -> SlideResult:
    """Process one slide into ``out_dir/<slide_id>.zarr``: tissue, tiles, embeddings.

    Raises :class:`~slide_clip.errors.SlideClipError` for bad input. ``encoder`` (from
    :func:`slide_clip.encoders.load_encoder`) is loaded from ``cfg`` when not given; pass
    one to reuse it across slides.
    """
    from slide_clip.encoders import load_encoder, resolve_model

    cfg = cfg or PipelineConfig()
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    osr, info = open_slide(slide, mpp)
    try:
        path = store_path(out, info.name)
        with store_lock(path):
            store = tile_slide(osr, info, cfg, path, overwrite=overwrite)
            if encoder is None:
                e = cfg.encode
                spec = resolve_model(e.model, e.registries, e.checkpoint)
                encoder = load_encoder(spec, e.device, e.precision)
            already = store.is_complete(encoder.name) and store.embedding_attrs(encoder.name).get(
                "weights_sha256") == encoder.weights_sha256
            encoded = 0 if already else encode_store(store, str(resolve_slide_path(slide)), encoder, cfg, progress=progress)
    finally:
        osr.close()
    return SlideResult(
        slide=str(slide), name=info.name, status="skipped" if already else "ok", store=str(path),
        n_tiles=store.n_tiles, encoded=encoded, seconds=round(time.perf_counter() - t0, 3),
    )


def embed_slides(
    slides: list[str | Path],
    out_dir: str | Path,
    cfg: PipelineConfig | None = None,
    *,
    mpps: dict[str, float] | None = None,
    mpp: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_result=None,
) -> list[SlideResult]:
    """Process several slides; a failing slide is recorded and the others go on.

    The encoder is loaded once, when the first slide needs it.
    """
    from slide_clip.encoders import load_encoder, resolve_model
    from slide_clip.slide import lookup_mpp

    cfg = cfg or PipelineConfig()
    results: list[SlideResult] = []
    encoder = None
    for s in slides:
        t0 = time.perf_counter()
        try:
            if encoder is None:
                e = cfg.encode
                encoder = load_encoder(resolve_model(e.model, e.registries, e.checkpoint), e.device, e.precision)
            override = mpp if mpp is not None else (lookup_mpp(mpps, s) if mpps else None)
            r = embed_slide(s, out_dir, cfg, mpp=override, encoder=encoder, overwrite=overwrite,
                            progress=progress)
        except SlideClipError as exc:
            if exc.path is None and not isinstance(exc, (SlideError, StoreError)):
                raise  # a problem with the model or config fails every slide: stop now
            r = _failed(s, str(exc), t0)
        except Exception as exc:  # noqa: BLE001 - one bad slide never loses the others
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]
            r = _failed(s, f"{s}: unexpected error: {detail}", t0)
            r.extra["traceback"] = traceback.format_exc()
        results.append(r)
        _write_status(out_dir, r)
        if on_result:
            on_result(r)
    return results


def _write_status(out_dir, r: SlideResult) -> None:
    """Record what happened to a slide in ``out/status/<slide_id>.json`` (read by summaries)."""
    import json

    d = Path(out_dir) / "status"
    d.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in r.to_dict().items() if k != "extra"}
    (d / f"{r.name}.json").write_text(json.dumps(data, indent=1))


def _failed(slide, message: str, t0: float) -> SlideResult:
    from slide_clip.slide import slide_id

    return SlideResult(slide=str(slide), name=slide_id(slide), status="failed", error=message,
                       seconds=round(time.perf_counter() - t0, 3))
