"""Few-shot examples: the labelled tiles (or images) an examples CSV names, and their embeddings.

``read_examples`` reads and checks the CSV (local or at a URL; slides and images named in it
relative to it); ``example_features`` gives each example its embedding: the stored row of a
stored tile (never re-encoded), else the tile read from its slide (or the image) and encoded
with the stores' model. :func:`slide_clip.scoring.fewshot` builds the prototypes from them.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slide_clip.aggregate import check_column_keys
from slide_clip.encoders.cache import EncoderCache
from slide_clip.errors import ConfigError
from slide_clip.storage import objects
from slide_clip.storage.filesystems import upath
from slide_clip.storage.urls import absolute, is_url, join, parent, url_name
from slide_clip.store import SlideStore


@dataclass(frozen=True)
class Example:
    label: str
    slide: str | None = None
    x: int | None = None
    y: int | None = None
    image: str | None = None
    line: int | None = None  # in the examples CSV, for errors


def read_examples(path: str | Path) -> list[Example]:
    """Labelled example tiles from a CSV: ``slide,x,y,label`` (level-0 top-left) or ``image,label``.

    Relative slide and image paths are relative to the CSV's folder. A tile (or image)
    listed twice, under the same label or another, is an error naming both lines. The CSV, its
    slides and images may be URLs (``s3://...``); relative names in a CSV at a URL are URLs beside it.
    """
    p = upath(path)  # a Path, or a UPath of a URL
    if not p.is_file():
        raise ConfigError("examples CSV not found", path=p)
    with io.StringIO(p.read_text(), newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        if "label" not in cols or not ({"slide", "x", "y"} <= cols or "image" in cols):
            raise ConfigError("examples CSV needs columns slide,x,y,label or image,label", path=p)
        out = []
        seen: dict[tuple, tuple[int, str]] = {}
        for i, row in enumerate(reader, start=2):
            label = (row.get("label") or "").strip()
            if not label:
                raise ConfigError(f"line {i}: empty label", path=p)
            if row.get("image"):
                image, where = _named(p, row["image"].strip(), slide=False)
                ex, key = Example(label, image=image, line=i), ("image", where)
            else:
                try:
                    x, y = int(float(row["x"])), int(float(row["y"]))
                except (TypeError, ValueError, OverflowError):
                    raise ConfigError(f"line {i}: x and y must be level-0 pixel numbers", path=p) from None
                if not (row.get("slide") or "").strip():
                    raise ConfigError(f"line {i}: no slide (or image) given", path=p)
                slide, where = _named(p, row["slide"].strip(), slide=True)
                ex, key = Example(label, slide=slide, x=x, y=y, line=i), ("tile", where, x, y)
            if key in seen:
                first, first_label = seen[key]
                what = f"image {ex.image}" if ex.image else f"tile ({ex.slide}, {ex.x}, {ex.y})"
                same = "also" if first_label == label else f"there as {first_label!r}, here as"
                raise ConfigError(f"line {i}: the {what} is labelled on line {first} already ({same} "
                                  f"{label!r})", path=p, hint="Label each tile once.")
            seen[key] = (i, label)
            out.append(ex)
    labels = {e.label for e in out}
    check_column_keys(sorted(labels), "labels", path=p)  # each label gets its own table columns
    if len(labels) < 2:
        raise ConfigError(f"examples CSV needs at least two classes (has {sorted(labels)})", path=p)
    return out


def _named(csv_path, name: str, *, slide: bool) -> tuple[str, str]:
    """A slide or image the examples CSV at ``csv_path`` names: (what to open, what identifies it
    for the duplicate check). A URL or an absolute path as it is; a relative name beside the CSV
    (at its URL for a CSV at a URL); a relative slide name only when that file exists there, else
    the name as it is (a slide id)."""
    if is_url(name):
        return name, name
    if not Path(name).is_absolute():
        if is_url(csv_path):
            there = join(parent(str(csv_path)), name)
            return (there, there) if not slide or objects.exists(there) else (name, name)
        beside = Path(csv_path).parent / name
        if not slide or beside.exists():
            name = str(beside)
    where = Path(name).expanduser()
    return name, str(where.resolve()) if where.exists() else name


def example_features(examples: list[Example], stores: dict[str, SlideStore], model: str, weights_sha256: str,
                     encoders: EncoderCache, where: Path) -> np.ndarray:
    """Embeddings of the example tiles: the stored row where the tile is in a store, else encoded."""
    import openslide
    from PIL import Image

    from slide_clip.slide import slide_id
    from slide_clip.stages import grid_from_store
    from slide_clip.tiling import read_tile

    feats: list[np.ndarray | None] = [None] * len(examples)
    todo: list[tuple[int, Image.Image]] = []
    for i, ex in enumerate(examples):
        if ex.image:
            try:
                src = io.BytesIO(objects.read_bytes(ex.image)) if is_url(ex.image) else ex.image
                todo.append((i, Image.open(src).convert("RGB")))
            except OSError as e:
                raise ConfigError(f"example image cannot be read ({e})", path=ex.image) from None
            continue
        here = absolute(ex.slide)
        store = next((st for st in stores.values() if st.slide.get("path") == here), None) \
            or stores.get(slide_id(ex.slide)) or stores.get(url_name(ex.slide) if is_url(ex.slide) else Path(ex.slide).name)
        if store is None:
            raise ConfigError(f"example slide {ex.slide!r} has no store among those given", path=where,
                              hint="Embed that slide into the same --out folder, or give its store.")
        coords = store.coords()
        hit = np.flatnonzero((coords[:, 0] == ex.x) & (coords[:, 1] == ex.y))
        if hit.size:
            feats[i] = store.embedding_rows(model, hit[:1], unit=True)[0]  # cosines, also for unnormalised features
            continue
        _check_inside(ex, store, where)
        slide_file = ex.slide if is_url(ex.slide) or Path(ex.slide).exists() else store.slide["path"]
        if is_url(slide_file):
            from slide_clip.slide import open_slide

            osr, _ = open_slide(slide_file)
        else:
            osr = openslide.OpenSlide(str(slide_file))
        try:
            todo.append((i, read_tile(osr, ex.x, ex.y, grid_from_store(store))))
        finally:
            osr.close()
    if todo:
        import torch

        first = next(iter(stores.values()), None)
        enc = encoders.for_store(model, weights_sha256, where, first.embedding_attrs(model) if first is not None else None)
        batch = torch.stack([enc.preprocess(img) for _, img in todo])
        encoded = enc.encode_images(batch)
        for (i, _), f in zip(todo, encoded):
            feats[i] = f
    return np.stack(feats).astype(np.float32)


def _check_inside(ex: Example, store: SlideStore, where: Path) -> None:
    """An example tile that is not a stored tile must lie inside its slide (never a blank tile)."""
    sl = store.slide
    w, h = int(sl["width"]), int(sl["height"])
    ew, eh = (float(v) for v in store.tiling["tile_extent_level0"])
    if ex.x < 0 or ex.y < 0 or ex.x + ew > w or ex.y + eh > h:
        raise ConfigError(f"line {ex.line}: the example tile at level-0 ({ex.x}, {ex.y}) lies outside slide "
                          f"{sl['name']!r} ({w} x {h} level-0 pixels; a tile spans {ew:.0f} x {eh:.0f})",
                          path=where, hint="Give the level-0 top-left corner of a tile inside the slide.")
