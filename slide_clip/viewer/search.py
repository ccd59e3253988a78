"""Search from the page: text, or "more like this tile", over the whole cohort (exact).

The explore search, unchanged: queries from :mod:`slide_clip.explore.queries` (text through
the zero-shot prompt machinery; a stored tile's own embedding, never re-encoded), ranked by
:func:`slide_clip.explore.search.search_exact`, tabled by
:func:`slide_clip.explore.search.hits_table`. The text encoder stays loaded between queries
(one :class:`~slide_clip.encoders.cache.EncoderCache`), and text embeddings are cached in a folder of
this process, not in the output folder (the viewer writes nothing there but labels and score
sets).
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

from slide_clip.explore.cohort import Cohort


class Searcher:
    """Exact cohort search for the viewer; the cohort is opened on first use."""

    def __init__(self, out, cfg, model: str | None = None):
        self.out, self.cfg, self.model = out, cfg, model  # a Path, or a UPath of a URL
        self._cohort: Cohort | None = None
        self._pool = None
        self._lock = threading.Lock()
        self._cache = tempfile.TemporaryDirectory(prefix="slide-clip-view-")

    def cohort(self) -> Cohort:
        with self._lock:
            if self._cohort is None:
                self._cohort = Cohort.open([self.out], self.model, out=Path(self._cache.name))
            return self._cohort

    def refresh(self) -> None:
        with self._lock:
            self._cohort = None

    def _encoders(self, cohort: Cohort):
        from slide_clip.encoders.cache import EncoderCache

        with self._lock:
            if self._pool is None:
                cfg = self.cfg
                if cfg.encode.checkpoint and cfg.encode.model != cohort.model:
                    cfg = cfg.with_overrides(encode={"model": cohort.model})
                self._pool = EncoderCache(cfg)
                # load the model as the stores recorded it (architecture, weights file, seed), as
                # zeroshot does: no --models or --checkpoint needed while the weights stay put
                first = cohort.slides[0]
                self._pool.for_store(cohort.model, cohort.weights_sha256, first.path,
                                     first.store.embedding_attrs(cohort.model))
            return self._pool

    def text(self, text: str, top: int) -> list[dict]:
        from slide_clip.explore.queries import text_queries

        c = self.cohort()
        [q] = text_queries(c, [text], self.cfg, encoders=self._encoders(c))
        return self._ranked(c, q, top)

    def tile(self, slide_id: str, x: int, y: int, top: int) -> list[dict]:
        from slide_clip.explore.queries import tile_queries

        c = self.cohort()
        [q] = tile_queries(c, [(slide_id, x, y)])
        return self._ranked(c, q, top)

    @staticmethod
    def _ranked(cohort: Cohort, query, top: int) -> list[dict]:
        from slide_clip.explore.search import hits_table, search_exact

        scores, slide, row = search_exact(cohort, query.vector[None, :], top=top)
        t = hits_table(cohort, [query.name], scores, slide, row)
        return [{"rank": int(r.rank), "slide_id": str(r.slide_id), "tile": int(r.tile), "x": int(r.x),
                 "y": int(r.y), "score": float(r.score)} for r in t.itertuples()]

    def close(self) -> None:
        self._cache.cleanup()
