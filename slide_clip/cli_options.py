"""The options and arguments the ``slide-clip`` commands share, declared once (typer's ``Annotated`` style).

A command names its parameter with one of these types, e.g. ``out: Out`` or ``model: Model = None``;
the flag, short flag, metavar and help come from here, so ``embed``, ``run``, ``serve`` and the
scoring and downstream commands spell the same thing the same way. Where one flag means a different
thing to different commands (``--model``: the encoder to embed with, or the model a store holds),
there are two aliases, each with its own help.

Old spellings of a flag stay as hidden aliases (:data:`ForceAlias`): accepted, not shown in ``--help``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from slide_clip import config as _config

# The Python type of every path-like input of the commands: slides, stores, output folders.
# One place, so that switching them to ``str`` (URLs such as s3://bucket/x, which pathlib folds
# into s3:/bucket/x) is one line here plus the command bodies' own conversions.
SlidePath = Path
StorePath = Path
OutPath = Path
#: The commands that read and write object storage (embed, run, zeroshot, fewshot, heatmap,
#: summarize, cluster) take their slides, stores and output folder as text: a path or a URL.
UrlOrPath = str
_URLS = " Paths or URLs (s3://, gs://, az://, https://; see --storage-options)."
_PATH_OR_URL = "PATH|URL"  # metavar of an option that takes a path or a URL (typer would show <str>)

_PATHS = "PATH"  # metavar of a repeatable path option (typer would show <list[Path]>)
_TEXTS = "TEXT"

# ----------------------------------------------------------------------------- inputs and outputs
Slides = Annotated[List[SlidePath], typer.Argument(
    metavar="SLIDES", help="Slide files or folders of slides (a DICOM series folder counts as one slide).", show_default=False)]
UrlSlides = Annotated[List[UrlOrPath], typer.Argument(
    metavar="SLIDES", help="Slide files or folders of slides (a DICOM series folder counts as one slide)." + _URLS,
    show_default=False)]
Cohort = Annotated[List[UrlOrPath], typer.Argument(
    metavar="SLIDES", help="Slide files, folders of slides, or CSV manifests (path, mpp, patient_id, ...)." + _URLS,
    show_default=False)]
Stores = Annotated[List[StorePath], typer.Argument(
    metavar="STORES", help="Slide stores (<slide>.zarr) or output folders of `embed`.", show_default=False)]
UrlStores = Annotated[List[UrlOrPath], typer.Argument(
    metavar="STORES", help="Slide stores (<slide>.zarr) or output folders of `embed`." + _URLS, show_default=False)]
UrlOutFolder = Annotated[UrlOrPath, typer.Argument(
    metavar="OUT", help="An output folder of `embed`/`run` (its slide stores, score sets and cohort tables)." + _URLS,
    show_default=False)]
OutFolder = Annotated[OutPath, typer.Argument(
    metavar="OUT", help="An output folder of `embed`/`run` (its slide stores, score sets and cohort tables).", show_default=False)]
Out = Annotated[OutPath, typer.Option(
    "--out", "-o", help="Output folder: one <slide>.zarr store per slide.")]
UrlOut = Annotated[UrlOrPath, typer.Option(
    "--out", "-o", metavar=_PATH_OR_URL, help="Output folder (a path or a URL): one <slide>.zarr store per slide.")]
CohortOut = Annotated[UrlOrPath, typer.Option(
    "--out", "-o", metavar=_PATH_OR_URL,
    help="Output folder (a path or a URL): stores, heatmaps, summaries, cohort tables.")]
Pattern = Annotated[Optional[str], typer.Option(
    "--pattern", help="Glob for slides inside folders (default: known slide extensions).")]
Manifest = Annotated[Optional[UrlOrPath], typer.Option(
    "--manifest", metavar=_PATH_OR_URL,
    help="Cohort CSV (path, patient_id) giving slides their patients (default: OUT/patients.csv from "
         "`slide-clip run`; else one patient per slide). A path or a URL.")]
AllowMissing = Annotated[bool, typer.Option(
    "--allow-missing", help="Leave out listed slides that have no complete store (and patients left without "
                            "a slide); each is listed. Default: such a slide is an error.")]

# ----------------------------------------------------------------------------- configuration
Config = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="Pipeline config YAML (default: the shipped configs/default.yaml).")]
Registry = Annotated[List[Path], typer.Option(
    "--models", metavar=_PATHS, help="Extra model registry YAML files (repeatable).")]

# ----------------------------------------------------------------------------- the model
Model = Annotated[Optional[str], typer.Option("--model", "-m", help=_config.model_option_help())]
StoredModel = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="The stored model to use. Default: the one model the stores hold (needed when a store "
                          f"holds several; `embed` stores {_config.default_model()} unless told otherwise).")]
Checkpoint = Annotated[Optional[Path], typer.Option(
    "--checkpoint", help="Local weights file for the model (offline use).")]
StoredCheckpoint = Annotated[Optional[Path], typer.Option(
    "--checkpoint", help="Local weights file of the stored model (to compute text embeddings offline).")]

# ----------------------------------------------------------------------------- resolution and tiling
Mpp = Annotated[Optional[float], typer.Option("--mpp", help="Override every slide's resolution, µm per level-0 pixel.")]
MppCsv = Annotated[Optional[Path], typer.Option(
    "--mpp-csv", help="CSV with columns slide,mpp: per-slide resolution overrides (slide: a path, file name, name or id; "
         "each row must name one slide; over a manifest's mpp column; --mpp wins over both).")]
TargetMpp = Annotated[Optional[float], typer.Option(
    "--target-mpp", help="Tile resolution, µm/px (default: the µm/px the model was trained at, else 0.5).")]
TileSize = Annotated[Optional[int], typer.Option(
    "--tile-size", help="Tile side in pixels at the target resolution (default: the model's input size; another size is "
         "resampled to it, and recorded).")]
Overlap = Annotated[Optional[float], typer.Option("--overlap", help="Fraction of a tile shared with its neighbour (default 0).")]
MinTissue = Annotated[Optional[float], typer.Option(
    "--min-tissue", help="Drop tiles with a smaller tissue fraction (default 0.25).")]

# ----------------------------------------------------------------------------- the device
Device = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (default auto).")]
Precision = Annotated[Optional[str], typer.Option("--precision", help="auto, fp32, fp16 or bf16 (default auto).")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Tiles per batch (default 64).")]
Workers = Annotated[Optional[str], typer.Option(
    "--workers", help="Tile-reader processes (one pool per executor, shared by its slides): a number, or auto (default: "
         "none on a CPU, min(8, cores - 1) on a GPU).")]

# ----------------------------------------------------------------------------- redoing work
def _or_old_name(ctx: typer.Context, value: bool) -> bool:
    """--overwrite is also set by its hidden old name --force. click processes the flags given on
    the command line first, so --force is in ctx.params when --overwrite's own value is settled."""
    return bool(value or ctx.params.get("force"))


Overwrite = Annotated[bool, typer.Option(
    "--overwrite", callback=_or_old_name,
    help="Replace stores made with other settings, from another file, or by another tissue algorithm.")]
Redo = Annotated[bool, typer.Option(
    "--overwrite", callback=_or_old_name, help="Redo every stage, even for finished slides.")]
# the old name of --overwrite (`run` had --force): accepted, hidden, read by --overwrite's callback;
# a command declares it as ``force: o.ForceAlias = False`` and reads only ``overwrite``
ForceAlias = Annotated[bool, typer.Option("--force", hidden=True, help="Old name of --overwrite.")]


# ----------------------------------------------------------------------------- scoring
Prompts = Annotated[List[str], typer.Option("--prompts", "-p", metavar=_TEXTS,
                                            help="Prompt sets to score (repeatable).")]
TopK = Annotated[Optional[int], typer.Option("--topk", help="k of the top-k pooled slide score (default 50).")]
Decision = Annotated[Optional[str], typer.Option("--decision", help="Slide label from: topk, mean or area (default topk).")]
ScoreSet = Annotated[Optional[str], typer.Option(
    "--set", "-s", help="Score set name, as zeroshot/fewshot print it (the prompt set's name, or fewshot-…). "
                        "Default: the stores' only score set (cluster sets aside).")]

# ----------------------------------------------------------------------------- survival
Clinical = Annotated[UrlOrPath, typer.Option(
    "--clinical", metavar=_PATH_OR_URL,
    help="Clinical table (CSV or Parquet): patient_id, time, event, ... A path or a URL.")]
TimeColumn = Annotated[str, typer.Option("--time", help="Column of follow-up times (in --clinical).")]
EventColumn = Annotated[str, typer.Option(
    "--event", help="Column of event indicators in --clinical (1/true = event, 0/false = censored).")]

# ----------------------------------------------------------------------------- Prefect (run, serve)
Concurrency = Annotated[int, typer.Option("--concurrency", help="Shard runs at the same time on a --deployment's work pool.")]
Deployment = Annotated[Optional[str], typer.Option(
    "--deployment", help="Hand the shards to this shard deployment (process-shard/NAME from `slide-clip deploy`): its work "
         "pool's workers run them (scale-out).")]

