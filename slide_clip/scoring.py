"""Scoring stores: zero-shot and few-shot tile labels, slide summaries, heatmaps, cohort tables.

Works on stores made by the executor (:mod:`slide_clip.executor`); never re-encodes a stored tile. Output
files live beside the stores (``out`` is a store's folder)::

    out/summaries/<model>/<set>/<slide_id>.json     per-slide summary
    out/heatmaps/<model>/<set>/<slide_id>_<class>.png, <slide_id>.geojson
    out/heatmaps/<model>/<set>/<slide_id>_<class>_auto.png (--scale auto: never over the fixed scale's)
    out/classifiers/<model>/<set>-<hash>-<weights>.npz   cached text classifiers
    out/status/<slide_id>.json                      what `embed` did to each slide
    out/cohort-<set>-<model>.csv / .parquet         one row per slide
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slide_clip.aggregate import slide_scores
from slide_clip.config import PipelineConfig
from slide_clip.encoders.cache import EncoderCache
from slide_clip.encoders.outputs import text_refusal
from slide_clip.errors import ConfigError, SlideClipError, StoreBusyError, StoreError
from slide_clip.examples import example_features, read_examples
from slide_clip.heatmap import (grid_to_thumbnail, overlay, probability_grid, render_png, smooth_grid,
                                tiles_geojson, value_range)
from slide_clip.storage.objects import write_text
from slide_clip.pictures import random_weights_title, thumbnail_mm_per_px
from slide_clip.prompts import PromptSet
from slide_clip.output import BESIDE_STORES, output_errors
from slide_clip.storage.filesystems import upath
from slide_clip.storage.owner import store_owner
from slide_clip.store import STATUS_TILED, SlideStore, model_key
from slide_clip.summaries import (read_status, score_set_pairs, store_ref, summarize, summarize_all,  # noqa: F401
                                  summary_path, write_summary)
from slide_clip.zeroshot import ClassifierCache, prototypes, softmax, text_classifier, tile_logits


#: Temperature of few-shot scores for vision-only models (they have no learned logit_scale).
VISION_ONLY_LOGIT_SCALE = 100.0


#: How long scoring and heatmaps wait for another process holding a store's lock, seconds.
LOCK_WAIT_SECONDS = 120.0


@contextmanager
def _locked(path: str | Path):
    """Own an existing store (its lock, or its claim at a URL; waiting for another writer);
    disk and storage errors as one line."""
    SlideStore.open(path)  # not a store: its error, and no lock file is made beside nothing
    with output_errors(path, BESIDE_STORES), store_owner(path, wait=LOCK_WAIT_SECONDS):
        yield


def find_stores(inputs: list[str | Path]) -> list[Path]:
    """Stores given directly, or every ``*.zarr`` store in given folders (sorted).

    A folder without any store (or no input at all) is an error, never an empty cohort.
    """
    out: list[Path] = []
    for item in inputs:
        p = upath(item)
        if p.suffix == ".zarr" or (p / "zarr.json").is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(q for q in p.glob("*.zarr") if q.is_dir())
            if not found:
                raise StoreError("holds no slide stores (<slide>.zarr)", path=p,
                                 hint="Give the --out folder of `slide-clip embed` or `run`, or embed the slides "
                                      "into it first.")
            out.extend(found)
        else:
            raise StoreError("is neither a slide store nor a folder of stores", path=p,
                             hint="Give an <out> folder of `slide-clip embed` or a <slide>.zarr in it.")
    if not out:
        raise StoreError("no slide stores given", hint="Give the --out folder of `slide-clip embed` or `run`.")
    return out


def open_scored_store(path: Path, model: str | None) -> tuple[SlideStore, str]:
    """Open a store that is fully tiled and has complete embeddings; return it and the model name."""
    store = SlideStore.open(path)
    if store.status != STATUS_TILED:
        raise StoreError("is partial (tiling did not finish)", path=path, hint="Run `slide-clip embed` again.")
    store.check_tissue_algorithm()  # a cohort never mixes masks of two tissue algorithms
    store.check_tiles()  # present, of the recorded shapes, every chunk file there: never a damaged store
    keys = store.models()
    if not keys:
        raise StoreError("has no embeddings (the slide was tiled but never encoded)", path=path,
                         hint="Run `slide-clip embed` on the slide (with the same --out) to encode it.")
    names = {k: store.embedding_attrs(k).get("name", k) for k in keys}
    if model is None:
        if len(keys) != 1:
            raise StoreError(f"holds {len(keys)} models ({', '.join(names.values()) or 'none'})", path=path,
                             hint="Choose one with --model.")
        name = names[keys[0]]
    else:
        if model_key(model) not in keys:
            raise StoreError(f"has no embeddings from model {model!r} (it has: {', '.join(names.values()) or 'none'})",
                             path=path, hint="Embed the slides with that model first, or pick a stored one.")
        name = names[model_key(model)]
    if not store.is_complete(name):
        a = store.embedding_attrs(name)
        raise StoreError(f"embeddings for {name!r} are partial ({a.get('rows_written', 0)} of {store.n_tiles} tiles)",
                         path=path, hint="Run `slide-clip embed` again to finish them.")
    store.check_embeddings(name)  # one row per tile, of the recorded dimension
    return store, name


def _out_dir(store: SlideStore) -> Path:
    return store.path.parent


def score_store(store: SlideStore, model: str, set_name: str, classifier: np.ndarray, class_names: list[str],
                attrs: dict, cfg: PipelineConfig, t0: float) -> dict:
    """Score every tile with ``classifier``, write scores, heatmap grid and the slide summary."""
    emb = store.embedding_attrs(model)
    feats = store.embeddings(model, unit=True)  # cosines, also for a group of unnormalised features
    # the model's own, recorded at embedding time; vision-only models have none (few-shot only):
    # CLIP's usual 100, recorded with the scores
    logit_scale = float(emb["logit_scale"]) if emb.get("logit_scale") is not None else VISION_ONLY_LOGIT_SCALE
    logits = tile_logits(feats, classifier, logit_scale)
    probs = softmax(logits) if len(logits) else np.zeros((0, len(class_names)), np.float32)
    t = store.tiling
    grid = np.stack([probability_grid(store.grid(), probs[:, i], t["grid_shape"], t["overlap"])
                     for i in range(len(class_names))])
    write_id = store.write_scores(model, set_name, logits, probs, classifier,
                                  {**attrs, "classes": class_names, "logit_scale": logit_scale,
                                   "weights_sha256": emb["weights_sha256"]}, grid=grid)
    s = cfg.scoring
    agg = slide_scores(probs, logits, store.tissue_fraction(), class_names, topk=s.topk, decision=s.decision)
    summary = {
        "slide_id": store.slide["name"],
        "status": "ok",
        "error": None,
        "slide": store.slide["path"],
        "store": store_ref(store.path),
        "scores_write_id": write_id,
        "n_tiles": store.n_tiles,
        "tissue_area_mm2": store.group["tissue"].attrs.get("tissue_area_mm2"),
        "model": model,
        "random_weights": bool(emb.get("random_weights")),
        "score_set": set_name,
        "kind": attrs["kind"],
        "classes": class_names,
        **agg,
        "seconds": round(time.perf_counter() - t0, 3),
        "seconds_embed": _embed_seconds(store),
    }
    write_summary(_out_dir(store), summary)
    return summary


def _embed_seconds(store: SlideStore):
    return (read_status(_out_dir(store), store.slide["name"]).get("extra") or {}).get("seconds_embed")


def _failed_summary(path: Path, error: str, model: str | None, set_name: str, kind: str, t0: float,
                    write: bool = True) -> dict:
    from slide_clip.store import STORE_SUFFIX

    slide = path.name[: -len(STORE_SUFFIX)] if path.name.endswith(STORE_SUFFIX) else path.name
    summary = {"slide_id": slide, "status": "failed", "error": error, "store": store_ref(path), "model": model,
               "score_set": set_name, "kind": kind, "seconds": round(time.perf_counter() - t0, 3)}
    if write and model and path.parent.is_dir():
        try:
            write_summary(path.parent, summary)
        except OSError as e:  # a full or read-only disk: the returned summary still says what failed
            sp = summary_path(path.parent, model, set_name, slide)
            summary["error"] = f"{error} (and {e.strerror or e} writing {sp})"
    return summary


@dataclass
class _Job:
    kind: str
    set_name: str
    class_names: list[str]
    attrs: dict


def _score_many(stores, model, job: _Job, classifier_for, cfg, on_result=None) -> list[dict]:
    from slide_clip.storage.options import apply

    apply(cfg)  # the config's storage section, before any store at a URL is opened
    results = []
    for path in stores:
        t0 = time.perf_counter()
        try:
            with _locked(path):
                store, name = open_scored_store(path, model)
                clf = classifier_for(store, name)
                r = score_store(store, name, job.set_name, clf, job.class_names, job.attrs, cfg, t0)
        except SlideClipError as exc:
            if exc.path is None:
                raise  # not about this store (a model or config problem): stop the run
            # a store busy with another writer keeps that writer's summary
            r = _failed_summary(upath(path), str(exc), model, job.set_name, job.kind, t0,
                                write=not isinstance(exc, StoreBusyError))
        except Exception as exc:  # noqa: BLE001 - one store's fault never stops the others
            from slide_clip.results import unexpected_error

            r = _failed_summary(upath(path), unexpected_error(path, exc), model, job.set_name, job.kind, t0)
        results.append(r)
        if on_result:
            on_result(r)
    return results


def current_summary(store_path: str | Path, prompts: PromptSet, model: str | None = None) -> dict | None:
    """The slide's summary if its scores for ``prompts`` are up to date (same prompt hash), else None."""
    try:
        store, name = open_scored_store(upath(store_path), model)
        _, _, attrs = store.scores(name, prompts.name)
    except SlideClipError:
        return None
    if attrs.get("prompt_hash") != prompts.hash or attrs.get("weights_sha256") != store.embedding_attrs(name).get(
            "weights_sha256"):
        return None
    p = summary_path(_out_dir(store), name, prompts.name, store.slide["name"])
    try:
        summary = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") != "ok":
        return None
    # the summary of this very set (a run stopped after the set and before its summary: scored again)
    return summary if summary.get("scores_write_id") == attrs.get("write_id") else None


def zeroshot(stores: list[Path], prompts: PromptSet, cfg: PipelineConfig, *, model: str | None = None,
             on_result=None, encoders: EncoderCache | None = None) -> list[dict]:
    """Zero-shot score every store's tiles with a prompt set (text classifiers cached on disk).

    A model is built only for a classifier not cached yet, through ``encoders`` (a shard's
    cache lends it the model that embedded the slides)."""
    encoders = encoders or EncoderCache(cfg)

    def classifier_for(store: SlideStore, name: str) -> np.ndarray:
        refusal = text_refusal(name, store.embedding_attrs(name))  # before any model is loaded
        if refusal is not None:
            raise refusal
        sha = store.embedding_attrs(name)["weights_sha256"]
        cache = ClassifierCache(_out_dir(store) / "classifiers")
        clf = cache.get(name, sha, prompts)
        if clf is None:
            clf = text_classifier(encoders.for_store(name, sha, store.path, store.embedding_attrs(name)), prompts)
            cache.put(name, sha, prompts, clf)
        return clf

    job = _Job("zeroshot", prompts.name, prompts.class_names,
               {"kind": "zeroshot", "prompt_set": prompts.name, "prompt_hash": prompts.hash,
                "templates": list(prompts.templates),
                "synonyms": {c.name: list(c.synonyms) for c in prompts.classes}})
    return _score_many(stores, model, job, classifier_for, cfg, on_result)


# ----------------------------------------------------------------------------- few-shot
def fewshot(stores: list[Path], examples_csv: str | Path, cfg: PipelineConfig, *, model: str | None = None,
            name: str | None = None, on_result=None, encoders: EncoderCache | None = None) -> list[dict]:
    """Score stores with prototypes built from labelled example tiles (one prototype per label)."""
    examples = read_examples(examples_csv)
    class_names = sorted({e.label for e in examples})
    opened = {}
    for p in stores:
        try:
            s, _ = open_scored_store(p, model)
            opened[s.slide["name"]] = s
        except SlideClipError:
            continue  # reported per store below
    if not opened:
        raise StoreError("no complete store to take embeddings from", path=examples_csv)
    first = next(iter(opened.values()))
    mname = model or next(iter(first.embedding_attrs(k)["name"] for k in first.models()))
    sha = first.embedding_attrs(mname)["weights_sha256"]
    where = upath(examples_csv)  # never Path(url): s3://b/k would become s3:/b/k
    feats = example_features(examples, opened, mname, sha, encoders or EncoderCache(cfg), where)
    protos = prototypes(feats, [e.label for e in examples], class_names)
    set_name = name or f"fewshot-{where.stem}"
    digest = hashlib.sha256(protos.tobytes()).hexdigest()
    counts = {c: sum(e.label == c for e in examples) for c in class_names}

    def classifier_for(store: SlideStore, n: str) -> np.ndarray:
        if store.embedding_attrs(n)["weights_sha256"] != sha:
            raise StoreError(f"embeddings for {n!r} come from other weights than the examples'", path=store.path)
        return protos

    job = _Job("fewshot", set_name, class_names,
               {"kind": "fewshot", "examples": str(examples_csv), "examples_per_class": counts,
                "prompt_hash": digest})
    return _score_many(stores, mname, job, classifier_for, cfg, on_result)


# ----------------------------------------------------------------------------- heatmaps
def heatmaps(store_path: Path, set_name: str | None, cfg: PipelineConfig, *, model: str | None = None,
             classes: list[str] | None = None) -> list[Path]:
    """PNG heatmaps (one per class) and a QuPath GeoJSON of one store's score set.

    ``set_name`` None: the store's only score set of the model (cluster sets aside; they have
    their own maps), else an error listing them. Pictures on the ``auto`` colour scale are
    ``<slide>_<class>_auto.png``, so they never replace the fixed scale's (the ones that
    compare across slides). Holds the store's lock (waiting up to
    :data:`LOCK_WAIT_SECONDS` for a writer), so the pictures never mix two versions of a
    score set.
    """
    from slide_clip.storage.options import apply

    apply(cfg)
    with _locked(store_path):
        return _heatmaps(upath(store_path), set_name, cfg, model=model, classes=classes)


def _heatmaps(store_path: Path, set_name: str, cfg: PipelineConfig, *, model: str | None,
              classes: list[str] | None) -> list[Path]:
    store, name = open_scored_store(store_path, model)
    if set_name is None:
        set_name = only_score_set(store, name)
    probs, _, attrs = store.scores(name, set_name)
    class_names = list(attrs["classes"])
    wanted = classes or class_names
    unknown = [c for c in wanted if c not in class_names]
    if unknown:
        raise ConfigError(f"score set {set_name!r} has no class {unknown[0]!r} (classes: {', '.join(class_names)})")
    t = store.tiling
    tissue = store.group["tissue"].attrs
    thumb, mask = store.thumbnail(), store.mask()
    h = cfg.heatmap
    slide = store.slide["name"]
    out = _out_dir(store) / "heatmaps" / model_key(name) / model_key(set_name)
    written = []
    for c in wanted:
        i = class_names.index(c)
        grid = probability_grid(store.grid(), probs[:, i], t["grid_shape"], t["overlap"])
        grid = smooth_grid(grid, h.smoothing_tiles)
        vmap = grid_to_thumbnail(grid, t["stride_level0"], mask.shape, tissue["downsample"])
        vmin, vmax = value_range(vmap, mask, h.scale)
        img = overlay(thumb, mask, vmap, h.colormap, h.alpha, vmin, vmax)
        title = f"{slide}: P({c})  [{set_name}, {name}]"
        label = f"P({c})"
        if h.scale == "auto":
            title += "\ncolours stretched to this slide's range: not comparable across slides"
            label = f"P({c}), auto scale {vmin:.3g}-{vmax:.3g}"
        title = random_weights_title(title, bool(store.embedding_attrs(name).get("random_weights")))
        written.append(render_png(img, out / f"{slide}_{model_key(c)}{_scale_suffix(h.scale)}.png", title,
                                  h.colormap, label, vmin, vmax, mm_per_px=thumbnail_mm_per_px(store)))
    written.append(tiles_geojson(store.coords(), t["tile_extent_level0"], probs, class_names,
                                 out / f"{slide}.geojson", name=f"{slide} {set_name}"))
    # written last: the pictures above are whole and were drawn from this version of the set
    write_text(heatmap_record(out, slide, h.scale), json.dumps({
        "write_id": attrs.get("write_id"), "classes": list(wanted), "files": [p.name for p in written],
        "settings": h.model_dump(mode="json")}, indent=1))
    return written


def _scale_suffix(scale: str) -> str:
    """What a colour scale adds to heatmap file names: nothing for ``fixed``, ``_auto`` for ``auto``."""
    return "" if scale == "fixed" else f"_{scale}"


def heatmap_record(folder: Path, slide: str, scale: str = "fixed") -> Path:
    """``<slide_id>.heatmaps.json`` (``<slide_id>_auto.heatmaps.json`` for the auto scale) beside a
    slide's heatmaps: what they were drawn from."""
    return upath(folder) / f"{slide}{_scale_suffix(scale)}.heatmaps.json"


def _kind(store: SlideStore, model: str, set_name: str) -> str | None:
    """A score set's kind (``zeroshot``, ``fewshot``, ``clusters``); None for a damaged set (its
    error comes when it is read). Through the store's pointer: a set at a URL may be stored under
    another name (docs/FORMAT.md)."""
    try:
        return store.score_attrs(model, set_name).get("kind")
    except StoreError:
        return None


def only_score_set(store: SlideStore, model: str) -> str:
    """The name of the store's one score set of ``model`` (cluster sets left aside), else an error
    naming the sets as ``--set`` takes them."""
    sets = [sk for _, sk in store.score_sets(model) if _kind(store, model, sk) != "clusters"]
    if len(sets) == 1:
        return sets[0]
    if not sets:
        raise StoreError(f"has no score sets for model {model!r}", path=store.path,
                         hint="Run `slide-clip zeroshot` or `fewshot` first.")
    raise StoreError(f"has {len(sets)} score sets for model {model!r}: {', '.join(sets)}", path=store.path,
                     hint="Choose one with --set.")


def heatmaps_current(store_path: str | Path, set_name: str, cfg: PipelineConfig, *, model: str | None = None) -> bool:
    """Whether a slide's heatmaps of ``set_name`` are all there (every class and the GeoJSON),
    drawn from the store's current version of the set (its ``write_id``) with ``cfg``'s settings.

    A run that stopped after scoring and before the heatmaps, a picture lost or deleted, or
    a set scored again since: False (draw them again).
    """
    try:
        store, name = open_scored_store(upath(store_path), model)
        attrs = store.score_attrs(name, set_name)
    except SlideClipError:
        return False
    folder = _out_dir(store) / "heatmaps" / model_key(name) / model_key(set_name)
    try:
        rec = json.loads(heatmap_record(folder, store.slide["name"], cfg.heatmap.scale).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(rec, dict) and attrs.get("write_id") is not None
            and rec.get("write_id") == attrs.get("write_id") and rec.get("classes") == list(attrs["classes"])
            and rec.get("settings") == cfg.heatmap.model_dump(mode="json")
            and all((folder / f).is_file() for f in rec.get("files") or [None]))
