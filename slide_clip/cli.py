"""The ``slide-clip`` command line. Every command mirrors a function of the library.

A user's bad input ends in one line naming the file and what to do, never a traceback
(``--debug`` shows tracebacks of unexpected errors).
"""

from __future__ import annotations

import json
import inspect
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from slide_clip import cli_options as o
from slide_clip.errors import SlideClipError
from slide_clip.text import plural

app = typer.Typer(
    name="slide-clip",
    help="Whole-slide images to CLIP tile embeddings, zero-shot scores and heatmaps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of unexpected errors and library logs."),
          storage_options: Optional[str] = typer.Option(
              None, "--storage-options", envvar="SLIDE_CLIP_STORAGE",
              help="Slides and stores at URLs (s3://...): JSON or key=value,... (endpoint_url, profile, anonymous, "
                   "region, or any fsspec option), over the config's storage section.")):
    import logging
    import warnings

    _state["debug"] = debug
    _state["storage_options"] = storage_options
    if storage_options:
        from slide_clip.config import load_config
        from slide_clip.storage.options import configure, merged

        try:
            configure(merged(load_config(), storage_options))
        except SlideClipError as e:
            _fail(str(e))
    if not debug:  # open_clip and the hub client log warnings that our own errors explain better
        root = logging.getLogger()
        root.addHandler(logging.NullHandler())  # so logging.warning() never installs a default handler
        root.setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", category=FutureWarning)


def _with_storage_options(cfg):
    """``cfg`` with ``--storage-options`` on top of its ``storage`` section (the library applies
    the section, so the command line wins over a ``--config`` file's)."""
    text = _state.get("storage_options")
    if not text:
        return cfg
    from slide_clip.storage.options import merged

    return cfg.with_overrides(storage=merged(cfg, text).model_dump())


def _fail(message: str, code: int = 2):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def info(
    slides: o.Slides,
    mpp: o.Mpp = None,
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table."),
):
    """Print each slide's metadata: size, levels, resolution, vendor."""
    from slide_clip.mpp_overrides import check_mpp_value
    from slide_clip.scan import scan_slides, skipped_line
    from slide_clip.slide import slide_info

    try:
        mpp = check_mpp_value(mpp)
    except SlideClipError as e:
        _fail(str(e))
    scan = scan_slides(slides)
    line = skipped_line(scan.skipped)
    if line:
        typer.echo(line, err=True)
    rows, failed = [], 0
    for s in scan.slides:
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
    registry: o.Registry = [],
):
    """List the model registry: kind, backend, input size, training µm/px, licence, gated, weights."""
    from slide_clip.encoders import load_registry

    try:
        reg = load_registry(*registry)
    except SlideClipError as e:
        _fail(str(e))
    from slide_clip.encoders import model_input_size

    def size(s):
        try:
            return str(model_input_size(s))
        except SlideClipError:
            return "?"

    _table(["name", "kind", "backend", "input", "mpp", "licence", "gated", "weights", "description"],
           [[s.name, "vision-only" if s.vision_only else "vision-language" if s.output == "joint" else s.output,
             s.backend, size(s),
             f"{s.training_mpp:g}" if s.training_mpp else "-", s.licence or "-", "yes" if s.gated else "no",
             s.weights or "random", s.description] for s in reg.values()])
    typer.echo("Every name also works as random:NAME[@seed=N] (seeded random weights, for testing).")


@app.command()
def embed(
    slides: o.UrlSlides,
    out: o.UrlOut,
    config: o.Config = None,
    model: o.Model = None,
    checkpoint: o.Checkpoint = None,
    registry: o.Registry = [],
    mpp: o.Mpp = None,
    mpp_csv: o.MppCsv = None,
    target_mpp: o.TargetMpp = None,
    tile_size: o.TileSize = None,
    overlap: o.Overlap = None,
    min_tissue: o.MinTissue = None,
    batch_size: o.BatchSize = None,
    workers: o.Workers = None,
    device: o.Device = None,
    precision: o.Precision = None,
    pattern: o.Pattern = None,
    overwrite: o.Overwrite = False,
    force: o.ForceAlias = False,
    progress: bool = typer.Option(True, help="Show a progress bar (tiles/s)."),
):
    """Find tissue, tile at an exact resolution and write CLIP embeddings to one Zarr store per slide.

    Goes on past a bad slide; ends with a status line per slide and exit code 1 if any failed.
    """
    from slide_clip.config import load_config
    from slide_clip.mpp_overrides import check_mpp_value, read_mpp_csv
    from slide_clip.output import ensure_out_dir
    from slide_clip.pipeline import embed_slides
    from slide_clip.scan import record_skipped, scan_slides, skipped_line

    try:
        cfg = _with_storage_options(load_config(config)).with_overrides(
            tiling={"target_mpp": target_mpp, "tile_size": tile_size, "overlap": overlap, "min_tissue": min_tissue},
            encode={"model": model, "checkpoint": str(checkpoint.resolve()) if checkpoint else None,
                    "registries": tuple(str(r) for r in registry) or None, "batch_size": batch_size,
                    "num_workers": workers, "device": device, "precision": precision},
        )
        mpp = check_mpp_value(mpp)
        mpps = read_mpp_csv(mpp_csv) if mpp_csv else None
        scan = scan_slides(slides, pattern, out)
        paths = scan.slides
        if not paths:
            line = skipped_line(scan.skipped)
            _fail(f"no slides found in {', '.join(map(str, slides))}" + (f" ({line})" if line else ""))
        from slide_clip.encoders import resolve_model
        from slide_clip.encoders.hub import check_hub

        e = cfg.encode  # weights on an unreachable hub: said now, before any slide is read
        check_hub(resolve_model(e.model, tuple(e.registries), e.checkpoint))
        ensure_out_dir(out)
        line, _ = record_skipped(out, scan.skipped)
        if line:  # a cohort never shrinks without a word
            typer.echo(line, err=True)

        def report(r):
            line = f"{r.status:8s} {r.name}"
            if r.status == "failed":
                line += f"  {r.error}"
            else:
                line += f"  {plural(r.n_tiles, 'tile')}, {r.encoded} encoded, {r.seconds:.1f} s"
            typer.echo(line, err=True)

        from slide_clip.stages import resampling_note

        note = resampling_note(cfg)
        if note:
            typer.echo(note, err=True)
        results = embed_slides(paths, out, cfg, mpps=mpps, mpp=mpp, overwrite=overwrite,
                               progress=progress and sys.stderr.isatty(), on_result=report)
    except SlideClipError as e:
        _fail(str(e))
    for r in results:
        if r.status == "failed" and _state["debug"] and "traceback" in r.extra:
            typer.echo(r.extra["traceback"], err=True)
    n_failed = sum(r.status == "failed" for r in results)
    typer.echo(f"{len(results) - n_failed} of {plural(len(results), 'slide')} done, {n_failed} failed; stores in {out}")
    for r in results:
        typer.echo(f"{r.name}\t{r.status}\t{r.n_tiles if r.n_tiles is not None else '-'}\t{r.error or r.store}")
    raise typer.Exit(1 if n_failed else 0)


def _scoring_config(config, registry, checkpoint, device, topk=None, decision=None):
    from slide_clip.config import load_config

    return _with_storage_options(load_config(config)).with_overrides(
        encode={"registries": tuple(str(r) for r in registry) or None,
                "checkpoint": str(checkpoint.resolve()) if checkpoint else None, "device": device},
        scoring={"topk": topk, "decision": decision},
    )


def _report_scores(results, paths) -> None:
    from slide_clip.storage.filesystems import upath
    from slide_clip.summaries import summary_path

    failed = 0
    for r in results:
        if r["status"] == "failed":
            failed += 1
            typer.echo(f"failed   {r['slide_id']}  {r['error']}")
        else:
            probs = ", ".join(f"{c} {v:.3f}" for c, v in r["slide_prob"].items()) if r["n_tiles"] else "no tiles"
            typer.echo(f"ok       {r['slide_id']}  {plural(r['n_tiles'], 'tile')}  predicted: {r['predicted']}  "
                       f"({probs})")
    typer.echo(f"{len(results) - failed} of {plural(len(results), 'slide')} scored, {failed} failed")
    done = [r for r in results if r["status"] == "ok"]
    if done:
        set_name, model = done[0]["score_set"], done[0]["model"]
        outs = sorted({str(upath(p).parent) for p in paths})
        summaries = sorted({str(summary_path(upath(p).parent, model, set_name, "x").parent) for p in paths})
        typer.echo(f"score set {set_name!r} (model {model}) written into the slide stores in {', '.join(outs)}; "
                   f"slide summaries in {', '.join(summaries)}")
        typer.echo(f"next: slide-clip heatmap {outs[0]} --set {set_name}   |   slide-clip summarize {outs[0]}")
    raise typer.Exit(1 if failed else 0)


@app.command()
def zeroshot(
    stores: o.UrlStores,
    prompts: str = typer.Option(..., "--prompts", "-p", help="Prompt set YAML, or a shipped name (tumour, tissue_types)."),
    model: o.StoredModel = None,
    registry: o.Registry = [],
    checkpoint: o.StoredCheckpoint = None,
    config: o.Config = None,
    device: o.Device = None,
    topk: o.TopK = None,
    decision: o.Decision = None,
):
    """Score every tile against text prompts (no re-encoding) and write slide summaries.

    Text classifiers are computed once per model and prompt set and cached in <out>/classifiers.
    """
    from slide_clip.prompts import load_prompts
    from slide_clip.scoring import find_stores, zeroshot as run_zeroshot

    try:
        cfg = _scoring_config(config, registry, checkpoint, device, topk, decision)
        ps = load_prompts(prompts)
        paths = find_stores(stores)
        results = run_zeroshot(paths, ps, cfg, model=model)
    except SlideClipError as e:
        _fail(str(e))
    _report_scores(results, paths)


@app.command()
def fewshot(
    stores: o.UrlStores,
    examples: o.UrlOrPath = typer.Option(..., "--examples", "-e", metavar="PATH|URL",
                                         help="CSV of labelled tiles: slide,x,y,label (level-0 top-left) or "
                                              "image,label. A path or a URL."),
    name: Optional[str] = typer.Option(None, help="Name of the score set (default fewshot-<csv name>)."),
    model: o.StoredModel = None,
    registry: o.Registry = [],
    checkpoint: o.StoredCheckpoint = None,
    config: o.Config = None,
    device: o.Device = None,
    topk: o.TopK = None,
    decision: o.Decision = None,
):
    """Score every tile against prototypes of a few labelled example tiles per class."""
    from slide_clip.examples import read_examples
    from slide_clip.scoring import find_stores, fewshot as run_fewshot

    try:
        cfg = _scoring_config(config, registry, checkpoint, device, topk, decision)
        read_examples(examples)  # a bad examples CSV is said first, before the stores are looked at
        paths = find_stores(stores)
        results = run_fewshot(paths, examples, cfg, model=model, name=name)
    except SlideClipError as e:
        _fail(str(e))
    _report_scores(results, paths)


@app.command()
def heatmap(
    stores: o.UrlStores,
    score_set: o.ScoreSet = None,
    model: o.StoredModel = None,
    classes: List[str] = typer.Option([], "--class", help="Only these classes (repeatable; default all)."),
    smooth: Optional[float] = typer.Option(None, help="Gaussian smoothing over neighbouring tiles, sigma in tiles."),
    scale: Optional[str] = typer.Option(None, help="Colour scale: fixed (probability 0-1, the default; comparable "
                                        "across slides) or auto (stretched to each slide's range, for flat maps)."),
    config: o.Config = None,
):
    """Draw a probability heatmap PNG per class and a QuPath GeoJSON per slide.

    <slide>_<class>.png on the fixed 0-1 scale (comparable across slides); --scale auto writes
    <slide>_<class>_auto.png beside them, never over them.
    """
    from slide_clip.config import load_config
    from slide_clip.scoring import find_stores, heatmaps

    try:
        cfg = _with_storage_options(load_config(config)).with_overrides(
            heatmap={"smoothing_tiles": smooth, "scale": scale})
        paths = find_stores(stores)
    except SlideClipError as e:
        _fail(str(e))
    failed = 0
    for p in paths:
        try:
            for f in heatmaps(p, score_set, cfg, model=model, classes=list(classes) or None):
                typer.echo(str(f))
        except SlideClipError as e:
            failed += 1
            typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1 if failed else 0)


@app.command()
def summarize(
    out: o.UrlOutFolder,
    score_set: Annotated[Optional[str], typer.Option("--set", "-s", help="Score set (default: every score set "
                                                     "found in OUT).")] = None,
    model: o.StoredModel = None,
):
    """Write cohort tables (CSV and Parquet): one row per slide, failed slides with their error.

    One table per score set and model found in OUT (or only those chosen with --set/--model).
    """
    from slide_clip.scoring import summarize_all

    try:
        tables = summarize_all(out, set_name=score_set, model=model)
    except SlideClipError as e:
        _fail(str(e))
    for i, (mk, sk, df, csv_path, parquet_path) in enumerate(tables):
        if i:
            typer.echo("")
        typer.echo(f"== {sk} ({mk}): {plural(len(df), 'slide')}")
        cols = [c for c in ("slide_id", "status", "n_tiles", "predicted", "error") if c in df]
        shown = df[cols].astype(object)
        typer.echo(shown.where(shown.notna(), "").to_string(index=False))
        typer.echo(f"{csv_path}\n{parquet_path}")


# ----------------------------------------------------------------------------- reading stores
def _say_embeddings(inputs, model: str | None) -> None:
    """One line on stderr naming the embedding group a command reads and what it holds, e.g.
    ``embeddings: conch-features (pre-projection features, not normalised)`` (the group's
    ``output``, docs/FORMAT.md). Stores that cannot be read are left to the command itself."""
    from slide_clip.encoders.outputs import embeddings_line
    from slide_clip.scoring import find_stores, open_scored_store

    try:
        paths = find_stores(list(inputs))
    except SlideClipError:
        return
    for p in paths:
        try:
            store, name = open_scored_store(p, model)
            typer.echo(embeddings_line(name, store.embedding_attrs(name)), err=True)
            return
        except SlideClipError:
            continue


# ----------------------------------------------------------------------------- survival
@app.command()
def survival(
    out: o.UrlOutFolder,
    clinical: o.Clinical,
    time: o.TimeColumn,
    event: o.EventColumn,
    model: o.StoredModel = None,
    baseline: List[str] = typer.Option(["coxnet", "abmil"], "--baseline", "-b",
                                       help="Baselines to run (repeatable): coxnet, abmil."),
    folds: int = typer.Option(5, help="Patient-level cross-validation folds (stratified by event)."),
    seed: int = typer.Option(0, help="Seed of the folds, the bootstrap and the training."),
    name: Optional[str] = typer.Option(None, help="Run name (default <model>-<folds>fold-seed<seed>)."),
    manifest: o.Manifest = None,
    score_set: List[str] = typer.Option([], "--set", "-s", help="Score set whose per-class summaries (slide_prob, "
                                        "mean_prob, area_fraction) join the Cox model's inputs (repeatable; default "
                                        "none: the mean embedding only). Every slide must have it."),
    scores: List[str] = typer.Option([], "--scores", hidden=True, help="Old name of --set."),
    covariate: List[str] = typer.Option([], "--covariate", help="Numeric clinical column added to the Cox model (repeatable)."),
    epochs: Optional[int] = typer.Option(None, help="ABMIL training epochs (default 40)."),
    device: o.Device = None,
    bootstrap: int = typer.Option(500, help="Bootstrap resamples of the c-index intervals (patients resampled within folds)."),
    permutations: int = typer.Option(0, help="Permutation test of the headline c-index: the whole cross-validation is "
                                     "refitted on N permutations of the outcomes (costs N runs; default 0: off)."),
    allow_missing: o.AllowMissing = False,
    heatmaps: str = typer.Option("all", help="ABMIL heatmaps of all slides, of the gallery patients' slides "
                                 "(gallery), or none."),
):
    """Cross-validated survival baselines from the stores and a clinical table.

    Writes out/survival/<baseline>/<run>/ (report.json, risk.csv, km.png, features, models,
    heatmaps), each run folder swapped in only when complete. The headline is the mean ± SD
    of the c-index over the test folds.
    """
    try:
        from slide_clip.survival import SurvivalSettings, run_survival
    except ImportError as e:  # pragma: no cover - a broken install
        _fail(f"the survival models need scikit-survival, scikit-learn and h5py ({e}); "
              "install them with `pip install scikit-survival h5py`")
    abmil = {k: v for k, v in {"epochs": epochs, "device": device}.items() if v is not None}
    settings = SurvivalSettings(baselines=tuple(baseline), folds=folds, seed=seed, name=name, n_boot=bootstrap,
                                score_sets=tuple(score_set) + tuple(scores), covariates=tuple(covariate),
                                heatmaps=heatmaps, abmil=abmil, allow_missing=allow_missing, permutations=permutations)
    try:
        run_survival(out, clinical, time, event, model=model, manifest=manifest, settings=settings,
                     log=lambda m: typer.echo(m, err=True))
    except SlideClipError as e:
        _fail(str(e))


@app.command()
def bags(
    out: o.UrlOutFolder,
    h5: Optional[o.UrlOrPath] = typer.Option(None, "--h5", metavar="PATH|URL",
                                             help="Write one HDF5 bag per slide or patient into this folder (a "
                                                  "path or a URL)."),
    level: str = typer.Option("slide", help="slide or patient bags (HDF5)."),
    model: o.StoredModel = None,
    manifest: o.Manifest = None,
    with_max: bool = typer.Option(False, "--max", help="Add max-pooled embedding columns to the pooled tables."),
    allow_missing: o.AllowMissing = False,
):
    """Pooled tables (Parquet, per slide and per patient) and optional HDF5 bags for MIL code."""
    from slide_clip.survival import export_h5, open_cohort, write_pooled_tables

    if level not in ("slide", "patient"):
        _fail("--level must be slide or patient")
    try:
        cohort = open_cohort(out, model, manifest=manifest, allow_missing=allow_missing)
        for d in cohort.dropped:
            typer.echo(f"left out (--allow-missing): slide {d['slide']}: {d['reason']}", err=True)
        _say_embeddings([out], cohort.model)
        for p in write_pooled_tables(cohort, with_max=with_max):
            typer.echo(str(p))
        if h5:
            files = export_h5(cohort, h5, level)
            typer.echo(f"{plural(len(files), level + ' bag')} in {h5}")
    except SlideClipError as e:
        _fail(str(e))


# ----------------------------------------------------------------------------- explore
def _explore_failed(failed) -> int:
    for _, msg in failed:
        typer.echo(f"error: {msg}", err=True)
    return len(failed)


@app.command()
def search(
    stores: List[o.UrlOrPath] = typer.Argument(..., metavar="STORES", show_default=False, help="An output folder of `embed` (or its stores; a path or a "
                                        "URL), then the text queries: slide-clip search OUT \"necrosis\" \"lymphocytes\"."),
    image: List[str] = typer.Option([], "--image", metavar="PATH|URL",
                                    help="Query with an image file, a path or a URL (repeatable; encoded once)."),
    tile: List[str] = typer.Option([], "--tile", help="Query with a stored tile, e.g. slide1:4480:2240 (slide id, then "
                                   "level-0 x and y; repeatable; its stored embedding, never re-encoded)."),
    prompts: Optional[str] = typer.Option(None, "--prompts", "-p", help="Prompt set whose templates phrase the "
                                          "text; a text naming one of its classes uses the class's synonyms "
                                          "(default tissue_types)."),
    raw: bool = typer.Option(False, "--raw", help="Embed each text verbatim (no templates or synonyms)."),
    top: int = typer.Option(20, "--top", "-n", help="Tiles per query."),
    name: Optional[str] = typer.Option(None, "--name", help="Output folder name under OUT/explore/search/."),
    approximate: bool = typer.Option(False, "--approximate", help="Use the FAISS index (see --build-index)."),
    build_index: bool = typer.Option(False, "--build-index", help="Build the FAISS index from the stores, then use it."),
    nprobe: int = typer.Option(16, help="Inverted lists visited per query (approximate search)."),
    gallery: bool = typer.Option(True, help="Write gallery PNGs and an HTML page of the hits."),
    model: o.StoredModel = None,
    registry: o.Registry = [],
    checkpoint: o.StoredCheckpoint = None,
    config: o.Config = None,
    device: o.Device = None,
):
    """Rank every stored tile by cosine with text, image or tile queries; write a table and galleries.

    The first argument is the stores' folder (or a store); the rest are text queries.
    """
    from slide_clip.explore.retrieval import search as run_search

    where, texts = [stores[0]], [str(t) for t in stores[1:]]
    _say_embeddings(where, model)
    try:
        cfg = _scoring_config(config, registry, checkpoint, device)
        r = run_search(where, cfg, texts=texts, images=[str(i) for i in image], tiles=list(tile), prompts=prompts,
                       raw=raw, model=model, top=top, name=name, approximate=approximate,
                       build_index=build_index, nprobe=nprobe, gallery=gallery)
    except SlideClipError as e:
        _fail(str(e))
    failed = _explore_failed(r["failed"])
    t = r["table"]
    for q in r["queries"]:
        sub = t[t["query"] == q].head(5)
        typer.echo(f"{q}: " + ", ".join(f"{a}({x},{y}) {s:.3f}" for a, x, y, s in
                                        zip(sub.slide_id, sub.x, sub.y, sub.score)))
    typer.echo(f"{r['method']} search of {plural(r['n_tiles'], 'tile')} in {plural(r['n_slides'], 'slide')}; "
               f"{plural(failed, 'store')} failed")
    for f in r["files"]:
        typer.echo(str(f))
    raise typer.Exit(1 if failed else 0)


@app.command()
def cluster(
    stores: o.UrlStores,
    k: int = typer.Option(12, "--k", "-k", help="Number of clusters."),
    sample: int = typer.Option(20000, help="Tiles the k-means is fitted on (seeded, stratified by slide)."),
    seed: int = typer.Option(0, help="Seed of the sample and of k-means."),
    name: Optional[str] = typer.Option(None, help="Score set name (default clusters-k<k>)."),
    per_cluster: int = typer.Option(8, help="Representative tiles per cluster in the gallery."),
    maps: bool = typer.Option(True, help="Draw a cluster map per slide."),
    gallery: bool = typer.Option(True, help="Write the gallery of representative tiles."),
    model: o.StoredModel = None,
):
    """Cluster tiles across the cohort (k-means); store each slide's clusters; maps, gallery, table."""
    from slide_clip.explore.clusters import cluster as run_cluster

    _say_embeddings(stores, model)
    try:
        r = run_cluster(stores, k=k, model=model, sample=sample, seed=seed, name=name, maps=maps,
                        gallery=gallery, per_cluster=per_cluster)
    except SlideClipError as e:
        _fail(str(e))
    failed = _explore_failed(r["failed"])
    cols = ["slide_id", "status", "n_tiles"] + [c for c in r["table"].columns if c.startswith("fraction__")]
    typer.echo(r["table"][cols].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    for f in [r["table_path"], r["csv"], *r["maps"], *r["galleries"]]:
        typer.echo(str(f))
    raise typer.Exit(1 if failed else 0)


@app.command(name="map")
def map_(
    stores: o.UrlStores,
    method: str = typer.Option("umap", help="umap, tsne or pca."),
    of: str = typer.Option("tiles", "--of", help="tiles (a sample per slide) or slides (one pooled point each)."),
    per_slide: int = typer.Option(200, help="Tiles sampled per slide (seeded)."),
    seed: int = typer.Option(0, help="Seed of the sample and the map."),
    colour_by: List[str] = typer.Option(["slide"], "--color-by", "--colour-by",
                                        help="slide, a score set (top class) or a clusters set (repeatable)."),
    mosaic: bool = typer.Option(False, help="Also place tile thumbnails on the map."),
    h5ad: Optional[str] = typer.Option(None, "--h5ad", metavar="PATH|URL",
                                       help="Also export the sampled tiles (all tiles with --per-slide 0) as "
                                            "AnnData, with the map in obsm (a path or a URL)."),
    model: o.StoredModel = None,
):
    """Draw a 2-D map (UMAP, t-SNE or PCA) of tiles or slides; optional mosaic and AnnData export."""
    from slide_clip.explore.maps import embedding_map

    _say_embeddings(stores, model)
    try:
        per = per_slide if per_slide > 0 else 10**12
        r = embedding_map(stores, model=model, of=of, method=method, per_slide=per, seed=seed,
                          colour_by=list(colour_by), mosaic=mosaic)
        files = list(r["files"])
        if h5ad is not None:
            from slide_clip.explore.h5ad import export_h5ad

            sets = [c for c in colour_by if c != "slide"]
            obsm = {f"X_{r['method']}": r["points"][["map_1", "map_2"]].to_numpy()} if of == "tiles" else None
            e = export_h5ad(stores, h5ad, model=model, per_slide=per if of == "tiles" else None, seed=seed,
                            score_sets=sets or None, obsm=obsm)
            files.append(e["path"])
    except SlideClipError as e:
        _fail(str(e))
    failed = _explore_failed(r["failed"])
    typer.echo(f"{r['method']} map of {plural(len(r['points']), of.rstrip('s'))}")
    for f in files:
        typer.echo(str(f))
    raise typer.Exit(1 if failed else 0)



# ----------------------------------------------------------------------------- viewer
@app.command()
def view(
    out: o.UrlOutFolder,
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8765, help="Port (0 picks a free one)."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow a --host other machines can reach "
                                      "(no login: anyone who reaches it sees the slides)."),
    model: o.StoredModel = None,
    registry: o.Registry = [],
    checkpoint: o.StoredCheckpoint = None,
    config: o.Config = None,
    device: o.Device = None,
):
    """Serve a local page: the cohort, slides at full resolution with score overlays, tile details,
    search by text or by tile, and labelling tiles to re-score from the stored embeddings.

    Reads the stores; writes only label sets (OUT/labels/) and the score sets you ask for.
    """
    from slide_clip.viewer import serve

    try:
        cfg = _scoring_config(config, registry, checkpoint, device)
        serve(out, cfg, host=host, port=port, model=model, allow_remote=allow_remote,
              echo=lambda m: typer.echo(m, err=m.startswith("warning")))
    except SlideClipError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        pass


def _parameter_infos(callback):
    """(name, annotation, typer OptionInfo/ArgumentInfo) of a command's parameters, either style
    (``x: T = typer.Option(...)`` or ``x: Annotated[T, typer.Option(...)]``)."""
    import typing

    from typer.models import ParameterInfo

    hints = typing.get_type_hints(callback, include_extras=True)
    for name, p in inspect.signature(callback).parameters.items():
        hint = hints.get(name)
        info = p.default if isinstance(p.default, ParameterInfo) else None
        if typing.get_origin(hint) is Annotated:
            hint, *extras = typing.get_args(hint)
            info = next((e for e in extras if isinstance(e, ParameterInfo)), info)
        if info is not None:
            yield name, hint, info


def _plain_metavars(application: typer.Typer) -> None:
    """``--help`` names a repeatable option's values ``PATH`` or ``TEXT`` (typer would show ``<list[Path]>``)."""
    import typing

    from typer.models import OptionInfo

    for cmd in application.registered_commands:
        for name, hint, info in _parameter_infos(cmd.callback):
            if isinstance(info, OptionInfo) and info.metavar is None and typing.get_origin(hint) is list:
                (inner,) = typing.get_args(hint)
                info.metavar = "PATH" if inner is Path else "TEXT"


def _plain_argument_types(command) -> None:
    """``--help`` shows a repeatable argument's type as ``PATH...`` or ``TEXT...``, like the options.

    typer (0.2x) labels it ``<list[Path]>`` and takes no metavar for that column of an argument
    (fastapi/typer#1410), so the label is set on the command's argument itself."""
    import typing

    from typer.core import TyperArgument

    for sub in getattr(command, "commands", {}).values():
        for p in sub.params:
            if isinstance(p, TyperArgument) and p.nargs != 1 and hasattr(p, "display_type_rich"):
                annotation = getattr(getattr(p, "type_descriptor", None), "annotation", None)
                path_like = Path in typing.get_args(annotation) or p.name in ("slides", "stores")  # paths or URLs
                label = ("PATH" if path_like else "TEXT") + "..."
                p.display_type_rich = lambda ctx, label=label: label


def cli_command():
    """The click command behind ``slide-clip``, with its help's type labels made plain."""
    _plain_metavars(app)
    command = typer.main.get_command(app)
    _plain_argument_types(command)
    return command


def main():  # console-script entry point
    try:
        cli_command()(prog_name="slide-clip")
    except SlideClipError as e:  # pragma: no cover - commands catch their own
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
