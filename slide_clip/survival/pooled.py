"""Pooled tables: one row per slide and one per patient (pandas, written as Parquet).

Columns: ``slide_id`` or ``patient_id`` (and ``slide_ids`` of a patient), ``n_tiles``,
``tissue_area_mm2`` (sum over a patient's slides), ``emb_mean_<j>`` (mean tile embedding,
j = 0..d-1; a patient's over all its tiles), optionally ``emb_max_<j>`` (element-wise
max), and for every score set asked for (default: every set stored in all slides), per class:
``<set>__slide_prob__<class>``, ``<set>__mean_prob__<class>`` and ``<set>__area_fraction__<class>``
(:func:`slide_clip.aggregate.metric_column`: letters, digits and ``_`` only)
(:func:`slide_clip.aggregate.slide_scores`, a patient's computed over all its tiles).
Embeddings are read one store chunk at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from slide_clip.aggregate import metric_column, slide_scores
from slide_clip.errors import StoreError
from slide_clip.storage.filesystems import upath
from slide_clip.store import SlideStore, model_key
from slide_clip.survival.bags import PatientCohort

SCORE_METRICS = ("slide_prob", "mean_prob", "area_fraction")


def _shared_score_sets(cohort: PatientCohort) -> list[str]:
    sets = None
    for sid in cohort.stores:
        have = {s for m, s in cohort.open(sid).score_sets(cohort.model)}
        sets = have if sets is None else sets & have
    return sorted(sets or ())


def embedding_columns(d: int, kind: str = "mean") -> list[str]:
    return [f"emb_{kind}_{j}" for j in range(d)]


class _Accumulator:
    def __init__(self, d: int):
        self.sum = np.zeros(d, np.float64)
        self.max = np.full(d, -np.inf, np.float32)
        self.n = 0
        self.area = 0.0
        self.probs: dict[str, list] = {}
        self.logits: dict[str, list] = {}
        self.tissue: list[np.ndarray] = []
        self.classes: dict[str, list[str]] = {}


def _read_slide(store: SlideStore, model: str, sets: list[str], acc: _Accumulator) -> None:
    for _, block in store.iter_embeddings(model):
        acc.sum += block.sum(axis=0, dtype=np.float64)
        if len(block):
            acc.max = np.maximum(acc.max, block.max(axis=0))
        acc.n += len(block)
    if acc.n != store.n_tiles:
        raise StoreError(f"has {acc.n} embedding rows for {store.n_tiles} tiles", path=store.path)
    acc.area += float(store.group["tissue"].attrs.get("tissue_area_mm2") or 0.0)
    acc.tissue.append(store.tissue_fraction())
    for s in sets:
        probs, logits, attrs = store.scores(model, s)
        acc.probs.setdefault(s, []).append(probs)
        acc.logits.setdefault(s, []).append(logits)
        acc.classes.setdefault(s, list(attrs["classes"]))
        if list(attrs["classes"]) != acc.classes[s]:
            raise StoreError(f"score set {s!r} has other classes ({', '.join(attrs['classes'])}) than in the other "
                             f"slides ({', '.join(acc.classes[s])})", path=store.path,
                             hint="Score every slide with the same prompt set again.")


def _row(acc: _Accumulator, d: int, with_max: bool, topk: int, decision: str) -> dict:
    row: dict = {"n_tiles": acc.n, "tissue_area_mm2": acc.area}
    mean = acc.sum / acc.n if acc.n else np.full(d, np.nan)
    row.update(zip(embedding_columns(d, "mean"), mean.astype(np.float32)))
    if with_max:
        mx = acc.max if acc.n else np.full(d, np.nan, np.float32)
        row.update(zip(embedding_columns(d, "max"), mx))
    tissue = np.concatenate(acc.tissue) if acc.tissue else np.zeros(0, np.float32)
    for s, parts in acc.probs.items():
        classes = acc.classes[s]
        sc = slide_scores(np.concatenate(parts), np.concatenate(acc.logits[s]), tissue, classes, topk=topk,
                          decision=decision)
        for metric in SCORE_METRICS:
            for c in classes:
                row[metric_column(metric, c, s)] = sc[metric][c]
    return row


def _named_score_sets(cohort: PatientCohort, names) -> list[str]:
    """The keys of the named score sets; a slide without one of them is an error naming it."""
    keys = [model_key(n) for n in names]
    for sid in cohort.stores:
        st = cohort.open(sid)
        have = {s for _, s in st.score_sets(cohort.model)}
        for name, key in zip(names, keys):
            if key not in have:
                raise StoreError(f"has no score set {name!r} of model {cohort.model!r} (it has: "
                                 f"{', '.join(sorted(have)) or 'none'})", path=st.path,
                                 hint="Score every slide with that set first (`slide-clip zeroshot`, `fewshot` or "
                                      "`cluster`), or leave it out of --set.")
    return keys


def pooled_tables(cohort: PatientCohort, *, with_max: bool = False, topk: int = 50, decision: str = "topk",
                  score_sets: list[str] | tuple[str, ...] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(slides, patients) tables of the cohort (see the module docstring for the columns).

    ``score_sets``: exactly these score sets (every slide must have them); default (None)
    every set that all slides have.
    """
    d = cohort.embed_dim
    sets = _shared_score_sets(cohort) if score_sets is None else _named_score_sets(cohort, list(score_sets))
    slide_rows, per_slide = [], {}
    for sid in cohort.stores:
        acc = _Accumulator(d)
        _read_slide(cohort.open(sid), cohort.model, sets, acc)
        per_slide[sid] = acc
        slide_rows.append({"slide_id": sid, "patient_id": cohort.patient_of(sid),
                           **_row(acc, d, with_max, topk, decision)})
    patient_rows = []
    for pid, sids in cohort.patients.items():
        acc = _Accumulator(d)
        for sid in sids:
            a = per_slide[sid]
            acc.sum += a.sum
            acc.max = np.maximum(acc.max, a.max)
            acc.n += a.n
            acc.area += a.area
            acc.tissue += a.tissue
            for s in sets:
                acc.probs.setdefault(s, []).extend(a.probs[s])
                acc.logits.setdefault(s, []).extend(a.logits[s])
                acc.classes[s] = a.classes[s]
        patient_rows.append({"patient_id": pid, "slide_ids": ";".join(sids), "n_slides": len(sids),
                             **_row(acc, d, with_max, topk, decision)})
    return pd.DataFrame(slide_rows), pd.DataFrame(patient_rows)


def write_pooled_tables(cohort: PatientCohort, folder: str | Path | None = None, **kwargs) -> tuple[Path, Path]:
    """Write ``slides.parquet`` and ``patients.parquet`` into ``folder``
    (default ``out/tables/<model>/``, beside the cluster compositions); returns their paths."""
    from slide_clip.storage.objects import replace_file
    from slide_clip.output import BESIDE_STORES, output_errors

    folder = upath(folder) if folder else cohort.out / "tables" / model_key(cohort.model)
    slides, patients = pooled_tables(cohort, **kwargs)
    sp, pp = folder / "slides.parquet", folder / "patients.parquet"
    with output_errors(folder, BESIDE_STORES), replace_file(sp) as ts, replace_file(pp) as tp:
        slides.to_parquet(ts, index=False)
        patients.to_parquet(tp, index=False)
    return sp, pp
