"""The ``slide-clip`` command line. Every command mirrors a function of the library.

A user's bad input ends in one line naming the file and what to do, never a traceback
(``--debug`` shows tracebacks of unexpected errors).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from slide_clip.errors import SlideClipError

app = typer.Typer(
    name="slide-clip",
    help="Whole-slide images to CLIP tile embeddings, zero-shot scores and heatmaps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of unexpected errors and library logs.")):
    import logging
    import warnings

    _state["debug"] = debug
    if not debug:  # open_clip and the hub client log warnings that our own errors explain better
        logging.basicConfig(level=logging.CRITICAL)
        logging.getLogger().setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", category=FutureWarning)


def _fail(message: str, code: int = 2):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def info(
    slides: List[Path] = typer.Argument(..., help="Slide files or folders (a DICOM series folder counts as one slide)."),
    mpp: Optional[float] = typer.Option(None, help="Override the resolution, µm per level-0 pixel."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table."),
):
    """Print each slide's metadata: size, levels, resolution, vendor."""
    from slide_clip.slide import find_slides, slide_info

    rows, failed = [], 0
    for s in find_slides(slides):
        try:
            i = slide_info(s, mpp)
        except SlideClipError as e:
            failed += 1
            typer.echo(f"error: {e}", err=True)
            continue
        if as_json:
            typer.echo(json.dumps(i.to_dict()))
        else:
            rows.append([i.name, i.vendor, f"{i.width}x{i.height}", str(i.level_count),
                         ",".join(f"{d:g}" for d in i.level_downsamples),
                         f"{i.mpp_x:.4g}" if i.mpp_x else "-", f"{i.mpp_y:.4g}" if i.mpp_y else "-",
                         i.mpp_source, f"{i.objective_power:g}" if i.objective_power else "-"])
    if rows:
        _table(["slide", "vendor", "size", "levels", "downsamples", "mpp_x", "mpp_y", "mpp_from", "objective"], rows)
    raise typer.Exit(1 if failed else 0)


def _table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header, *rows]:
        typer.echo("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())


@app.command()
def models(
    registry: List[Path] = typer.Option([], "--models", help="Extra model registry YAML files."),
):
    """List the model registry: name, architecture, weights source."""
    from slide_clip.encoders import load_registry

    try:
        reg = load_registry(*registry)
    except SlideClipError as e:
        _fail(str(e))
    _table(["name", "arch", "weights", "description"],
           [[s.name, s.arch, s.weights or "random", s.description] for s in reg.values()])


@app.command()
def embed(
    slides: List[Path] = typer.Argument(..., help="Slide files or folders of slides."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: one <slide>.zarr store per slide."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Pipeline config YAML (default: configs/default.yaml)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Registry name, or random:ARCH for random weights (testing only)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Local weights file for the model (offline use)."),
    registry: List[Path] = typer.Option([], "--models", help="Extra model registry YAML files."),
    mpp: Optional[float] = typer.Option(None, help="Override every slide's resolution, µm per level-0 pixel."),
    mpp_csv: Optional[Path] = typer.Option(None, help="CSV with columns slide,mpp: per-slide resolution overrides."),
    target_mpp: Optional[float] = typer.Option(None, help="Tile resolution, µm/px (default 0.5)."),
    tile_size: Optional[int] = typer.Option(None, help="Tile side in pixels at the target resolution (default 224)."),
    overlap: Optional[float] = typer.Option(None, help="Fraction of a tile shared with its neighbour (default 0)."),
    min_tissue: Optional[float] = typer.Option(None, help="Drop tiles with a smaller tissue fraction (default 0.25)."),
    batch_size: Optional[int] = typer.Option(None, help="Tiles per batch (default 64)."),
    workers: Optional[int] = typer.Option(None, help="DataLoader worker processes reading tiles (default 2)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N or mps (default auto)."),
    precision: Optional[str] = typer.Option(None, help="auto, fp32, fp16 or bf16 (default auto)."),
    pattern: Optional[str] = typer.Option(None, help="Glob for slides inside folders (default: known slide extensions)."),
    overwrite: bool = typer.Option(False, help="Replace stores made with other settings or from another file."),
    progress: bool = typer.Option(True, help="Show a progress bar (tiles/s)."),
):
    """Find tissue, tile at an exact resolution and write CLIP embeddings to one Zarr store per slide.

    Goes on past a bad slide; ends with a status line per slide and exit code 1 if any failed.
    """
    from slide_clip.config import load_config
    from slide_clip.pipeline import embed_slides
    from slide_clip.slide import find_slides, read_mpp_csv

    try:
        cfg = load_config(config).with_overrides(
            tiling={"target_mpp": target_mpp, "tile_size": tile_size, "overlap": overlap, "min_tissue": min_tissue},
            encode={"model": model, "checkpoint": str(checkpoint.resolve()) if checkpoint else None,
                    "registries": tuple(str(r) for r in registry) or None, "batch_size": batch_size,
                    "num_workers": workers, "device": device, "precision": precision},
        )
        mpps = read_mpp_csv(mpp_csv) if mpp_csv else None
        paths = find_slides(slides, pattern)
        if not paths:
            _fail(f"no slides found in {', '.join(map(str, slides))}")

        def report(r):
            line = f"{r.status:8s} {r.name}"
            if r.status == "failed":
                line += f"  {r.error}"
            else:
                line += f"  {r.n_tiles} tiles, {r.encoded} encoded, {r.seconds:.1f} s"
            typer.echo(line, err=True)

        results = embed_slides(paths, out, cfg, mpps=mpps, mpp=mpp, overwrite=overwrite,
                               progress=progress and sys.stderr.isatty(), on_result=report)
    except SlideClipError as e:
        _fail(str(e))
    for r in results:
        if r.status == "failed" and _state["debug"] and "traceback" in r.extra:
            typer.echo(r.extra["traceback"], err=True)
    n_failed = sum(r.status == "failed" for r in results)
    typer.echo(f"{len(results) - n_failed} of {len(results)} slides done, {n_failed} failed; stores in {out}")
    for r in results:
        typer.echo(f"{r.name}\t{r.status}\t{r.n_tiles if r.n_tiles is not None else '-'}\t{r.error or r.store}")
    raise typer.Exit(1 if n_failed else 0)


def main():  # console-script entry point
    try:
        app()
    except SlideClipError as e:  # pragma: no cover - commands catch their own
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
