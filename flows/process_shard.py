"""The shard flow: a share of a cohort's slides through one executor, on one device.

One flow run per shard, in the cohort flow's process or as a run of the ``process-shard``
deployment on a work pool. Inside, the library's executor (:class:`slide_clip.executor.SlideRun`)
loads the model once and pipelines the shard's slides (the next slides are checked, masked and
tiled while one encodes); as each slide's embeddings are written, a ``products`` task scores
it and draws its heatmaps in another thread, so Prefect's bookkeeping stays off the encoder's
path. Every slide gets its status file (``out/status/<slide_id>.json``, written as soon as its
products are done, at the latest when two more slides have encoded) and a row in the shard's
table artifact; a failing slide fails alone. A shard run killed midway is picked up by
the next run of the cohort: finished slides are skipped, interrupted ones resume.
"""

# No `from __future__ import annotations` here: a deployment pickles the flow into a
# subprocess, and string annotations would not resolve there (PipelineConfig would be unknown).
import os
import socket
import threading
import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from slide_clip.config import PipelineConfig, load_config
from slide_clip.errors import SlideClipError
from slide_clip.executor import SlideRun
from slide_clip.manifest import CohortSlide
from slide_clip.products import did_work
from slide_clip.results import SlideResult, failed_result, record_status, unexpected_error
from slide_clip_flows import quiet_user_errors
from slide_clip_tasks.limits import hold_limit
from slide_clip_tasks.products import products_task

#: A worker started for one device (``slide-clip run --devices``) names it here; a shard run
#: without a ``device`` parameter encodes on it.
DEVICE_ENV = "SLIDE_CLIP_DEVICE"


#: A slide's products (scores, summary, heatmaps) may still run while this many later slides
#: encode; then the shard waits for them before the next slide encodes.
PRODUCTS_LAG = 2


def _where() -> dict:
    """Which process ran the slide (a worker's flow-run process reports its worker as parent)."""
    ctx = get_run_context()
    return {"host": socket.gethostname(), "pid": os.getpid(), "parent_pid": os.getppid(),
            "flow_run_id": str(ctx.flow_run.id) if getattr(ctx, "flow_run", None) else None}


class _Progress:
    """The shard's progress artifact (slides finished, %)."""

    def __init__(self, shard: str, total: int):
        self.total, self.done = total, 0
        self.lock = threading.Lock()
        self.id = create_progress_artifact(0.0, key=_key(f"{shard}-progress"),
                                           description=f"{shard}: slides finished (%)")

    def step(self) -> None:
        with self.lock:
            self.done += 1
            update_progress_artifact(self.id, 100.0 * self.done / max(1, self.total))


def _key(text: str) -> str:
    """An artifact key: lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "shard"


@flow(name="process-shard", log_prints=True)
def process_shard(
    slides: list[dict],
    out: str,
    config: PipelineConfig | None = None,
    prompts: list[str] = ["tumour"],  # noqa: B006 - Prefect parameters are copied per run
    heatmaps: bool = True,
    force: bool = False,
    device: str | None = None,
    encoder_limit: str | None = None,
    shard: str = "shard",
) -> list[dict]:
    """Process the slides of one shard into ``out``; returns their status records.

    ``slides`` are :class:`slide_clip.manifest.CohortSlide` fields (``path``, ``name`` (the
    slide id), ``mpp``, ``patient_id``, ``metadata``). ``device`` overrides the config's
    (default: the worker's ``SLIDE_CLIP_DEVICE``, else the config's). ``encoder_limit`` names
    a Prefect global concurrency limit held while the shard runs (one shard per device of a
    machine, whatever number of workers serve the pool).
    """
    quiet_user_errors()
    cfg = config or load_config()
    device = device or os.environ.get(DEVICE_ENV)
    if device:
        cfg = cfg.with_overrides(encode={"device": device})
    log = get_run_logger()
    items = [CohortSlide(**s) for s in slides]
    where = _where()
    progress = _Progress(shard, len(items))
    records: dict[str, dict] = {}
    log.info(f"{shard}: {len(items)} slide{'s' if len(items) != 1 else ''} on {cfg.encode.device}")

    def record(r: SlideResult, item: CohortSlide) -> None:
        r.extra.update({"metadata": item.row_metadata(), **where})
        try:
            record_status(out, r)
        except SlideClipError as exc:  # a full disk after the work is done: the stores hold it
            r.extra["status_not_recorded"] = str(exc)
            log.warning(str(exc))
        records[item.slide_id] = r.to_dict()
        progress.step()
        if r.status == "failed":
            log.error(r.error)
        else:
            log.info(f"{r.status}: {r.name} ({r.n_tiles} tiles, {r.encoded} encoded)")

    with ThreadPoolTaskRunner(max_workers=2) as runner, hold_limit(encoder_limit), \
            SlideRun(cfg, out, overwrite=force) as run:
        pending = []
        by_id = {i.slide_id: i for i in items}
        order = {i.slide_id: k for k, i in enumerate(items)}

        def settle(r: SlideResult, item: CohortSlide, fut, done_sets: dict) -> None:
            """Record a slide whose products task has been submitted, once it has ended."""
            t0 = time.perf_counter() - r.seconds
            try:
                scored = fut.result()
            except SlideClipError as exc:
                r = _failed_after_embedding(r, str(exc), t0, done_sets)
            except Exception as exc:  # noqa: BLE001 - one slide's fault fails that slide only
                r = _failed_after_embedding(r, unexpected_error(r.slide, exc), t0, done_sets)
            else:
                if r.status == "skipped" and did_work(scored):
                    r.status = "ok"
                r.extra["scores"] = scored
                r.seconds = round(time.perf_counter() - t0, 3)
            record(r, item)

        def settle_finished(k: int) -> None:
            """Record the slides whose products are done, and wait for those of slides more than
            :data:`PRODUCTS_LAG` behind slide ``k``: status files come as slides are done, not
            at the shard's end (`run`'s progress reads them), and scoring never falls further
            behind the encoder than that."""
            for entry in list(pending):
                if entry[2].wrapped_future.done() or order[entry[1].slide_id] <= k - PRODUCTS_LAG:
                    pending.remove(entry)
                    settle(*entry)

        def on_result(r: SlideResult) -> None:
            item = by_id[r.name]
            settle_finished(order[r.name])
            if r.status == "failed":
                record(r, item)
                return
            done_sets: dict = {}  # kept in the status of a slide that fails at a later set
            fut = runner.submit(products_task, parameters={
                "store": r.store, "prompts": list(prompts), "config": cfg, "model": run.spec.name,
                "heatmaps": heatmaps, "force": force, "encoders": run.encoders, "on_set": done_sets.__setitem__})
            pending.append((r, item, fut, done_sets))

        try:
            run.run(items, on_result=on_result)
        except SlideClipError as exc:  # the model or the configuration: every slide left fails with it
            log.error(str(exc))
            for item in items:
                if item.slide_id not in records and all(item is not p[1] for p in pending):
                    record(failed_result(item.path, str(exc), time.perf_counter(), name=item.slide_id), item)
        for entry in pending:
            settle(*entry)
    rows = [{"slide": sid, "status": rec["status"], "tiles": rec.get("n_tiles"), "encoded": rec.get("encoded"),
             "detail": rec.get("error") or ", ".join(f"{k}: {v.get('predicted')}"
                                                     for k, v in (rec["extra"].get("scores") or {}).items())}
            for sid, rec in ((i.slide_id, records[i.slide_id]) for i in items)]
    create_table_artifact(rows, key=_key(f"{shard}-slides"), description=f"{shard}: one row per slide")
    return [records[i.slide_id] for i in items]


def _failed_after_embedding(r: SlideResult, message: str, t0: float, scored: dict) -> SlideResult:
    """A slide embedded (its store and tiles known) whose scores or heatmaps failed; the sets
    it finished stay in its status."""
    out = failed_result(r.slide, message, t0, name=r.name)
    out.extra["scores"] = dict(scored)
    out.store, out.n_tiles, out.encoded = r.store, r.n_tiles, r.encoded
    out.extra.update({k: v for k, v in r.extra.items() if k in ("seconds_embed", "encode_window", "batch_size")})
    return out
