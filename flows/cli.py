"""The ``slide-clip`` command: the library's commands plus the Prefect ones (run, serve, deploy).

Kept outside ``slide_clip`` so the library never imports Prefect or the flows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from slide_clip.cli import _fail, app
from slide_clip.errors import SlideClipError
from slide_clip_tasks import ENCODER_LIMIT

#: This package's folder (``flows/`` in the repo, ``slide_clip_flows/`` when installed) and its
#: parent: a deployment loads the per-slide flow from there by file path.
FLOWS_DIR = Path(__file__).resolve().parent

# Offline machines: no telemetry from a local Prefect server.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _flow_config(config, model, registry, checkpoint, device, workers, batch_size):
    from slide_clip.config import load_config

    return load_config(config).with_overrides(
        encode={"model": model, "registries": tuple(str(r) for r in registry) or None,
                "checkpoint": str(checkpoint.resolve()) if checkpoint else None, "device": device,
                "num_workers": workers, "batch_size": batch_size})


_SLIDES = typer.Argument(..., help="Slide files, folders of slides, or CSV manifests (path, mpp, patient_id, ...).")
_OUT = typer.Option(..., "--out", "-o", help="Output folder: stores, heatmaps, summaries, cohort tables.")
_CFG = typer.Option(None, "--config", "-c", help="Pipeline config YAML (default: configs/default.yaml).")
_MODEL = typer.Option(None, "--model", "-m", help="Registry name of the encoder.")
_REG = typer.Option([], "--models", help="Extra model registry YAML files.")
_CKPT = typer.Option(None, help="Local weights file for the model.")
_PROMPTS = typer.Option(["tumour"], "--prompts", "-p", help="Prompt sets to score (repeatable).")


@app.command()
def run(
    slides: List[str] = _SLIDES,
    out: Path = _OUT,
    pattern: Optional[str] = typer.Option(None, help="Glob for slides inside folders."),
    config: Optional[Path] = _CFG,
    model: Optional[str] = _MODEL,
    registry: List[Path] = _REG,
    checkpoint: Optional[Path] = _CKPT,
    prompts: List[str] = _PROMPTS,
    no_heatmaps: bool = typer.Option(False, "--no-heatmaps", help="Skip the heatmap pictures."),
    force: bool = typer.Option(False, help="Redo every stage, even for finished slides."),
    concurrency: int = typer.Option(2, help="Slides processed at the same time."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N or mps."),
    workers: Optional[str] = typer.Option(None, help="DataLoader worker processes per slide: a number, or auto."),
    batch_size: Optional[int] = typer.Option(None, help="Tiles per batch."),
    deployment: Optional[str] = typer.Option(None, help="Hand each slide to this per-slide deployment (scale-out)."),
    encoder_limit: Optional[str] = typer.Option(None, help="Prefect global concurrency limit held while encoding."),
    clusters: Optional[int] = typer.Option(None, "--clusters", help="Then cluster the cohort's tiles into K "
                                           "clusters (as `slide-clip cluster --k K`)."),
):
    """Run the whole pipeline on a cohort as a Prefect flow (no server needed: a temporary one starts).

    Finished slides are skipped; changed prompts only re-score. Exit code 1 if any slide failed.
    """
    try:
        cfg = _flow_config(config, model, registry, checkpoint, device, workers, batch_size)
    except SlideClipError as e:
        _fail(str(e))
    from slide_clip_flows.process_cohort import process_cohort

    state = process_cohort(slides=[str(s) for s in slides], out=str(out), pattern=pattern, config=cfg,
                           prompts=list(prompts), heatmaps=not no_heatmaps, force=force,
                           max_concurrency=concurrency, deployment=deployment, encoder_limit=encoder_limit,
                           clusters=clusters, return_state=True)
    if not state.is_completed():
        _fail(state.message or "the cohort flow failed")
    result = state.result()
    for r in result["slides"]:
        tail = r.get("error") if r.get("status") in ("failed", "waiting") else f"{r.get('n_tiles')} tiles"
        typer.echo(f"{r.get('status', '?'):8s} {r['slide_id']}  {tail}")
    for name, t in result["tables"].items():
        typer.echo(f"summary {name}: {t['csv']}")
    raise typer.Exit(1 if result["failed"] else 0)


@app.command()
def serve(
    watch: Path = typer.Option(..., help="Folder to watch: each scheduled run processes slides added to it."),
    out: Path = _OUT,
    cron: Optional[str] = typer.Option(None, help='Cron schedule, e.g. "0 2 * * *" for 02:00 nightly.'),
    interval: Optional[float] = typer.Option(None, help="Or: seconds between runs."),
    name: str = typer.Option("watch", help="Deployment name (flow process-cohort)."),
    pattern: Optional[str] = typer.Option(None, help="Glob for slides inside the folder."),
    config: Optional[Path] = _CFG,
    model: Optional[str] = _MODEL,
    registry: List[Path] = _REG,
    checkpoint: Optional[Path] = _CKPT,
    prompts: List[str] = _PROMPTS,
    concurrency: int = typer.Option(2, help="Slides processed at the same time."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N or mps."),
    workers: Optional[str] = typer.Option(None, help="DataLoader worker processes per slide: a number, or auto."),
    deployment: Optional[str] = typer.Option(None, help="Hand each slide to this per-slide deployment "
                                             "(process-slide/NAME from `slide-clip deploy`) instead of "
                                             "processing it here."),
    settle: float = typer.Option(60.0, help="Seconds a slide's files must be unchanged before it is processed "
                                 "(a slide still being copied in waits for the next run)."),
):
    """Serve the cohort flow on a schedule against a Prefect server (PREFECT_API_URL).

    Each run processes the watched folder; finished slides are skipped, so a run only does
    the slides added since the last one. With --deployment, the slides go to the workers
    of that deployment's work pool. Runs until stopped (Ctrl-C).
    """
    if (cron is None) == (interval is None):
        _fail("give exactly one of --cron or --interval")
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            _fail("serve needs a Prefect server: start one with `prefect server start` and set "
                  "PREFECT_API_URL=http://127.0.0.1:4200/api")
    try:
        cfg = _flow_config(config, model, registry, checkpoint, device, workers, None)
    except SlideClipError as e:
        _fail(str(e))
    from slide_clip_flows.process_cohort import process_cohort

    params = {"slides": [str(watch.resolve())], "out": str(out.resolve()), "pattern": pattern,
              "config": cfg.model_dump(mode="json"), "prompts": list(prompts), "max_concurrency": concurrency,
              "deployment": deployment, "settle_seconds": settle}
    kwargs = {"cron": cron} if cron else {"interval": interval}
    # limit=1: a run still going when the next is due makes that one wait, so two runs never
    # race for the same new slide.
    process_cohort.serve(name=name, parameters=params, limit=1, **kwargs)


@app.command()
def deploy(
    pool: str = typer.Option(..., help="Work pool (type process) whose workers run the per-slide flow."),
    name: str = typer.Option("process-slide", help="Deployment name."),
    encoder_limit: str = typer.Option(ENCODER_LIMIT, help="Global concurrency limit held while encoding, "
                                      "created with 1 slot on first use ({host}: the worker's machine; {gpu}: "
                                      "its CUDA_VISIBLE_DEVICES, for one worker per GPU)."),
):
    """Register the per-slide flow as a deployment of a work pool, for workers on several machines.

    Start workers with `prefect worker start --pool POOL` (one per GPU machine, each with the
    project installed at the same path), then hand a cohort to them with
    `slide-clip run ... --deployment process-slide/NAME`.
    """
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    from slide_clip_flows.process_slide import process_slide

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    flow = process_slide.from_source(source=str(FLOWS_DIR.parent),
                                      entrypoint=f"{FLOWS_DIR.name}/process_slide.py:process_slide")
    dep_id = flow.deploy(name=name, work_pool_name=pool, parameters={"encoder_limit": encoder_limit},
                         build=False, push=False, print_next_steps=False)
    typer.echo(f"deployment process-slide/{name} ({dep_id}) on work pool {pool}")


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
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder to check for writing."),
    device: str = typer.Option("auto", help="Device to check: auto, cpu, cuda, cuda:N or mps."),
    registry: List[Path] = _REG,
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
