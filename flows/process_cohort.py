"""The cohort flow: a cohort cut into shards, one flow run per shard, a summary table and reports.

Input is any mix of slide files, folders (with a glob ``pattern``) and CSV manifests
(``path`` plus optional ``mpp``, ``patient_id`` and metadata columns, carried into the
summary). The cohort is cut into shards (:mod:`slide_clip.shards`); each shard runs the shard
flow (:mod:`slide_clip_flows.process_shard`): in this process, one shard after another on this
machine's device, or, with ``deployment``, as runs of the shard deployment picked up by the
workers of its work pool (one executor per worker and device). A failing slide never stops the
others; it is reported with its error.
"""

# No `from __future__ import annotations` here: a served deployment pickles the flow into a
# subprocess, and string annotations would not resolve there (PipelineConfig would be unknown).
import dataclasses
import threading
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.artifacts import update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from slide_clip.config import PipelineConfig, load_config
from slide_clip.errors import SlideClipError, shown_path
from slide_clip.manifest import CohortSlide, cohort_scan, record_patients, split_settled
from slide_clip.results import read_status
from slide_clip.scan import record_skipped
from slide_clip.shards import Shard, estimated_tiles, make_shards
from slide_clip.stages import target_mpp_for, tile_size_for
from slide_clip.text import plural
from slide_clip_flows import quiet_user_errors
from slide_clip_flows.process_shard import process_shard
from slide_clip_tasks.summary import summary_task

#: Slides per shard when shards go to a work pool and no size is given.
DEFAULT_SHARD_SLIDES = 16


class _Progress:
    """The cohort's progress artifact (slides finished, %), updated as shards end."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.lock = threading.Lock()
        self.id = create_progress_artifact(0.0, key="cohort-progress", description="slides finished (%)")

    def step(self, n: int):
        with self.lock:
            self.done += n
            update_progress_artifact(self.id, 100.0 * self.done / max(1, self.total))


@task(name="run-shard", cache_policy=NO_CACHE)
def run_shard_deployment(deployment: str, shard: dict, parameters: dict, out: str) -> list[dict]:
    """One shard as a run of the shard deployment (any worker of its pool takes it); never raises.

    Each slide's result is its status file, written by that flow run; a slide the run did
    not reach (the run crashed, was cancelled, or its worker was lost) is ``failed`` with the
    run's end, and is picked up by the next run of the cohort.
    """
    from prefect.deployments import run_deployment

    fr = run_deployment(deployment, parameters=parameters, timeout=None, poll_interval=1,
                        flow_run_name=f"{Path(out).name}-{shard['name']}")
    state = fr.state.name if fr.state else "without a state"
    results = []
    for item in shard["slides"]:
        st = read_status(out, item["name"]) or {}
        if (st.get("extra") or {}).get("flow_run_id") == str(fr.id):
            results.append(st)
        else:
            results.append({"name": item["name"], "slide": item["path"], "status": "failed",
                            "error": f"{shown_path(item['path'])}: not processed: shard run {fr.name} "
                                     f"({shard['name']}) ended {state}; run the cohort again to pick it up"})
    return results


@flow(name="process-cohort", log_prints=True)
def process_cohort(
    slides: list[str],
    out: str,
    pattern: str | None = None,
    config: PipelineConfig | None = None,
    prompts: list[str] = ["tumour"],  # noqa: B006
    heatmaps: bool = True,
    force: bool = False,
    max_concurrency: int = 2,
    deployment: str | None = None,
    encoder_limit: str | None = None,
    shard_slides: int | None = None,
    shard_tiles: int | None = None,
    settle_seconds: float = 0.0,
    mpp: float | None = None,
    mpp_csv: str | None = None,
    allow_empty: bool = False,
    survival: dict | None = None,
    clusters: int | None = None,
) -> dict:
    """Process a cohort into ``out``; returns per-slide statuses and the summary tables' paths.

    Shards hold ``shard_slides`` slides, or about ``shard_tiles`` estimated tiles; by default
    the whole cohort is one shard in this process, and shards of
    :data:`DEFAULT_SHARD_SLIDES` slides go to a ``deployment`` (``process-shard/NAME``), at most
    ``max_concurrency`` shard runs at a time. ``encoder_limit`` names a Prefect global
    concurrency limit held by a shard while it runs (``"{host}"``: the machine's name,
    ``"{gpu}"``: its CUDA_VISIBLE_DEVICES), e.g. ``slide-clip-encoder-{host}``; with
    ``deployment`` and no ``encoder_limit``, the deployment's own limit holds.
    Slides whose files changed in the last ``settle_seconds`` are still being copied in: they
    are reported as ``waiting`` and left for a later run. No slide at all is an error
    unless ``allow_empty`` (a watched folder).
    ``mpp`` overrides every slide's resolution (µm per level-0 pixel); ``mpp_csv`` names a CSV
    of ``slide,mpp`` overrides, which win over a manifest's ``mpp`` column.
    ``survival`` (``{"clinical", "time", "event"}`` and other parameters of
    :func:`~slide_clip_flows.process_survival.process_survival`) runs the survival baselines
    on ``out`` once the slides are done.
    With ``clusters`` (k), the cohort's tiles are then clustered (see flows/explore_cohort.py).
    """
    quiet_user_errors()
    cfg = config or load_config()
    log = get_run_logger()
    try:
        cohort, skipped = cohort_scan(slides, pattern, out, allow_empty=allow_empty or settle_seconds > 0)
        cohort = _with_mpp(cohort, mpp, mpp_csv)
        Path(out).mkdir(parents=True, exist_ok=True)
    except SlideClipError as exc:
        log.error(str(exc))
        raise
    line, skipped_file = record_skipped(out, skipped)  # and out/skipped-files.csv: every one, with its reason
    if line:  # a cohort never shrinks without a word
        log.warning(line)
    cohort, waiting = split_settled(cohort, settle_seconds)
    for c in waiting:
        log.info(f"{c.path}: changed in the last {settle_seconds:g} s (still being copied?); left for the next run")
    record_patients(out, cohort)  # out/patients.csv: slides -> patients, for the survival models
    shards = _shards(cohort, out, cfg, shard_slides, shard_tiles, deployment)
    where = f"on the workers of {deployment}, at most {max_concurrency} shards at a time" if deployment \
        else "in this process"
    log.info(f"{plural(len(cohort), 'slide')} in {plural(len(shards), 'shard')}, {where} -> {out}")
    progress = _Progress(len(cohort))
    results: list[dict] = []
    base = {"out": out, "config": cfg, "prompts": list(prompts), "heatmaps": heatmaps, "force": force,
            "encoder_limit": encoder_limit}
    if deployment:
        params = {**base, "config": cfg.model_dump(mode="json")}
        if encoder_limit is None:  # keep the deployment's own limit (set by `slide-clip deploy`)
            del params["encoder_limit"]
        with ThreadPoolTaskRunner(max_workers=max(1, max_concurrency)) as runner:
            futures = [runner.submit(run_shard_deployment, parameters={
                "deployment": deployment, "shard": {"name": s.name, "slides": s.parameters()},
                "parameters": {**params, "slides": s.parameters(), "shard": s.name}, "out": out}) for s in shards]
            for f in futures:
                got = f.result()
                results += got
                progress.step(len(got))
    else:
        for s in shards:
            state = process_shard(slides=s.parameters(), shard=s.name, **base, return_state=True)
            got = _shard_results(state, s)
            results += got
            progress.step(len(got))
    for r in results:
        r["slide_id"] = r.get("name")
    results += [{"slide_id": c.slide_id, "name": c.slide_id, "slide": c.path, "status": "waiting",
                 "error": f"changed in the last {settle_seconds:g} s; left for the next run"} for c in waiting]
    ids = [c.slide_id for c in cohort]
    metadata = {c.slide_id: c.row_metadata() for c in cohort}
    # one table per score set of this run's model (an output folder may hold other models' sets)
    score_sets = sorted({(name, s.get("model")) for r in results
                         for name, s in ((r.get("extra") or {}).get("scores") or {}).items()})
    tables = {name: summary_task(out, name, model, metadata, ids) for name, model in score_sets}
    skipped_rows = [{"path": shown_path(s.path) + ("/" if s.folder else ""),
                     "reason": s.reason if s.label is None else f"{s.label} {s.reason}"} for s in skipped]
    _report(results, tables, out, skipped_rows)
    n_failed = sum(r.get("status") == "failed" for r in results)
    result = {"slides": results, "shards": len(shards),
              "tables": {k: {"csv": v["csv"], "parquet": v["parquet"]} for k, v in tables.items()},
              "failed": n_failed, "skipped_files": skipped_rows,
              "skipped_list": str(skipped_file) if skipped_file else None}
    if clusters:
        from slide_clip_tasks.explore import cluster_task

        try:
            explored = cluster_task(out, clusters)
            result["clusters"] = {"k": clusters, "table": str(explored["table"])}
            log.info(f"clusters (k={clusters}): {explored['table']}")
        except SlideClipError as exc:  # e.g. no slide finished: the slides' results stand
            result["clusters"] = {"k": clusters, "error": str(exc)}
            log.error(f"clusters (k={clusters}) not made: {exc}")
    log.info(f"{len(results) - n_failed} of {plural(len(results), 'slide')} done, {n_failed} failed")
    if survival:
        from slide_clip_flows.process_survival import process_survival

        result["survival"] = process_survival(out=out, **survival)
    return result


def _shards(cohort: list[CohortSlide], out: str, cfg: PipelineConfig, slides: int | None, tiles: int | None,
            deployment: str | None) -> list[Shard]:
    if slides is None and tiles is None and deployment:
        slides = DEFAULT_SHARD_SLIDES
    if tiles is None:
        return make_shards(cohort, slides=slides)
    size, mpp = tile_size_for(cfg), target_mpp_for(cfg)
    return make_shards(cohort, tiles=tiles, estimate=lambda c: estimated_tiles(c, out, size, mpp))


def _shard_results(state, shard: Shard) -> list[dict]:
    """The shard flow's per-slide records; every slide of a shard run that failed as a whole
    (a bug, a lost server) is ``failed`` with that error."""
    if state.is_completed():
        return state.result()
    try:
        state.result()
        error = f"shard run ended {state.name}"
    except Exception as exc:  # noqa: BLE001 - the shard's own error, for each of its slides
        error = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return [{"name": c.slide_id, "slide": c.path, "status": "failed",
             "error": f"{shown_path(c.path)}: not processed ({shard.name}: {error}); run the cohort again"}
            for c in shard.slides]


def _with_mpp(cohort: list[CohortSlide], mpp: float | None, mpp_csv: str | None) -> list[CohortSlide]:
    """Apply ``--mpp`` (every slide) or ``--mpp-csv`` (per slide) over the manifest's own mpp.

    Checked before any slide runs: a bad value, a CSV row matching no slide or several, or
    two rows giving one slide different values stop the run (:mod:`slide_clip.mpp_overrides`).
    """
    from slide_clip.mpp_overrides import check_mpp_value, read_mpp_csv

    mpp = check_mpp_value(mpp)
    table = read_mpp_csv(mpp_csv).match([(c.path, c.slide_id) for c in cohort]) if mpp_csv else {}
    if mpp is not None:
        return [dataclasses.replace(c, mpp=mpp) for c in cohort]
    return [dataclasses.replace(c, mpp=table.get(c.path, c.mpp)) for c in cohort]


def _report(results: list[dict], tables: dict, out: str, skipped: list[dict] = ()) -> None:
    """A table artifact per score set and a markdown artifact of per-slide status and heatmaps
    (and of the files and folders the scan skipped, with the reasons)."""
    for name, t in tables.items():
        create_table_artifact(t["rows"], key=f"cohort-summary-{name.replace('_', '-').lower()}",
                              description=f"Cohort summary ({name}): one row per slide. {t['csv']}")
    lines = [f"# Cohort: {len(results)} slides -> `{out}`", "", "| slide | status | tiles | detail |",
             "|---|---|---|---|"]
    for r in results:
        extra = r.get("extra") or {}
        if r.get("status") in ("failed", "waiting"):
            detail = r.get("error") or ""
        else:
            parts = []
            for name, s in extra.get("scores", {}).items():
                maps = ", ".join(f"`{p}`" for p in s.get("heatmaps", []) if p.endswith(".png"))
                parts.append(f"{name}: **{s.get('predicted')}** {maps}")
            detail = "<br>".join(parts)
        lines.append(f"| {r.get('slide_id')} | {r.get('status')} | {r.get('n_tiles', '')} | {detail} |")
    if skipped:
        lines += ["", f"## Skipped: {len(skipped)} files or folders that are not slides", "",
                  "| path | reason |", "|---|---|"] + [f"| `{s['path']}` | {s['reason']} |" for s in skipped]
    create_markdown_artifact("\n".join(lines), key="cohort-report", description="Per-slide status and heatmaps")
