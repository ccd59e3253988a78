"""The per-slide flow: check, tissue, tile grid, encode, zero-shot, heatmaps.

Skips work already done, product by product: a complete store for the same slide fingerprint,
model and tiling settings is not re-encoded, scores are only recomputed when the prompt set
changed (or their summary is missing), heatmaps are drawn when they are missing or older than
the scores, and a lost QC picture is drawn again from the store.
``force`` redoes everything. The outcome is written to ``out/status/<slide_id>.json``,
also when the slide fails (then the flow run fails too).
"""

# No `from __future__ import annotations` here: a served deployment pickles the flow into a
# subprocess, and string annotations would not resolve there (PipelineConfig would be unknown).
import os
import socket
import time

from prefect import flow, get_run_logger
from prefect.context import get_run_context

from slide_clip.config import PipelineConfig, load_config
from slide_clip.errors import SlideClipError
from slide_clip.faults import kill_point
from slide_clip.pipeline import SlideResult, failed_result, qc_path, record_status, unexpected_error
from slide_clip.scoring import heatmaps_current
from slide_clip_flows import quiet_user_errors
from slide_clip_tasks.encode import encode_task
from slide_clip_tasks.heatmap import heatmap_task
from slide_clip_tasks.slide import check_slide_task
from slide_clip_tasks.tiles import tiles_task
from slide_clip_tasks.tissue import tissue_task
from slide_clip_tasks.zeroshot import zeroshot_task


def _where() -> dict:
    """Which process ran the slide (a worker's flow-run process reports its worker as parent)."""
    ctx = get_run_context()
    return {"host": socket.gethostname(), "pid": os.getpid(), "parent_pid": os.getppid(),
            "flow_run_id": str(ctx.flow_run.id) if getattr(ctx, "flow_run", None) else None}


@flow(name="process-slide", log_prints=True)
def process_slide(
    slide: str,
    out: str,
    config: PipelineConfig | None = None,
    mpp: float | None = None,
    prompts: list[str] = ["tumour"],  # noqa: B006 - Prefect parameters are copied per run
    heatmaps: bool = True,
    force: bool = False,
    encoder_limit: str | None = None,
    metadata: dict | None = None,
    slide_id: str | None = None,
) -> dict:
    """Process one slide into ``out``; returns its status record (JSON-able).

    ``slide_id`` names the store (the cohort flow assigns ids unique within ``out``);
    by default it is assigned for this slide alone.
    """
    from slide_clip.slide_ids import assign_slide_ids

    quiet_user_errors()
    cfg = config or load_config()
    log = get_run_logger()
    t0 = time.perf_counter()
    store = n_tiles = None  # kept in the status of a slide that fails after they are known
    embed_seconds = {}
    scored = {}  # score sets done, kept in the status of a slide that fails at a later set
    sid = slide_id or assign_slide_ids([slide], out)[str(slide)]
    try:
        check_slide_task(slide, cfg, mpp)
        store = tissue_task(slide, out, cfg, mpp, force, sid)
        qc_missing = not qc_path(store).is_file()  # drawn (again) by the tile stage
        n_tiles = tiles_task(store, cfg)
        enc = encode_task(store, slide, cfg, force, encoder_limit)
        if enc["encoded"] > 0:  # else record_status keeps the value of the run that encoded
            embed_seconds = {"seconds_embed": round(time.perf_counter() - t0, 3)}
        drawn = False
        for p in prompts:
            summary = zeroshot_task(store, p, cfg, enc["model"], force)
            scored[summary["score_set"]] = {"predicted": summary["predicted"], "rescored": summary["rescored"],
                                            "slide_prob": summary["slide_prob"], "model": enc["model"]}
            kill_point("scored")
            # every product is checked, not only the scores: heatmaps lost, deleted, or never
            # drawn (a run stopped after scoring) are drawn now from the stored scores
            if heatmaps and (summary["rescored"]
                             or not heatmaps_current(store, summary["score_set"], cfg, model=enc["model"])):
                scored[summary["score_set"]]["heatmaps"] = heatmap_task(store, summary["score_set"], cfg,
                                                                        enc["model"])
                drawn = True
        did_work = enc["encoded"] > 0 or any(v["rescored"] for v in scored.values()) or drawn or qc_missing
        result = SlideResult(slide=slide, name=sid, status="ok" if did_work else "skipped",
                             store=store, n_tiles=n_tiles, encoded=enc["encoded"],
                             seconds=round(time.perf_counter() - t0, 3),
                             extra={"scores": scored, "metadata": metadata or {}, "encode_window": enc["window"],
                                    "batch_size": enc["batch_size"], **embed_seconds, **_where()})
    except SlideClipError as exc:
        result = failed_result(slide, str(exc), t0, name=sid)
        result.store, result.n_tiles = store, n_tiles
        result.extra.update({"scores": scored, "metadata": metadata or {}, **embed_seconds, **_where()})
        record_status(out, result)
        log.error(str(exc))
        raise
    except Exception as exc:
        result = failed_result(slide, unexpected_error(slide, exc), t0, name=sid)
        result.store, result.n_tiles = store, n_tiles
        result.extra.update({"scores": scored, "metadata": metadata or {}, **embed_seconds, **_where()})
        record_status(out, result)
        raise
    try:
        record_status(out, result)
    except SlideClipError as exc:  # a full disk after the work is done: the stores hold it
        log.warning(str(exc))
    log.info(f"{result.status}: {result.name} ({result.n_tiles} tile{'' if result.n_tiles == 1 else 's'}, {result.encoded} encoded)")
    return result.to_dict()


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(process_slide(sys.argv[1], sys.argv[2]))
