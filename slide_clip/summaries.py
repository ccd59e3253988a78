"""Slide summaries and cohort tables, checked against the stores they describe.

A slide's summary (``out/summaries/<model>/<set>/<slide_id>.json``) is written by scoring
once its score set is in the store, and names that set's ``write_id``. ``summarize`` never
trusts a summary alone: for each slide it opens the store ``out/<slide_id>.zarr``, reads the
score set (every chunk checked) and recomputes the slide's numbers from it. A store that is
missing or damaged, a set that is not the one the summary was made from (another
``write_id``: scored again, or a run stopped between the two writes), or numbers that differ,
make a ``failed`` row with its error; the numbers of an ``ok`` row are the store's.

Paths in summaries and tables are relative to the output folder (the ``store`` column is
``<slide_id>.zarr``), so a table stays right when the folder is moved or copied.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slide_clip.aggregate import cohort_table, slide_scores, write_cohort_table
from slide_clip.storage.filesystems import upath
from slide_clip.storage.objects import write_text
from slide_clip.errors import ConfigError, SlideClipError, StoreError
from slide_clip.output import BESIDE_STORES, output_errors
from slide_clip.store import STORE_SUFFIX, SlideStore, model_key
from slide_clip.results import read_status as read_slide_status

#: The per-class numbers of a summary, recomputed from the store by ``summarize``.
METRICS = ("mean_prob", "area_fraction", "topk_logit", "slide_prob")


def summary_path(out: Path, model: str, set_name: str, slide: str) -> Path:
    return upath(out) / "summaries" / model_key(model) / model_key(set_name) / f"{slide}.json"


def store_ref(path: str | Path) -> str:
    """A store's path as summaries and tables record it: relative to the output folder."""
    return upath(path).name


def write_summary(out: Path, summary: dict) -> Path:
    """Write a slide's summary atomically (a reader sees the old one or the new one)."""
    p = summary_path(out, summary["model"], summary["score_set"], summary["slide_id"])
    return write_text(p, json.dumps(summary, indent=1))


def read_status(out: Path, slide: str) -> dict:
    """``out/status/<slide>.json`` (what embedding or a flow did to the slide), or {}."""
    return read_slide_status(out, slide) or {}


def _same(a, b) -> bool:
    try:
        return bool(np.isclose(float(a), float(b), rtol=1e-7, atol=1e-9, equal_nan=True))
    except (TypeError, ValueError):
        return False


def check_summary(out: Path, summary: dict, mk: str, sk: str) -> dict:
    """The summary of an ``ok`` slide checked against its store (see the module text).

    Returns the summary (``store`` relative to ``out``), or a ``failed`` row naming what
    does not hold.
    """
    sid = summary["slide_id"]
    path = upath(out) / f"{sid}{STORE_SUFFIX}"
    if summary.get("status") != "ok":  # a failed slide has a store only if it failed after embedding
        return {**summary, "store": store_ref(summary["store"]) if summary.get("store") else None}
    s = {**summary, "store": store_ref(path)}
    again = "Run the scoring command (`slide-clip zeroshot` or `fewshot`) on it again."
    try:
        if not (path / "zarr.json").is_file():
            raise StoreError("is missing (deleted, or moved out of the output folder)", path=path,
                             hint="Restore it, or embed and score the slide again.")
        store = SlideStore.open(path)
        store.check_tiles()
        probs, logits, attrs = store.scores(mk, sk)
        want = s.get("scores_write_id")
        if want is not None and attrs.get("write_id") != want:
            raise StoreError(f"holds another version of score set {sk!r} than its summary describes (it was "
                             "scored again, or a run stopped between the two)", path=path, hint=again)
        classes = list(attrs["classes"])
        if classes != list(s.get("classes") or classes):
            raise StoreError(f"score set {sk!r} has classes {classes}, its summary {s.get('classes')}", path=path,
                             hint=again)
        if int(s.get("n_tiles") or 0) != len(probs):
            raise StoreError(f"has {len(probs)} tiles in score set {sk!r}, its summary {s.get('n_tiles')}",
                             path=path, hint=again)
        agg = slide_scores(probs, logits, store.tissue_fraction(), classes, topk=max(1, int(s.get("k") or 1)),
                           decision=s.get("decision") or "topk")
        for metric in METRICS:
            for c in classes:
                a, b = agg[metric][c], (s.get(metric) or {}).get(c)
                if not _same(a, b):
                    raise StoreError(f"score set {sk!r} does not match its summary ({metric} of {c}: {a:.6g} in "
                                     f"the store, {b} in the summary)", path=path, hint=again)
        if agg["predicted"] != s.get("predicted"):
            raise StoreError(f"score set {sk!r} predicts {agg['predicted']!r}, its summary {s.get('predicted')!r}",
                             path=path, hint=again)
    except SlideClipError as e:
        return {"slide_id": sid, "status": "failed", "error": str(e), "slide": s.get("slide"),
                "store": store_ref(path), "n_tiles": s.get("n_tiles"), "model": s.get("model"),
                "score_set": s.get("score_set"), "kind": s.get("kind"), "seconds": s.get("seconds")}
    return s


def score_set_pairs(out_dir: str | Path, *, set_name: str | None = None,
                    model: str | None = None) -> list[tuple[str, str]]:
    """The (model key, score set key) pairs with slide summaries in ``out/summaries/``."""
    root = upath(out_dir) / "summaries"
    pairs = sorted({(p.parent.parent.name, p.parent.name) for p in root.glob("*/*/*.json")}) if root.is_dir() else []
    if model:
        pairs = [pr for pr in pairs if pr[0] == model_key(model)]
    if set_name:
        pairs = [pr for pr in pairs if pr[1] == model_key(set_name)]
    return pairs


def summarize(out_dir: str | Path, *, set_name: str | None = None, model: str | None = None,
              metadata: dict[str, dict] | None = None, only: list[str] | None = None):
    """Gather per-slide summaries (and slides that failed to embed) into one cohort table.

    Every ``ok`` summary is checked against its store (see the module text). ``metadata``
    maps slide ids to extra columns (patient id, ...); ``only`` keeps just these slide ids.
    Writes ``out/cohort-<set>-<model>.csv`` and ``.parquet``; returns (table, csv,
    parquet). An output folder with several score sets (or models) needs ``set_name`` (and
    ``model``); :func:`summarize_all` writes one table for each.
    """
    out = upath(out_dir)
    pairs = score_set_pairs(out, set_name=set_name, model=model)
    if not pairs:
        raise StoreError("has no slide summaries" + (f" for {set_name!r}" if set_name else ""), path=out,
                         hint="Run `slide-clip zeroshot` or `fewshot` on it first.")
    if len(pairs) > 1:
        listed = ", ".join(f"{s} ({m})" for m, s in pairs)
        raise ConfigError(f"{out} has several score sets: {listed}", hint="Choose with --set and --model.")
    return _summarize_pair(out, *pairs[0], metadata=metadata, only=only)


def summarize_all(out_dir: str | Path, *, set_name: str | None = None, model: str | None = None,
                  metadata: dict[str, dict] | None = None, only: list[str] | None = None):
    """One cohort table per score set and model in ``out`` (optionally only those named).

    Returns a list of (model key, set key, table, csv, parquet).
    """
    out = upath(out_dir)
    pairs = score_set_pairs(out, set_name=set_name, model=model)
    if not pairs:
        raise StoreError("has no slide summaries" + (f" for {set_name!r}" if set_name else "")
                         + (f" of model {model!r}" if model else ""), path=out,
                         hint="Run `slide-clip zeroshot` or `fewshot` on it first.")
    return [(mk, sk, *_summarize_pair(out, mk, sk, metadata=metadata, only=only)) for mk, sk in pairs]


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _summarize_pair(out: Path, mk: str, sk: str, *, metadata=None, only=None):
    summaries = []
    for p in sorted((out / "summaries" / mk / sk).glob("*.json")):
        s = _read_json(p)
        if s is None or "slide_id" not in s:
            sid = p.stem
            s = {"slide_id": sid, "status": "failed", "model": mk, "score_set": sk,
                 "error": f"{p}: the slide's summary cannot be read. Run the scoring command on it again."}
        summaries.append(s)
    have = {s["slide_id"] for s in summaries}
    for p in sorted((out / "status").glob("*.json")) if (out / "status").is_dir() else []:
        st = _read_json(p) or {}
        if st.get("status") == "failed" and st.get("name") and st.get("name") not in have:
            summaries.append({"slide_id": st["name"], "status": "failed", "error": st.get("error"),
                              "slide": st.get("slide"), "store": st.get("store"), "n_tiles": st.get("n_tiles"),
                              "score_set": sk, "model": mk, "seconds": st.get("seconds")})
    if only is not None:
        keep = set(only)
        summaries = [s for s in summaries if s["slide_id"] in keep]
    rows = []
    for s in summaries:
        s = check_summary(out, s, mk, sk)
        # the status file is the latest record of the slide: how long its embedding took, and
        # for a slide that failed at scoring, its tile count
        st = read_status(out, s["slide_id"])
        embed = (st.get("extra") or {}).get("seconds_embed")
        if embed is not None:
            s["seconds_embed"] = embed
        if s.get("n_tiles") is None and st.get("n_tiles") is not None:
            s["n_tiles"] = st["n_tiles"]
        if s.get("store") is None and st.get("store"):  # failed at scoring: the store embed made
            s["store"] = store_ref(st["store"])
        s.setdefault("seconds_embed", None)
        s.update((metadata or {}).get(s["slide_id"], {}))
        rows.append(s)
    df = cohort_table(rows)
    with output_errors(out, BESIDE_STORES):
        csv_path, parquet_path = write_cohort_table(df, out / f"cohort-{sk}-{mk}")
    return df, csv_path, parquet_path
