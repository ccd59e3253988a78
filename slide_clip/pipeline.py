"""Slides from file to store: the library's entry points for embedding.

:func:`embed_slide` and :func:`embed_slides` run slides through the executor
(:class:`slide_clip.executor.SlideRun`): open and check, find tissue, lay the tile grid at the
exact µm/px, encode, write. The ``slide-clip embed`` command calls them; ``slide-clip run``
and the shard deployments use the same executor inside Prefect flows. The stages are also
callable alone (:mod:`slide_clip.stages`: :func:`tissue_stage`, :func:`tiles_stage`,
:func:`tile_slide`, :func:`grid_from_store`;
:mod:`slide_clip.encoding`: :func:`encode_store`).
"""

from __future__ import annotations

from pathlib import Path

from slide_clip.config import PipelineConfig
from slide_clip.encoders.cache import EncoderCache
from slide_clip.encoding import encode_store  # noqa: F401 - stage 3, re-exported here
from slide_clip.errors import ConfigError, OutputError
from slide_clip.executor import SlideRun
from slide_clip.manifest import CohortSlide
from slide_clip.results import SlideResult, record_status
from slide_clip.storage.options import apply as apply_storage
from slide_clip.stages import (  # noqa: F401 - the stages, re-exported here
    detect_tissue,
    embeddings_done,
    grid_from_store,
    lay_tiles,
    resampling_note,
    qc_path,
    qc_title,
    target_mpp_for,
    tile_size_for,
    tile_slide,
    tiles_stage,
    tissue_stage,
)


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
) -> SlideResult:
    """Process one slide into ``out_dir/<slide_id>.zarr``: tissue, tiles, embeddings.

    ``slide_id`` names the store; by default it is assigned by
    :func:`slide_clip.slide_ids.assign_slide_ids` (unique within ``out_dir``).

    Raises :class:`~slide_clip.errors.SlideClipError` for bad input. The encoder is loaded
    from ``cfg`` only if the slide needs encoding; pass ``encoder`` (from
    :func:`slide_clip.encoders.load_encoder`) or an :class:`EncoderCache` to share one
    across slides.
    """
    from slide_clip.mpp_overrides import check_mpp_value
    from slide_clip.output import ensure_out_dir
    from slide_clip.slide_ids import assign_slide_ids

    cfg = cfg or PipelineConfig()
    apply_storage(cfg)  # the config's storage section before any URL is opened
    mpp = check_mpp_value(mpp)
    out = ensure_out_dir(out_dir)
    slide_id = slide_id or assign_slide_ids([slide], out)[str(slide)]
    with SlideRun(cfg, out, encoders=encoders or EncoderCache(cfg, encoder), overwrite=overwrite,
                  progress=progress) as run:
        return run.finish(run.prepare(CohortSlide(str(slide), mpp=mpp, name=slide_id)))


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

    One executor (:class:`slide_clip.executor.SlideRun`) serves every slide: the model is
    loaded once, when the first slide needs it; one pool of tile-reader processes reads every
    slide; while a slide encodes, the next ones are checked, masked and tiled in background
    threads and their first batches queued behind this slide's. Each slide's outcome is also
    written to ``out/status/<slide_id>.json``.
    """
    from slide_clip.mpp_overrides import check_mpp_value
    from slide_clip.output import ensure_out_dir
    from slide_clip.slide_ids import assign_slide_ids

    if not slides:
        raise ConfigError("no slides to process (an empty folder, or a pattern that matches nothing)",
                          hint="Check the input paths and --pattern.")
    cfg = cfg or PipelineConfig()
    apply_storage(cfg)  # the config's storage section before any URL is opened
    mpp = check_mpp_value(mpp)
    ensure_out_dir(out_dir)
    ids = assign_slide_ids(slides, out_dir)
    overrides = mpps.match([(s, ids[str(s)]) for s in slides]) if mpps is not None else {}
    items = [CohortSlide(str(s), mpp=mpp if mpp is not None else overrides.get(str(s)), name=ids[str(s)])
             for s in slides]

    def recorded(r: SlideResult) -> None:
        try:
            record_status(out_dir, r)
        except OutputError as exc:  # a full disk: the slide's own line says so already
            r.extra["status_not_recorded"] = str(exc)
        if on_result:
            on_result(r)

    with SlideRun(cfg, out_dir, overwrite=overwrite, progress=progress) as run:
        return run.run(items, on_result=recorded)
