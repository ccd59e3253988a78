"""A cohort of stores read together: one model, one set of weights, rows streamed chunk by chunk.

Every explore function reads the stores through :class:`Cohort`: it opens each store with
:func:`slide_clip.scoring.open_scored_store` (tiled, embeddings complete), checks that every
store holds embeddings of the same weights (``weights_sha256``) and dimension, and streams
rows with :meth:`SlideStore.iter_embeddings` (a damaged block raises, never a result).

A tile is addressed by ``(slide index, row)``: the store's position in :attr:`Cohort.slides`
and the tile's row in that store (tile order; ``tiles/coords[row]`` is its level-0 top-left).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slide_clip.errors import ConfigError, SlideClipError, StoreError
from slide_clip.store import SlideStore


@dataclass
class CohortStore:
    """One opened store of a cohort."""

    slide_id: str
    path: Path
    store: SlideStore
    n_tiles: int


@dataclass
class Cohort:
    """Stores that share one model's embeddings.

    Attributes
    ----------
    slides : list of CohortStore
        The usable stores, in the order found (sorted by path within a folder).
    model : str
        The model's registry name (as recorded in the stores).
    weights_sha256 : str
        The weights every store's embeddings were made with.
    embed_dim : int
        Embedding dimension d.
    out : Path
        The folder outputs are written into (the first store's folder).
    failed : list of (path, message)
        Stores that could not be used (partial, damaged, other weights); reported, never read.
    """

    slides: list[CohortStore]
    model: str
    weights_sha256: str
    embed_dim: int
    out: Path
    failed: list[tuple[str, str]] = field(default_factory=list)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, inputs, model: str | None = None, out: str | Path | None = None, *,
             strict: bool = False) -> "Cohort":
        """Open every store in ``inputs`` (stores or folders of stores).

        A store that cannot be used is recorded in :attr:`failed` with its one-line error
        and the others go on; stores whose embeddings come from other weights than the
        first usable store's are refused the same way. Raises :class:`StoreError` when no
        store is usable. ``strict`` (survival's cohorts, where a smaller cohort would be a
        different study) raises the first store's error instead of going on without it.
        """
        from slide_clip.scoring import find_stores, open_scored_store
        from slide_clip.storage.filesystems import upath

        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        paths = find_stores(inputs)
        if not paths:
            raise StoreError("holds no slide stores", path=list(inputs),
                             hint="Run `slide-clip embed` into it first.")
        slides, failed = [], []
        name = sha = dim = None
        seen: dict[str, Path] = {}
        for p in paths:
            try:
                store, n = open_scored_store(upath(p), model)
                a = store.embedding_attrs(n)
                if name is None:
                    name, sha, dim = n, a["weights_sha256"], int(a["embed_dim"])
                elif a["weights_sha256"] != sha or int(a["embed_dim"]) != dim or n != name:
                    raise StoreError(f"holds embeddings of other weights ({n}, {a['weights_sha256'][:12]}…) "
                                     f"than the cohort's first store ({name}, {sha[:12]}…)", path=p,
                                     hint="Use one model's stores at a time (--model), or re-embed the slides "
                                     "with one model.")
                sid = store.slide["name"]
                if sid in seen:
                    raise StoreError(f"has slide id {sid!r} like {seen[sid]}", path=p,
                                     hint="Give each slide's store once.")
                seen[sid] = upath(p)
                slides.append(CohortStore(sid, upath(p), store, store.n_tiles))
            except SlideClipError as e:
                if strict:
                    raise
                failed.append((str(p), str(e)))
        if not slides:
            raise StoreError("no usable store: " + "; ".join(m for _, m in failed[:3]),
                             path=upath(paths[0]).parent)
        o = upath(out) if out is not None else upath(paths[0]).parent
        return cls(slides, name, sha, dim, o, failed)

    @property
    def random_weights(self) -> bool:
        """Whether the embeddings come from random weights (every store holds the same weights)."""
        return any(bool(s.store.embedding_attrs(self.model).get("random_weights")) for s in self.slides[:1])

    # ------------------------------------------------------------------ sizes
    @property
    def n_tiles(self) -> int:
        return int(sum(s.n_tiles for s in self.slides))

    @property
    def offsets(self) -> np.ndarray:
        """(slides + 1,) int64: global tile index of each slide's first row (cohort order)."""
        return np.concatenate([[0], np.cumsum([s.n_tiles for s in self.slides])]).astype(np.int64)

    @property
    def slide_ids(self) -> list[str]:
        return [s.slide_id for s in self.slides]

    def index_of(self, slide: str | Path) -> int:
        """Position of a slide given by its id, its slide file or its store path."""
        from slide_clip.slide import slide_id
        from slide_clip.storage.filesystems import upath

        key = str(slide)
        for i, s in enumerate(self.slides):
            if key in (s.slide_id, str(s.path)) or upath(key).name == s.path.name:
                return i
        sid = slide_id(key)
        for i, s in enumerate(self.slides):
            if sid == s.slide_id:
                return i
        raise ConfigError(f"slide {key!r} is not among the cohort's stores ({', '.join(self.slide_ids[:5])}"
                          f"{', …' if len(self.slides) > 5 else ''})", hint="Give a slide id of a store in OUT.")

    # ------------------------------------------------------------------ reading
    def iter_blocks(self, rows: int | None = None):
        """Yield ``(slide index, start row, block)`` over every store's embeddings in cohort order.

        ``block`` is float32 ``(k, d)``, rows ``start:start + k`` of that store, L2-normalised
        (for cosines; a group of pre-projection features is stored unnormalised); memory stays
        at one block. A damaged block raises :class:`StoreError` naming the store.
        """
        for i, s in enumerate(self.slides):
            for start, block in s.store.iter_embeddings(self.model, rows, unit=True):
                yield i, start, block

    def rows(self, slide_index: int, rows: np.ndarray) -> np.ndarray:
        """Embeddings of some rows of one store (float32 ``(len(rows), d)``), checked finite."""
        s = self.slides[slide_index]
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= s.n_tiles):
            raise ConfigError(f"rows outside 0..{s.n_tiles - 1}", hint=f"store {s.path}")
        return s.store.embedding_rows(self.model, rows, unit=True)  # cosines, as iter_blocks

    def sample(self, per_slide: int | None = None, total: int | None = None, seed: int = 0):
        """A seeded sample of tiles, stratified by slide; returns ``(slide index, row, features)``.

        ``per_slide`` caps the tiles taken from each slide; ``total`` spreads a budget over
        slides in proportion to their tile counts (at least one tile each). With neither,
        every tile. The sample is drawn with ``numpy.random.default_rng(seed)`` and read by
        streaming the stores, keeping only the chosen rows.
        """
        rng = np.random.default_rng(seed)
        chosen: list[np.ndarray] = []
        n_all = self.n_tiles
        for s in self.slides:
            n = s.n_tiles
            if total is not None:
                m = min(n, max(1, int(round(total * n / max(n_all, 1)))))
            elif per_slide is not None:
                m = min(n, int(per_slide))
            else:
                m = n
            chosen.append(np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n))
        idx, rows, feats = [], [], []
        for i, s in enumerate(self.slides):
            want = chosen[i]
            if not want.size:
                continue
            for start, block in s.store.iter_embeddings(self.model):
                sel = want[(want >= start) & (want < start + len(block))]
                if sel.size:
                    feats.append(block[sel - start])
                    rows.append(sel)
                    idx.append(np.full(sel.size, i, np.int64))
        if not feats:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, self.embed_dim), np.float32)
        return np.concatenate(idx), np.concatenate(rows), np.concatenate(feats).astype(np.float32)

    def coords(self, slide_index: int) -> np.ndarray:
        """(n, 2) int64 level-0 x, y of a store's tiles."""
        return self.slides[slide_index].store.coords()
