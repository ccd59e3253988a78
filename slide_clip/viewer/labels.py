"""Label sets: tiles a user marked as examples of a label, kept as few-shot example CSVs.

A label set ``NAME`` is ``<out>/labels/NAME.csv`` with the columns `slide-clip fewshot`
reads, ``slide,x,y,label`` (the slide file the store names, and the stored tile's level-0
top-left, so `fewshot` takes the stored embedding and re-encodes nothing), plus ``slide_id``.
Files are replaced atomically (written beside, then renamed; at a URL, uploaded whole:
:func:`slide_clip.storage.objects.replace_file`). Re-scoring runs the library's
own :func:`slide_clip.scoring.fewshot` on every store of the folder into the score set
``fewshot-NAME`` and writes that set's cohort table with
:func:`slide_clip.scoring.summarize_all`.

QuPath: labels export as GeoJSON annotations (one tile polygon each, level-0 pixels,
classified by label); annotations exported from QuPath import as labels of every stored
tile whose centre lies inside a classified polygon.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

from slide_clip.errors import ConfigError
from slide_clip.output import output_errors
from slide_clip.storage import objects
from slide_clip.storage.filesystems import upath
from slide_clip.viewer.catalog import Catalog, tile_row

LABELS_DIR = "labels"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_LABEL = 100
COLUMNS = ["slide", "x", "y", "label", "slide_id"]


class LabelError(ConfigError):
    """A label set name, a label or a labelled tile the viewer refuses."""


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise LabelError(f"label set name {name!r} is not allowed",
                         hint="Use up to 64 letters, digits, '-' or '_', starting with a letter or digit.")
    return name


def check_label(label) -> str:
    text = str(label).strip() if label is not None else ""
    if not text or len(text) > MAX_LABEL or any(ord(ch) < 32 for ch in text):
        raise LabelError(f"label {str(label)[:40]!r} is not allowed",
                         hint=f"Give 1 to {MAX_LABEL} printable characters.")
    return text


def label_path(out: Path, name: str) -> Path:
    """``<out>/labels/<name>.csv`` (a UPath when ``out`` is a URL)."""
    return upath(out) / LABELS_DIR / f"{check_name(name)}.csv"


def score_set_name(name: str) -> str:
    """The score set a label set is re-scored into."""
    return f"fewshot-{check_name(name)}"


def list_sets(out: Path) -> list[str]:
    d = upath(out) / LABELS_DIR
    return sorted(p.stem for p in d.glob("*.csv") if NAME_RE.match(p.stem)) if d.is_dir() else []


def read_labels(out: Path, name: str) -> list[dict]:
    """The rows of a label set (``slide_id, x, y, label``); an absent set has none."""
    p = label_path(out, name)
    if not p.is_file():
        return []
    with io.StringIO(p.read_text(), newline="") as f:
        rows = []
        for i, r in enumerate(csv.DictReader(f), start=2):
            try:
                rows.append({"slide_id": r["slide_id"], "x": int(r["x"]), "y": int(r["y"]),
                             "label": r["label"]})
            except (KeyError, TypeError, ValueError):
                raise LabelError(f"line {i} is not slide,x,y,label,slide_id", path=p) from None
    return rows


def checked_rows(catalog: Catalog, rows) -> list[dict]:
    """Rows with a known slide, a stored tile's exact top-left and an allowed label; one per tile
    (a tile given twice keeps its last label)."""
    if not isinstance(rows, list):
        raise LabelError("labels must be a list of {slide_id, x, y, label}")
    stores, by_tile = {}, {}
    for r in rows:
        if not isinstance(r, dict):
            raise LabelError("labels must be a list of {slide_id, x, y, label}")
        sid = str(r.get("slide_id"))
        if sid not in stores:
            stores[sid] = catalog.store(sid)
        try:
            x, y = int(r.get("x")), int(r.get("y"))
        except (TypeError, ValueError):
            raise LabelError("x and y must be level-0 pixel numbers") from None
        if tile_row(stores[sid], x, y) is None:
            raise LabelError(f"no stored tile has its top-left at level-0 ({x}, {y}) in this slide")
        by_tile[(sid, x, y)] = {"slide_id": sid, "x": x, "y": y, "label": check_label(r.get("label"))}
    return list(by_tile.values())


def write_labels(catalog: Catalog, name: str, rows) -> list[dict]:
    """Replace label set ``name`` with ``rows`` (checked), atomically; returns the rows written."""
    rows = checked_rows(catalog, rows)
    p = label_path(catalog.out, name)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "slide": catalog.entry(r["slide_id"]).slide_path})
    with output_errors(p):
        objects.write_text(str(p), buf.getvalue())
    return rows


def rescore(catalog: Catalog, name: str, cfg, model: str | None) -> dict:
    """Score every store with the label set's tiles as few-shot examples (stored embeddings only).

    Returns the score set's name, the model's group name and one line per slide.
    """
    from slide_clip.scoring import fewshot, find_stores, summarize_all
    from slide_clip.store import model_key

    p = label_path(catalog.out, name)
    if not p.is_file():
        raise LabelError(f"label set {name!r} has no labels yet", hint="Label tiles of at least two labels first.")
    set_name = score_set_name(name)
    results = fewshot(find_stores([catalog.out]), str(p), cfg, model=model, name=set_name)
    used = next((r["model"] for r in results if r.get("model")), model)
    summarize_all(catalog.out, set_name=set_name, model=used)
    return {"set": model_key(set_name), "model": model_key(used) if used else None,
            "slides": [{"slide_id": r["slide_id"], "status": r["status"], "error": r.get("error"),
                        "predicted": r.get("predicted")} for r in results]}


# ---------------------------------------------------------------------- QuPath GeoJSON
def label_colours(labels: list[str]) -> dict[str, list[int]]:
    """A colour per label (the categorical colours of the cluster maps, in sorted label order)."""
    from slide_clip.heatmap import categorical_colours

    names = sorted(set(labels))
    return {n: [int(v) for v in c] for n, c in zip(names, categorical_colours(len(names)))}


def to_geojson(catalog: Catalog, rows: list[dict], slide_id: str) -> dict:
    """One slide's labelled tiles as QuPath annotations (level-0 pixel polygons, classified by label)."""
    store = catalog.store(slide_id)
    ex, ey = (float(v) for v in store.tiling["tile_extent_level0"])
    colours = label_colours([r["label"] for r in rows])
    features = []
    for r in rows:
        if r["slide_id"] != slide_id:
            continue
        x0, y0 = float(r["x"]), float(r["y"])
        x1, y1 = x0 + ex, y0 + ey
        features.append({"type": "Feature",
                         "geometry": {"type": "Polygon",
                                      "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                         "properties": {"objectType": "annotation",
                                        "classification": {"name": r["label"], "color": colours[r["label"]]}}})
    return {"type": "FeatureCollection", "features": features}


def _features(doc) -> list:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        return list(doc.get("features") or [])
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        return [doc]
    raise LabelError("not GeoJSON: expected a FeatureCollection, a Feature or a list of Features",
                     hint="Export annotations from QuPath as GeoJSON.")


def _polygons(geometry) -> list[list]:
    """The polygons (each: exterior ring, then holes) of a Polygon or MultiPolygon; others give none."""
    kind = (geometry or {}).get("type")
    if kind == "Polygon":
        return [geometry["coordinates"]]
    if kind == "MultiPolygon":
        return list(geometry["coordinates"])
    return []


def _inside(points: np.ndarray, polygon: list) -> np.ndarray:
    from matplotlib.path import Path as MPath

    def ring(r):
        a = np.asarray(r, np.float64)
        if a.ndim != 2 or a.shape[0] < 3 or a.shape[1] < 2:
            raise LabelError("a polygon ring has fewer than three points")
        return MPath(a[:, :2])

    hit = ring(polygon[0]).contains_points(points)
    for hole in polygon[1:]:
        hit &= ~ring(hole).contains_points(points)
    return hit


def from_geojson(catalog: Catalog, slide_id: str, doc) -> tuple[list[dict], int]:
    """Labels from QuPath annotations of one slide: every stored tile whose centre lies inside a
    classified polygon gets the polygon's class. Returns the rows and the number of features
    skipped (unclassified, or not polygons)."""
    store = catalog.store(slide_id)
    coords = store.coords()
    ex, ey = (float(v) for v in store.tiling["tile_extent_level0"])
    centres = coords.astype(np.float64) + [ex / 2, ey / 2]
    rows, skipped = {}, 0
    for f in _features(doc):
        props = (f or {}).get("properties") or {}
        cls = props.get("classification") or {}
        name = cls.get("name") if isinstance(cls, dict) else None
        polys = _polygons((f or {}).get("geometry"))
        if not name or not polys:
            skipped += 1
            continue
        label = check_label(name)
        for poly in polys:
            for i in np.flatnonzero(_inside(centres, poly)):
                x, y = (int(v) for v in coords[i])
                rows[(x, y)] = {"slide_id": slide_id, "x": x, "y": y, "label": label}
    return list(rows.values()), skipped
