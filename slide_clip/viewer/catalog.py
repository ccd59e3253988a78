"""An output folder as the viewer sees it: its slides, their stores, score sets and cohort tables.

Only reads: stores are opened for each request (a score set written since is seen at once)
and never written here; the cohort tables are the files `summarize` writes
(``cohort-<set>-<model>.parquet``, see docs/FORMAT.md). A slide is addressed by its slide id;
the only slide files the viewer opens are those its stores name (``slide.path``).

The output folder may be a URL (``s3://bucket/out``): it is then a :func:`~slide_clip.storage.
filesystems.upath` path object, read through fsspec like every other command's.
"""

from __future__ import annotations

import io
import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slide_clip.aggregate import metric_column
from slide_clip.errors import ConfigError, SlideClipError, StoreError
from slide_clip.storage.filesystems import upath
from slide_clip.storage.urls import absolute, is_url
from slide_clip.store import SlideStore


class UnknownSlideError(ConfigError):
    """A slide id that is not among the output folder's stores."""


@dataclass(frozen=True)
class SlideEntry:
    """One store of the output folder."""

    slide_id: str
    store: Path  # or a UPath of a store at a URL
    slide_path: str
    status: str


def _clean(v):
    """A JSON-safe scalar: NaN and missing values as None, numpy scalars as Python ones."""
    if v is None:
        return None
    if isinstance(v, (np.generic,)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class Catalog:
    """The stores of one output folder, found when opened (and again by :meth:`refresh`)."""

    def __init__(self, out: str | Path):
        self.out = upath(absolute(out))
        if not self.out.is_dir():
            raise StoreError("is not a folder" + (" (no objects under this prefix)" if is_url(out) else ""),
                             path=out, hint="Give an output folder of `slide-clip embed`.")
        self._lock = threading.Lock()
        self.slides: dict[str, SlideEntry] = {}
        self.failed: list[tuple[str, str]] = []
        self.refresh()
        if not self.slides:
            raise StoreError("holds no slide stores", path=self.out, hint="Run `slide-clip embed` into it first.")

    def refresh(self) -> None:
        """Find the stores again (slides embedded since the viewer started)."""
        from slide_clip.scoring import find_stores

        slides, failed = {}, []
        for p in find_stores([self.out]):
            try:
                st = SlideStore.open(p)
                sid = str(st.slide["name"])
                if sid in slides:
                    raise StoreError(f"has slide id {sid!r} like {slides[sid].store}", path=p)
                slides[sid] = SlideEntry(sid, p, str(st.slide.get("path", "")), st.status)
            except (SlideClipError, KeyError) as e:
                failed.append((str(p), str(e)))
        with self._lock:
            self.slides, self.failed = slides, failed

    def entry(self, slide_id: str) -> SlideEntry:
        e = self.slides.get(slide_id)
        if e is None:
            raise UnknownSlideError("no such slide in this output folder")
        return e

    def store(self, slide_id: str) -> SlideStore:
        """The slide's store, opened now (for reading only)."""
        return SlideStore.open(self.entry(slide_id).store)

    # ------------------------------------------------------------------ cohort tables
    def tables(self) -> list[dict]:
        """Every cohort table `summarize` wrote: ``{key, set, model, classes, rows}``.

        ``rows`` maps slide ids to ``status``, ``error``, ``n_tiles``, ``predicted`` and
        ``slide_prob:<class>`` (and mean/area) values, read from the table's
        ``slide_prob__<class>`` columns; a score set whose table was not
        written yet is listed with ``missing: true``.
        """
        import pandas as pd

        from slide_clip.scoring import score_set_pairs

        out = []
        for mk, sk in score_set_pairs(self.out):
            parquet, csv = (self.out / f"cohort-{sk}-{mk}{ext}" for ext in (".parquet", ".csv"))
            entry = {"key": f"{mk}/{sk}", "set": sk, "model": mk, "classes": [], "rows": {}, "missing": False}
            try:  # read whole first: pandas alone would not take a URL's storage options
                if parquet.is_file():
                    df = pd.read_parquet(io.BytesIO(parquet.read_bytes()))
                elif csv.is_file():
                    df = pd.read_csv(io.BytesIO(csv.read_bytes()))
                else:
                    entry["missing"] = True
                    out.append(entry)
                    continue
            except Exception as e:  # noqa: BLE001 - a damaged table: say so, list the others
                entry.update(missing=True, error=f"{parquet} cannot be read ({type(e).__name__})")
                out.append(entry)
                continue
            classes = _table_classes(df)
            # the page's keys name the class as it is (`slide_prob:<class>`); the table's columns are
            # the safe `slide_prob__<class_key>` (slide_clip.aggregate.metric_column)
            cols = {f"{m}:{c}": metric_column(m, c) for c in classes
                    for m in ("slide_prob", "mean_prob", "area_fraction")}
            entry["classes"] = classes
            for rec in df.to_dict("records"):
                sid = str(rec.get("slide_id"))
                row = {k: _clean(rec.get(k)) for k in ("status", "error", "n_tiles", "predicted")}
                row.update({k: _clean(rec.get(c)) for k, c in cols.items()})
                entry["rows"][sid] = row
            out.append(entry)
        return out

    def statuses(self) -> dict[str, dict]:
        """``status/<slide>.json`` of every slide that has one (what embedding did)."""
        d = self.out / "status"
        found = {}
        for p in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                st = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(st, dict) and st.get("name"):
                found[str(st["name"])] = {"status": st.get("status"), "error": st.get("error"),
                                          "n_tiles": st.get("n_tiles")}
        return found

    def cohort(self) -> dict:
        """The cohort list: every slide (stores, and slides whose embedding failed) and the tables."""
        statuses = self.statuses()
        ids = sorted(set(self.slides) | set(statuses))
        slides = []
        for sid in ids:
            e = self.slides.get(sid)
            st = statuses.get(sid, {})
            # what embedding reported (ok, skipped, failed), else the store's own state (tiled, ...)
            slides.append({"slide_id": sid, "has_store": e is not None,
                           "status": st.get("status") or (e.status if e else None),
                           "error": st.get("error"), "n_tiles": st.get("n_tiles")})
        return {"out": str(self.out), "slides": slides, "tables": self.tables(),
                "failed_stores": [{"store": p, "error": m} for p, m in self.failed]}


# ---------------------------------------------------------------------- one slide
def score_sets(store: SlideStore) -> list[dict]:
    """The store's score sets: ``{model, set, kind, classes, created}`` each."""
    out = []
    for mk, sk in store.score_sets():
        try:
            a = store.score_attrs(mk, sk)  # through the pointer of a store at a URL
        except StoreError:  # a damaged set: listed, its error shown when it is opened
            a = {}
        out.append({"model": mk, "set": sk, "kind": a.get("kind"), "classes": list(a.get("classes") or []),
                    "created": a.get("created")})
    return out


def slide_info(store: SlideStore) -> dict:
    """What the page needs to show a slide: size, µm/px, tile geometry, score sets."""
    s, t = store.slide, store.tiling
    m = max(1, int(round(1.0 / (1.0 - float(t.get("overlap", 0.0))))))
    rows, cols = (int(v) for v in t["grid_shape"])
    sx, sy = (float(v) for v in t["stride_level0"])
    return {
        "slide_id": s["name"], "width": int(s["width"]), "height": int(s["height"]),
        "mpp_x": s.get("mpp_x"), "mpp_y": s.get("mpp_y"), "vendor": s.get("vendor"),
        "n_tiles": store.n_tiles, "tile_size": int(t["tile_size"]), "target_mpp": float(t["target_mpp"]),
        "extent": [float(v) for v in t["tile_extent_level0"]], "stride": [sx, sy],
        "overlay": {"cols": cols + m - 1, "rows": rows + m - 1, "width": (cols + m - 1) * sx,
                    "height": (rows + m - 1) * sy},
        "models": store.models(),
        "score_sets": score_sets(store),
    }


def tile_at(store: SlideStore, x: float, y: float) -> int | None:
    """Row of the stored tile containing level-0 point (x, y) (the nearest top-left among
    overlapping ones), or None outside every tile."""
    coords = store.coords()
    ex, ey = store.tiling["tile_extent_level0"]
    inside = np.flatnonzero((coords[:, 0] <= x) & (x < coords[:, 0] + ex) & (coords[:, 1] <= y) &
                            (y < coords[:, 1] + ey))
    if not inside.size:
        return None
    d = (coords[inside, 0] - x) ** 2 + (coords[inside, 1] - y) ** 2
    return int(inside[np.argmin(d)])


def tile_row(store: SlideStore, x: int, y: int) -> int | None:
    """Row of the stored tile whose top-left is exactly level-0 (x, y), else None."""
    coords = store.coords()
    hit = np.flatnonzero((coords[:, 0] == x) & (coords[:, 1] == y))
    return int(hit[0]) if hit.size else None


def tile_details(store: SlideStore, row: int) -> dict:
    """A stored tile: level-0 and µm coordinates, grid cell, tissue fraction, every score set's probabilities."""
    n = store.n_tiles
    if not 0 <= row < n:
        raise ConfigError(f"tile row {row} outside 0..{n - 1}")
    x, y = (int(v) for v in store.coords()[row])
    s, t = store.slide, store.tiling
    mx, my = s.get("mpp_x"), s.get("mpp_y")
    ex, ey = (float(v) for v in t["tile_extent_level0"])
    scores = []
    for mk, sk in store.score_sets():
        probs, _, attrs = store.scores(mk, sk)
        scores.append({"model": mk, "set": sk, "kind": attrs.get("kind"),
                       "probs": {c: float(p) for c, p in zip(attrs["classes"], probs[row])}})
    return {
        "slide_id": s["name"], "row": row, "x": x, "y": y, "extent": [ex, ey],
        "grid": [int(v) for v in store.grid()[row]], "tissue_fraction": float(store.tissue_fraction()[row]),
        "um": None if not (mx and my) else {"x": x * mx, "y": y * my, "width": ex * mx, "height": ey * my},
        "scores": scores,
    }


def _table_classes(df) -> list[str]:
    """A cohort table's classes in their order: its ``classes`` column (``;``-joined, as
    :func:`slide_clip.aggregate.summary_row` writes it) of the first row that has one."""
    from slide_clip.aggregate import LIST_SEPARATOR

    for v in df.get("classes", []):
        if isinstance(v, str) and v:
            return v.split(LIST_SEPARATOR)
    return []
