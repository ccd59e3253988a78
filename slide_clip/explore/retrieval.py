"""Text and image search of a cohort: queries → ranked tiles → a table and galleries.

Outputs (``<out>`` is the stores' folder)::

    <out>/explore/search/<name>/hits.csv, hits.parquet   query, rank, slide_id, tile, x, y, score
    <out>/explore/search/<name>/gallery-<query>.png       the top tiles of each query, labelled (named after it)
    <out>/explore/search/<name>/gallery.html              every query's tiles on one page
    <out>/explore/search/<name>/queries.json              what each query was (texts, tile, image)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from slide_clip.storage.objects import replace_file, write_text
from slide_clip.explore.cohort import Cohort
from slide_clip.explore.gallery import table_galleries
from slide_clip.explore.queries import load_queries
from slide_clip.explore.search import hits_table, search_exact
from slide_clip.output import BESIDE_STORES, output_errors


def _default_name(names: list[str]) -> str:
    s = "+".join(names)
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")
    return (s[:60] or "query")


def search(stores, cfg, *, texts=(), images=(), tiles=(), prompts=None, raw: bool = False, model=None,
           top: int = 20, name: str | None = None, approximate: bool = False, build_index: bool = False,
           nprobe: int = 16, gallery: bool = True, html_page: bool = True, columns: int = 8,
           thumb: int = 128) -> dict:
    """Search a cohort's tiles with words, image files or stored tiles; write table and galleries.

    Parameters
    ----------
    stores : list of paths
        Stores or folders of stores (``slide-clip embed`` output).
    cfg : PipelineConfig
        Text/image encoder source (only loaded for text not yet cached, and for image files).
    texts, images, tiles
        Text queries; image files; stored tiles as ``SLIDE:X:Y`` strings or (slide, x, y),
        level-0 pixels.
    top : int
        Tiles kept per query.
    approximate, build_index, nprobe
        Use the FAISS index (built first with ``build_index``) instead of exact search.

    Returns
    -------
    dict with ``table`` (DataFrame), ``dir``, ``files`` (paths written), ``failed`` (stores
    that could not be searched, with their errors), ``queries``.
    """
    cohort = Cohort.open(stores, model)
    qs = load_queries(cohort, cfg, texts=texts, images=images, tiles=tiles, prompts=prompts, raw=raw)
    import numpy as np

    vecs = np.stack([q.vector for q in qs])
    if approximate or build_index:
        from slide_clip.explore import ann

        if build_index:
            with output_errors(cohort.out, BESIDE_STORES):
                ann.build_index(cohort)
        res = ann.search_index(cohort, ann.load_index(cohort), vecs, top, nprobe)
    else:
        res = search_exact(cohort, vecs, top)
    names = [q.name for q in qs]
    table = hits_table(cohort, names, *res)
    out = cohort.out / "explore" / "search" / (name or _default_name(names))
    files = [out / "hits.csv", out / "hits.parquet"]
    with output_errors(cohort.out, BESIDE_STORES):
        with replace_file(files[0]) as tc, replace_file(files[1]) as tp:  # each file whole, old or new
            table.to_csv(tc, index=False)
            table.to_parquet(tp, index=False)
        files.append(write_text(out / "queries.json", json.dumps(
            [{"name": q.name, "kind": q.kind, **q.detail} for q in qs], indent=1)))
        if gallery:
            files += table_galleries(cohort, table, "query", out, "search", "cos", columns, thumb, html_page)
    return {"table": table, "dir": out, "files": files, "failed": cohort.failed, "queries": names,
            "method": "faiss-ivf" if (approximate or build_index) else "exact", "n_tiles": cohort.n_tiles,
            "n_slides": len(cohort.slides)}


def read_hits(path: str | Path) -> pd.DataFrame:
    """Read a ``hits.parquet`` (or ``.csv``) written by :func:`search` (a local path or a URL)."""
    import io

    from slide_clip.storage.objects import read_bytes

    data = io.BytesIO(read_bytes(path))
    return pd.read_parquet(data) if str(path).endswith(".parquet") else pd.read_csv(data)
