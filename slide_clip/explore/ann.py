"""An optional approximate index (FAISS IVF, inner product) built from a cohort's stores.

For cohorts too large to scan per query. The index holds every tile's embedding under a
global id (cohort order: the slide's offset + the row), is trained on a seeded sample and
filled block by block from the stores (memory: the index itself, about ``n × d × 4`` bytes,
plus one block). Beside it a JSON manifest records the stores it was built from (slide ids,
tile counts, model weights); an index that no longer matches the stores is refused.

Files: ``<out>/explore/index/<model>/ivf.faiss`` and ``manifest.json``.

Requires the ``faiss-cpu`` package.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from slide_clip.errors import ConfigError, StoreError
from slide_clip.explore.cohort import Cohort
from slide_clip.store import model_key
from slide_clip.zeroshot import normalize


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ConfigError("approximate search needs the faiss-cpu package",
                          hint="pip install faiss-cpu, or use exact search (the default).") from None
    return faiss


def index_dir(cohort: Cohort) -> Path:
    return cohort.out / "explore" / "index" / model_key(cohort.model)


def _manifest(cohort: Cohort) -> dict:
    return {"model": cohort.model, "weights_sha256": cohort.weights_sha256, "embed_dim": cohort.embed_dim,
            "slides": [[s.slide_id, s.n_tiles, s.store.embedding_attrs(cohort.model).get("finished")]
                       for s in cohort.slides]}


def build_index(cohort: Cohort, nlist: int | None = None, train_size: int = 100_000, seed: int = 0,
                rows: int | None = None) -> Path:
    """Build and save an IVF-Flat inner-product index of every tile; returns its path.

    ``nlist`` (inverted lists) defaults to about ``4 * sqrt(n)``; the coarse quantizer is
    trained on a seeded sample of ``train_size`` tiles stratified by slide.
    """
    faiss = _faiss()
    n, d = cohort.n_tiles, cohort.embed_dim
    nlist = int(nlist or max(1, min(65536, round(4 * math.sqrt(n)))))
    nlist = max(1, min(nlist, n))
    _, _, train = cohort.sample(total=max(train_size, nlist * 39) if n > train_size else None, seed=seed)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(train, np.float32))
    offsets = cohort.offsets
    for i, start, block in cohort.iter_blocks(rows):
        ids = np.arange(offsets[i] + start, offsets[i] + start + len(block), dtype=np.int64)
        index.add_with_ids(np.ascontiguousarray(block), ids)
    from slide_clip.storage.objects import replace_file, write_text

    d_out = index_dir(cohort)
    with replace_file(d_out / "ivf.faiss") as tmp:  # each file whole; the manifest last
        faiss.write_index(index, str(tmp))
    write_text(d_out / "manifest.json", json.dumps({**_manifest(cohort), "nlist": nlist, "seed": seed,
                                                    "train_size": int(len(train))}, indent=1))
    return d_out / "ivf.faiss"


def load_index(cohort: Cohort):
    """The saved index of this cohort; refuses one built from other stores or weights."""
    faiss = _faiss()
    d = index_dir(cohort)
    if not (d / "ivf.faiss").is_file():
        raise StoreError("has no approximate index", path=d, hint="Build it with --build-index.")
    m = json.loads((d / "manifest.json").read_text())
    now = _manifest(cohort)
    if {k: m.get(k) for k in now} != now:
        raise StoreError("is out of date: the stores changed since it was built", path=d,
                         hint="Rebuild it with --build-index.")
    from slide_clip.storage.objects import read_bytes
    from slide_clip.storage.urls import is_url

    if not is_url(d):
        return faiss.read_index(str(d / "ivf.faiss"))
    return faiss.deserialize_index(np.frombuffer(read_bytes(d / "ivf.faiss"), np.uint8))  # faiss reads local files only


def search_index(cohort: Cohort, index, queries: np.ndarray, top: int = 20, nprobe: int = 16):
    """Approximate top ``top`` per query: ``(scores, slide, row)`` like :func:`search_exact`."""
    q = np.ascontiguousarray(normalize(np.asarray(queries, np.float32).reshape(-1, cohort.embed_dim)), np.float32)
    index.nprobe = int(nprobe)
    scores, ids = index.search(q, int(top))
    offsets = cohort.offsets
    slide = np.searchsorted(offsets, np.maximum(ids, 0), side="right") - 1
    row = np.maximum(ids, 0) - offsets[slide]
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    return scores, slide.astype(np.int64), row.astype(np.int64)
