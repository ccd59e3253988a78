"""The ``slide-clip`` command: the library's commands plus the Prefect ones (run, serve, deploy).

Kept outside ``slide_clip`` so the library never imports Prefect or the flows.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from slide_clip.cli import _fail, app
from slide_clip import cli_options as o
from slide_clip.errors import ConfigError, SlideClipError
from slide_clip.storage.urls import absolute
from slide_clip_tasks import ENCODER_LIMIT

def _flow_config(config, model, registry, checkpoint, device, workers, batch_size, tiling=None, precision=None):
    from slide_clip.config import load_config

    from slide_clip.cli import _with_storage_options

    return _with_storage_options(load_config(config)).with_overrides(
        tiling=tiling or {},
        encode={"model": model, "registries": tuple(str(r) for r in registry) or None,
                "checkpoint": str(checkpoint.resolve()) if checkpoint else None, "device": device,
                "num_workers": workers, "batch_size": batch_size, "precision": precision})


def _require_server(command: str) -> None:
    """``serve`` and ``deploy`` need a lasting server: refuse, in one line, without one."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        _fail(f"{command} needs a running Prefect server (a deployment on a temporary server is lost when "
              "the command ends): start one with `prefect server start` and set "
              "PREFECT_API_URL=http://127.0.0.1:4200/api")


@app.command()
def run(
    slides: o.Cohort,
    out: o.CohortOut,
    pattern: o.Pattern = None,
    config: o.Config = None,
    model: o.Model = None,
    registry: o.Registry = [],
    checkpoint: o.Checkpoint = None,
    prompts: o.Prompts = ["tumour"],
    mpp: o.Mpp = None,
    mpp_csv: o.MppCsv = None,
    target_mpp: o.TargetMpp = None,
    tile_size: o.TileSize = None,
    overlap: o.Overlap = None,
    min_tissue: o.MinTissue = None,
    no_heatmaps: bool = typer.Option(False, "--no-heatmaps", help="Skip the heatmap pictures."),
    overwrite: o.Redo = False,
    force: o.ForceAlias = False,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show Prefect's own log lines (they are "
                                 "always in the Prefect UI)."),
    concurrency: o.Concurrency = 2,
    device: o.Device = None,
    devices: Optional[str] = typer.Option(None, help="Every device of this machine, one executor each over a "
                                          "shared queue of shards: cuda:0,cuda:1 or all (cpu,cpu tries it on "
                                          "a CPU)."),
    shard_slides: Optional[int] = typer.Option(None, help="Slides per shard (a shard is one flow run: one model "
                                               "load, its slides pipelined; default: the whole cohort here, "
                                               "16 with --deployment or --devices)."),
    shard_tiles: Optional[int] = typer.Option(None, help="Or: about this many tiles per shard (estimated from "
                                              "the slides' sizes, or their grids once tiled)."),
    precision: o.Precision = None,
    workers: o.Workers = None,
    batch_size: o.BatchSize = None,
    deployment: o.Deployment = None,
    encoder_limit: Optional[str] = typer.Option(None, help="Prefect global concurrency limit a shard holds "
                                                "while it runs ({host}: the machine's name)."),
    clinical: Annotated[Optional[o.UrlOrPath], typer.Option(
        "--clinical", metavar="PATH|URL", help="Clinical table (patient_id, time, event), a path or a URL: then "
                                                 "also run the survival baselines (see `slide-clip survival`).")] = None,
    time: o.TimeColumn = None,
    event: o.EventColumn = None,
    clusters: Optional[int] = typer.Option(None, "--clusters", help="Then cluster the cohort's tiles into K "
                                           "clusters (as `slide-clip cluster --k K`)."),
):
    """Run the whole pipeline on a cohort as a Prefect flow (no server needed: a temporary one starts).

    Finished slides are skipped; changed prompts only re-score. Exit code 1 if any slide failed.
    The last lines say where the stores, heatmaps and cohort tables are.
    """
    from slide_clip_flows.progress import quiet_prefect_console

    quiet_prefect_console(verbose)  # before Prefect is imported: it reads its logging settings once
    from slide_clip.mpp_overrides import check_mpp_value, read_mpp_csv
    from slide_clip.prompts import load_prompts

    if clinical is not None and not (time and event):
        _fail("--clinical needs --time and --event (the follow-up time and event columns)")
    if devices and deployment:
        _fail("give --devices (this machine's devices) or --deployment (a work pool's workers), not both")
    if devices and device:
        _fail("give --devices (one executor per device) or --device (one executor), not both")
    for flag, v in (("--shard-slides", shard_slides), ("--shard-tiles", shard_tiles)):
        if v is not None and v < 1:
            _fail(f"{flag} {v}: give 1 or more")
    if shard_slides is not None and shard_tiles is not None:
        _fail("give --shard-slides or --shard-tiles, not both")
    survival = {"clinical": absolute(clinical), "time": time, "event": event} if clinical else None
    try:
        tiling = {"target_mpp": target_mpp, "tile_size": tile_size, "overlap": overlap, "min_tissue": min_tissue}
        cfg = _flow_config(config, model, registry, checkpoint, device, workers, batch_size, tiling, precision)
        for p in prompts:  # a bad prompt set fails now, not after every slide is embedded
            load_prompts(p)
        check_mpp_value(mpp)
        from slide_clip.manifest import cohort_scan
        from slide_clip.output import ensure_out_dir
        from slide_clip.stages import resampling_note
        from slide_clip.scan import SKIPPED_FILE, skipped_line
        from slide_clip.storage.filesystems import upath

        # no slide at all, an --mpp-csv row naming no slide: one line now, before a server starts
        cohort, skipped = cohort_scan(slides, pattern, out)
        if mpp_csv:
            read_mpp_csv(mpp_csv).match([(c.path, c.slide_id) for c in cohort])
        ensure_out_dir(out)
        skipped_text = skipped_line(skipped, upath(out) / SKIPPED_FILE)

        note = resampling_note(cfg)  # the same check `embed` makes, said once
        from slide_clip.encoders import resolve_model
        from slide_clip.encoders.hub import check_hub

        e = cfg.encode  # weights on an unreachable hub: said now, before a server starts
        check_hub(resolve_model(e.model, tuple(e.registries), e.checkpoint))
        device_list = None
        if devices:
            from slide_clip_flows.devices import parse_devices

            device_list = parse_devices(devices)
    except SlideClipError as e:
        _fail(str(e))
    if note:
        typer.echo(note, err=True)
    if skipped_text:  # a cohort never shrinks without a word (the flow writes the full list)
        typer.echo(skipped_text, err=True)
    from slide_clip.text import plural
    from slide_clip_flows.progress import RunProgress
    from slide_clip_flows.temporary_server import temporary_server

    where = f"on {', '.join(device_list)}" if device_list else f"on {deployment}" if deployment else \
        f"on {cfg.encode.device}"
    typer.echo(f"{plural(len(cohort), 'slide')}, model {cfg.encode.model} {where}", err=True)

    try:
        with temporary_server(echo=lambda line: typer.echo(line, err=True)), contextlib.ExitStack() as stack:
            from slide_clip_flows.process_cohort import process_cohort

            if device_list:  # one worker per device, each its own executor, over the pool's queue
                from slide_clip_flows.devices import device_workers

                deployment = stack.enter_context(device_workers(
                    device_list, echo=lambda line: typer.echo(line, err=True)))
                concurrency = len(device_list)
            stack.enter_context(RunProgress(out, [c.slide_id for c in cohort], cfg.encode.model,
                                            echo=lambda line: typer.echo(line, err=True)))
            state = process_cohort(slides=[str(s) for s in slides], out=str(out), pattern=pattern, config=cfg,
                                   prompts=list(prompts), heatmaps=not no_heatmaps, force=overwrite,
                                   max_concurrency=concurrency, deployment=deployment, encoder_limit=encoder_limit,
                                   shard_slides=shard_slides, shard_tiles=shard_tiles,
                                   mpp=mpp, mpp_csv=str(mpp_csv.resolve()) if mpp_csv else None,
                                   survival=survival, clusters=clusters,
                                   return_state=True)
            if not state.is_completed():
                _fail(state.message or "the cohort flow failed")
            result = state.result()
    except SlideClipError as e:
        _fail(str(e))
    _report_run(result, upath(out))
    raise typer.Exit(1 if result["failed"] else 0)


def _report_run(result: dict, out: Path) -> None:
    """A line per slide, then where the stores, heatmaps and cohort tables went."""
    from slide_clip.store import model_key

    heatmap_dirs = set()
    for r in result["slides"]:
        tail = r.get("error") if r.get("status") in ("failed", "waiting") else f"{r.get('n_tiles')} tile{'' if r.get('n_tiles') == 1 else 's'}"
        typer.echo(f"{r.get('status', '?'):8s} {r['slide_id']}  {tail}")
        for name, s in ((r.get("extra") or {}).get("scores") or {}).items():
            d = out / "heatmaps" / model_key(s.get("model") or "") / model_key(name)
            if s.get("model") and d.is_dir():  # drawn now or by an earlier run
                heatmap_dirs.add(str(d))
    n_failed = result["failed"]
    typer.echo(f"{len(result['slides']) - n_failed} of {len(result['slides'])} slide{'' if len(result['slides']) == 1 else 's'} done, {n_failed} failed")
    if result.get("skipped_files"):
        typer.echo(f"skipped {len(result['skipped_files'])} files or folders that are not slides (listed with "
                   f"the reasons in {result.get('skipped_list')})")
    stores = [r for r in result["slides"] if r.get("store")]
    if len(stores) <= 3:
        for r in stores:
            typer.echo(f"store: {out / Path(r['store']).name} (QC picture {out / (r['slide_id'] + '_qc.png')})")
    else:
        typer.echo(f"stores: {len(stores)} in {out}/, e.g. {out / Path(stores[0]['store']).name} (QC pictures "
                   f"beside them, e.g. {out / (stores[0]['slide_id'] + '_qc.png')})")
    for d in sorted(heatmap_dirs):
        typer.echo(f"heatmaps: {d}")
    for t in result["tables"].values():
        typer.echo(f"cohort table: {t['csv']} (and .parquet)")
    c = result.get("clusters")
    if c:
        typer.echo(f"clusters (k={c['k']}): {c.get('table') or 'not made: ' + c.get('error', '?')}")
    from slide_clip.survival.report import headline_text

    for name, r in (result.get("survival") or {}).items():
        typer.echo(f"survival {name}: Harrell's C {headline_text(r['headline'], 'harrell')} (mean ± SD over folds), "
                   f"{r['report']}")
        if r.get("warning"):
            typer.echo(f"survival {name}: warning: {r['warning']}")


@app.command()
def serve(
    watch: Annotated[o.UrlOrPath, typer.Option(
        "--watch", metavar="PATH|URL", help="Folder to watch (a path or a URL): each scheduled run processes "
                                              "slides added to it.")],
    out: o.CohortOut,
    cron: Optional[str] = typer.Option(None, help='Cron schedule, e.g. "0 2 * * *" for 02:00 nightly.'),
    interval: Optional[float] = typer.Option(None, help="Or: seconds between runs."),
    name: str = typer.Option("watch", help="Deployment name (flow process-cohort)."),
    pattern: o.Pattern = None,
    config: o.Config = None,
    model: o.Model = None,
    registry: o.Registry = [],
    checkpoint: o.Checkpoint = None,
    prompts: o.Prompts = ["tumour"],
    concurrency: o.Concurrency = 2,
    device: o.Device = None,
    workers: o.Workers = None,
    shard_slides: Optional[int] = typer.Option(None, help="Slides per shard (default: every new slide in one "
                                               "shard here, 16 with --deployment)."),
    deployment: o.Deployment = None,
    settle: float = typer.Option(60.0, help="Seconds a slide's files must be unchanged before it is processed "
                                 "(a slide still being copied in waits for the next run)."),
):
    """Serve the cohort flow on a schedule against a Prefect server (PREFECT_API_URL).

    Each run processes the watched folder; finished slides are skipped, so a run only does
    the slides added since the last one. With --deployment, the new slides go, in shards, to
    the workers of that deployment's work pool. Runs until stopped (Ctrl-C).
    """
    if (cron is None) == (interval is None):
        _fail("give exactly one of --cron or --interval")
    _require_server("serve")
    try:
        cfg = _flow_config(config, model, registry, checkpoint, device, workers, None)
    except SlideClipError as e:
        _fail(str(e))
    from slide_clip_flows.process_cohort import process_cohort

    params = {"slides": [absolute(watch)], "out": absolute(out), "pattern": pattern,
              "config": cfg.model_dump(mode="json"), "prompts": list(prompts), "max_concurrency": concurrency,
              "deployment": deployment, "shard_slides": shard_slides, "settle_seconds": settle,
              "allow_empty": True}
    kwargs = {"cron": cron} if cron else {"interval": interval}
    # limit=1: a run still going when the next is due makes that one wait, so two runs never
    # race for the same new slide.
    process_cohort.serve(name=name, parameters=params, limit=1, **kwargs)


@app.command()
def deploy(
    pool: str = typer.Option(..., help="Work pool whose workers run the shard flow (created if missing)."),
    name: str = typer.Option("process-shard", help="Deployment name (flow process-shard)."),
    pool_type: str = typer.Option("process", help="Type of a pool created here: process (workers on GPU "
                                  "machines), kubernetes (a GPU job per shard run) or docker (a GPU container)."),
    gpus: int = typer.Option(1, help="GPUs a kubernetes or docker shard run asks for (nvidia.com/gpu)."),
    image: Optional[str] = typer.Option(None, help="Container image with slide-clip installed (kubernetes, docker)."),
    encoder_limit: str = typer.Option(ENCODER_LIMIT, help="Global concurrency limit a shard run holds, "
                                      "created with 1 slot on first use ({host}: the worker's machine; {gpu}: "
                                      "its CUDA_VISIBLE_DEVICES, for one worker per GPU)."),
):
    """Register the shard flow as a deployment of a work pool, for workers on several machines.

    A process pool: start one worker per GPU machine (`prefect worker start --pool POOL`, with
    slide-clip installed), then hand a cohort to them with
    `slide-clip run ... --deployment process-shard/NAME`: each worker runs whole shards, the
    model loaded once per shard. A kubernetes or docker pool (pip install 'slide-clip[kubernetes]'
    or '[docker]') starts a GPU job or container per shard run from --image.
    """
    _require_server("deploy")
    try:
        from slide_clip_flows.deployments import POOL_TYPES, ensure_pool, register_shard_deployment

        if pool_type not in POOL_TYPES:
            raise ConfigError(f"--pool-type {pool_type!r}: choose from {', '.join(POOL_TYPES)}")
        created = ensure_pool(pool, pool_type, gpus=gpus, image=image)
        dep = register_shard_deployment(pool, name=name, encoder_limit=encoder_limit, image=image)
    except SlideClipError as e:
        _fail(str(e))
    typer.echo(f"deployment {dep} on {'new ' if created else ''}{pool_type} work pool {pool}")


def _prefect_check():
    from slide_clip.doctor import FAIL, OK, Check

    import prefect
    from prefect.settings import PREFECT_API_URL

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if not url:
        return Check(OK, "prefect", f"prefect {prefect.__version__}; no PREFECT_API_URL: `run` starts a "
                                    "temporary server, `serve` and `deploy` need `prefect server start`")
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=5) as r:
            healthy = r.status == 200
    except OSError as e:
        return Check(FAIL, "prefect", f"server {url} does not answer ({e}): start it with `prefect server start`")
    return Check(OK if healthy else FAIL, "prefect", f"prefect {prefect.__version__}; server {url} "
                                                     + ("answers" if healthy else "is unhealthy"))


@app.command()
def doctor(
    out: Annotated[Optional[o.OutPath], typer.Option("--out", "-o", help="Output folder to check for writing.")] = None,
    device: Annotated[str, typer.Option("--device", help="Device to check: auto, cpu, cuda, cuda:N or mps.")] = "auto",
    registry: o.Registry = [],
):
    """Check the installation: OpenSlide, the device, model weights, Zarr, Prefect.

    Exit code 1 if a check fails; warnings (no GPU, weights not downloaded yet) do not fail.
    """
    from slide_clip.doctor import FAIL, run_checks

    checks = run_checks(out, device, tuple(str(r) for r in registry))
    checks.append(_prefect_check())
    width = max(len(c.name) for c in checks)
    for c in checks:
        typer.echo(f"{c.status:4s}  {c.name.ljust(width)}  {c.detail}")
    raise typer.Exit(1 if any(c.status == FAIL for c in checks) else 0)


def main():  # console-script entry point
    from slide_clip.cli import main as library_main

    library_main()


if __name__ == "__main__":
    main()
