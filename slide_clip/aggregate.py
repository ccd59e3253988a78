"""Slide-level aggregation of tile scores, and cohort tables (pandas)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from slide_clip.zeroshot import softmax


def slide_scores(
    probs: np.ndarray,
    logits: np.ndarray,
    tissue_fraction: np.ndarray,
    class_names: list[str],
    *,
    topk: int = 50,
    decision: str = "topk",
) -> dict:
    """Per-class slide scores and the predicted label.

    Returns a dict with, per class: ``mean_prob`` (mean tile probability), ``area_fraction``
    (share of the tissue area, weighting each tile by its tissue fraction, whose tiles' top
    class is this class), ``topk_logit`` (mean of the k highest tile logits; k = ``topk``,
    or every tile when there are fewer) and ``slide_prob`` (softmax of the top-k logits over
    classes: logits already carry the model's logit scale). ``predicted`` is the class
    with the highest ``decision`` score (``topk`` → slide_prob, ``mean`` → mean_prob,
    ``area`` → area_fraction); None for a slide without tiles.
    """
    n, c = probs.shape if probs.ndim == 2 else (0, len(class_names))
    if n == 0:
        nan = {k: float("nan") for k in class_names}
        return {"mean_prob": nan, "area_fraction": dict(nan), "topk_logit": dict(nan), "slide_prob": dict(nan),
                "predicted": None, "k": 0, "decision": decision}
    mean_prob = probs.mean(axis=0)
    top = probs.argmax(axis=1)
    w = np.asarray(tissue_fraction, np.float64)
    area = np.array([w[top == i].sum() for i in range(c)]) / max(w.sum(), 1e-12)
    k = min(topk, n)
    topk_logit = np.sort(logits, axis=0)[-k:].mean(axis=0)
    slide_prob = softmax(topk_logit[None, :])[0]
    decide = {"topk": slide_prob, "mean": mean_prob, "area": area}[decision]

    def named(v):
        return {name: float(x) for name, x in zip(class_names, v)}

    return {"mean_prob": named(mean_prob), "area_fraction": named(area), "topk_logit": named(topk_logit),
            "slide_prob": named(slide_prob), "predicted": class_names[int(np.argmax(decide))], "k": int(k),
            "decision": decision}


#: How list values (a score set's ``classes``) are written in a table cell.
LIST_SEPARATOR = ";"
#: Between the parts of a table column's name (``mean_prob__normal_epithelium``); never inside a part.
COLUMN_SEPARATOR = "__"


def column_key(name) -> str:
    """A class, set or metric name as part of a table column: letters and digits, every other
    run of characters one ``_`` (``normal epithelium`` -> ``normal_epithelium``, ``non-tumour``
    -> ``non_tumour``), so columns are plain identifiers in pandas, R, SQL and spreadsheets."""
    return re.sub(r"[^A-Za-z0-9]+", "_", str(name)).strip("_") or "_"


def metric_column(metric: str, cls, *prefix) -> str:
    """The column of a per-class metric: ``<metric>__<class>`` (``<set>__<metric>__<class>``
    with a set as ``prefix``), each part a :func:`column_key`."""
    return COLUMN_SEPARATOR.join(column_key(p) for p in (*prefix, metric, cls))


def check_column_keys(names, what: str = "classes", path=None) -> None:
    """Two names that would share a table column (``a b`` and ``a-b``) are an error naming them."""
    from slide_clip.errors import ConfigError

    seen: dict[str, str] = {}
    for n in names:
        k = column_key(n)
        if k in seen and seen[k] != n:
            raise ConfigError(f"{what} {seen[k]!r} and {n!r} would share the table column name {k!r}", path=path,
                              hint="Rename one of them (table columns keep letters and digits, and join the rest "
                                   "with _).")
        seen[k] = n


def summary_row(summary: dict) -> dict:
    """Flatten a per-slide summary JSON into one table row.

    Per-class metrics become ``<metric>__<class>`` columns (:func:`metric_column`); lists
    (``classes``) become one string joined by ``;`` (never a Python list repr in a CSV cell).
    """
    row = {k: (LIST_SEPARATOR.join(map(str, v)) if isinstance(v, (list, tuple)) else v)
           for k, v in summary.items() if not isinstance(v, dict)}
    for metric in ("mean_prob", "area_fraction", "slide_prob", "topk_logit"):
        values = summary.get(metric) or {}
        check_column_keys(values)
        for cls, v in values.items():
            row[metric_column(metric, cls)] = v
    return row


def cohort_table(summaries: list[dict]) -> pd.DataFrame:
    """One row per slide (failed slides included, with their error), sorted by slide id."""
    rows = [summary_row(s) for s in summaries]
    df = pd.DataFrame(rows)
    if "slide_id" in df:
        df = df.sort_values("slide_id", kind="stable").reset_index(drop=True)
    return df


def write_cohort_table(df: pd.DataFrame, stem: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` and ``<stem>.parquet``, each replaced atomically: both are written
    under temporary names first, then renamed into place (each file is whole, old or new)."""
    from slide_clip.storage.objects import replace_file
    from slide_clip.faults import kill_point

    from slide_clip.storage.filesystems import upath

    stem = upath(stem)
    csv, parquet = stem.with_suffix(".csv"), stem.with_suffix(".parquet")
    with replace_file(csv) as tmp_csv, replace_file(parquet) as tmp_parquet:
        df.to_csv(tmp_csv, index=False)
        kill_point("cohort-csv")
        df.to_parquet(tmp_parquet, index=False)
    return csv, parquet


def read_json(path: Path) -> dict:
    from slide_clip.storage.filesystems import upath

    return json.loads(upath(path).read_text())
