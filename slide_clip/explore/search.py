"""Exact nearest-tile search over a cohort's stores, streamed chunk by chunk.

Scores are cosines: stored embeddings are L2-normalised and queries are normalised here, so
``score = tile · query``. The search keeps, per query, the best ``top`` tiles seen so far
and merges each block's best candidates into them (a partial sort, ``numpy.argpartition``),
so memory is one block plus ``queries × top`` whatever the cohort's size.

Ties are broken by cohort order (slide, then row), so a ranking is reproducible and equals
a direct sort of the full score matrix by (−score, slide, row); only exactly equal scores
straddling a block's cut-off (its n-th best) may be kept out of that order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from slide_clip.explore.cohort import Cohort
from slide_clip.zeroshot import normalize


class TopN:
    """The ``n`` highest scores per query, merged block by block.

    Parameters
    ----------
    n_queries, n : int
        Number of queries (columns of every score block) and hits kept per query.
    """

    def __init__(self, n_queries: int, n: int):
        self.n = int(n)
        self.scores = np.full((n_queries, 0), -np.inf, np.float32)
        self.slide = np.zeros((n_queries, 0), np.int64)
        self.row = np.zeros((n_queries, 0), np.int64)

    def update(self, scores: np.ndarray, slide: int | np.ndarray, rows: np.ndarray) -> None:
        """Merge a block: ``scores`` (k, n_queries) for tiles ``rows`` (k,) of ``slide``.

        ``slide`` is one index for the whole block or a (k,) array. Scores of ``-inf`` are
        never kept (a tile excluded from a query).
        """
        s = np.asarray(scores, np.float32).T  # (q, k)
        q, k = s.shape
        if k == 0:
            return
        sl = np.broadcast_to(np.asarray(slide, np.int64), (k,))
        rows = np.asarray(rows, np.int64)
        if k > self.n:  # only a block's own best n can enter the top n
            part = np.argpartition(-s, self.n - 1, axis=1)[:, : self.n]
            s = np.take_along_axis(s, part, axis=1)
            cand_slide, cand_row = sl[part], rows[part]
        else:
            cand_slide = np.broadcast_to(sl, (q, k))
            cand_row = np.broadcast_to(rows, (q, k))
        all_s = np.concatenate([self.scores, s], axis=1)
        all_sl = np.concatenate([self.slide, cand_slide], axis=1)
        all_r = np.concatenate([self.row, cand_row], axis=1)
        keep = min(self.n, all_s.shape[1])
        # exact order among candidates: score desc, then slide, then row (reproducible ties)
        order = np.lexsort((all_r, all_sl, -all_s), axis=-1)[:, :keep]
        self.scores = np.take_along_axis(all_s, order, axis=1)
        self.slide = np.take_along_axis(all_sl, order, axis=1)
        self.row = np.take_along_axis(all_r, order, axis=1)

    def result(self):
        """``(scores, slide, row)``, each (n_queries, ≤ n), best first; ``-inf`` entries dropped per query."""
        return self.scores, self.slide, self.row


def search_exact(cohort: Cohort, queries: np.ndarray, top: int = 20, rows: int | None = None):
    """Rank every tile of the cohort by cosine with each query; keep the ``top`` best.

    Parameters
    ----------
    cohort : Cohort
    queries : (q, d) array
        Query embeddings in the model's joint space (normalised here).
    top : int
        Hits kept per query.
    rows : int, optional
        Rows read per block (default: one Zarr chunk, 2048 rows).

    Returns
    -------
    (scores, slide, row) : three (q, top) arrays, best first.
    """
    q = normalize(np.asarray(queries, np.float32).reshape(-1, cohort.embed_dim)).astype(np.float32)
    best = TopN(len(q), top)
    for i, start, block in cohort.iter_blocks(rows):
        best.update(block @ q.T, i, np.arange(start, start + len(block)))
    return best.result()


def hits_table(cohort: Cohort, names: list[str], scores, slide, row) -> pd.DataFrame:
    """A table of hits: ``query, rank, slide_id, tile, x, y, score``.

    ``tile`` is the row in the slide's store; ``x, y`` its level-0 top-left corner; ``score``
    the cosine with the query. Rows with a ``-inf`` score (no hit) are left out.
    """
    coords: dict[int, np.ndarray] = {}
    out = []
    for qi, name in enumerate(names):
        for rank, (sc, si, r) in enumerate(zip(scores[qi], slide[qi], row[qi]), start=1):
            if not np.isfinite(sc):
                continue
            si = int(si)
            if si not in coords:
                coords[si] = cohort.coords(si)
            x, y = coords[si][int(r)]
            out.append({"query": name, "rank": rank, "slide_id": cohort.slides[si].slide_id, "tile": int(r),
                        "x": int(x), "y": int(y), "score": float(sc)})
    cols = ["query", "rank", "slide_id", "tile", "x", "y", "score"]
    return pd.DataFrame(out, columns=cols)
