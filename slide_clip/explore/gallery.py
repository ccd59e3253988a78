"""Galleries of tiles: read from the slides at the stored tiling, labelled, as a PNG and an HTML page.

Tiles are read with OpenSlide exactly as they were encoded (:func:`slide_clip.tiling.read_tile`
with the store's own grid: level-0 top-left, ``tile_size`` pixels at ``target_mpp``), so a
gallery shows what the model saw. Each slide file is opened once per gallery.

Layout of a gallery PNG: ``columns`` cells a row, each cell a ``thumb``-pixel square tile
above a ``LABEL_HEIGHT``-pixel label strip (two lines: slide and score), with ``PAD`` pixels
between cells; one title strip of ``TITLE_HEIGHT`` pixels on top.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from slide_clip.storage.filesystems import upath
from slide_clip.storage.objects import replace_file, write_text
from slide_clip.explore.cohort import Cohort
from slide_clip.pictures import text_font

PAD = 4
LABEL_HEIGHT = 30
TITLE_HEIGHT = 44  # two lines: what the gallery shows; tile size, score and the random-weights note


def read_tiles(cohort: Cohort, slide_ids, xs, ys) -> list[Image.Image]:
    """RGB tiles at level-0 top-left (x, y) of the given slides, at the stores' tiling
    (:func:`slide_clip.reading.store_tiles`, one slide file open at a time).

    Raises :class:`~slide_clip.errors.StoreError` naming the store when its slide file is gone.
    """
    from slide_clip.reading import store_tiles

    slide_ids, xs, ys = list(slide_ids), list(xs), list(ys)
    out: list[Image.Image | None] = [None] * len(slide_ids)
    for sid in dict.fromkeys(slide_ids):
        where = [j for j, t in enumerate(slide_ids) if t == sid]
        tiles = store_tiles(cohort.slides[cohort.index_of(sid)].store, [(xs[j], ys[j]) for j in where])
        for j, tile in zip(where, tiles):
            out[j] = tile
    return out  # type: ignore[return-value]


def gallery_png(tiles: list[Image.Image], labels: list[str], path: str | Path, title: str = "",
                columns: int = 8, thumb: int = 128) -> Path:
    """Compose tiles into a labelled grid PNG.

    Parameters
    ----------
    tiles : list of PIL images
        Each resized to ``thumb`` × ``thumb`` pixels.
    labels : list of str
        One per tile, up to two lines (``\\n``), drawn under it.
    columns : int
        Cells per row (fewer when there are fewer tiles).

    The picture is ``cols * (thumb + PAD) + PAD`` pixels wide and
    ``TITLE_HEIGHT + rows * (thumb + LABEL_HEIGHT + PAD) + PAD`` high.
    """
    n = len(tiles)
    cols = max(1, min(columns, n))
    rows = max(1, -(-n // cols))
    w = cols * (thumb + PAD) + PAD
    h = TITLE_HEIGHT + rows * (thumb + LABEL_HEIGHT + PAD) + PAD
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    head, _, sub = title.partition("\n")
    draw.text((PAD, 4), head, fill=(0, 0, 0), font=text_font(14))
    if sub:
        draw.text((PAD, 24), sub.replace("\n", "; "), fill=(60, 60, 60), font=text_font(11))
    small = text_font(11)
    for k, (tile, label) in enumerate(zip(tiles, labels)):
        x0, y0 = cell_origin(k, cols, thumb)
        canvas.paste(tile.convert("RGB").resize((thumb, thumb), Image.Resampling.BILINEAR), (x0, y0))
        draw.multiline_text((x0, y0 + thumb + 2), label, fill=(0, 0, 0), font=small, spacing=1)
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("Title", title)
    path = upath(path)
    with replace_file(path) as tmp:
        canvas.save(tmp, format="PNG", optimize=True, pnginfo=info)
    return path


def cell_origin(k: int, cols: int, thumb: int) -> tuple[int, int]:
    """Top-left pixel of tile ``k``'s square in a gallery PNG (picture pixels)."""
    r, c = divmod(k, cols)
    return PAD + c * (thumb + PAD), TITLE_HEIGHT + PAD + r * (thumb + LABEL_HEIGHT + PAD)


def gallery_html(sections: list[tuple[str, list[Image.Image], list[str]]], path: str | Path, title: str,
                 thumb: int = 160) -> Path:
    """One self-contained HTML page: a heading per section, each tile a figure with its caption.

    Tiles are embedded as PNG data URLs (the page can be mailed or moved alone).
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:4px;"
             f"width:{thumb}px;font-size:11px;vertical-align:top}}img{{width:{thumb}px;height:{thumb}px}}"
             "figcaption{white-space:pre-line}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for heading, tiles, labels in sections:
        parts.append(f"<section><h2>{html.escape(heading)}</h2>")
        for tile, label in zip(tiles, labels):
            buf = io.BytesIO()
            tile.convert("RGB").save(buf, format="PNG")
            data = base64.b64encode(buf.getvalue()).decode()
            parts.append(f"<figure><img alt='{html.escape(label)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(label)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>")
    return write_text(path, "\n".join(parts))


def hit_label(slide_id: str, score: float, x: int | None = None, y: int | None = None, what: str = "cos") -> str:
    """The two-line label of a gallery tile: slide id (and level-0 x, y), then the score."""
    where = f"{slide_id}" if x is None else f"{slide_id} ({x},{y})"
    return f"{where}\n{what} {score:.3f}"


def table_galleries(cohort: Cohort, table: pd.DataFrame, group: str, out_dir: str | Path, title: str,
                    score_label: str = "cos", columns: int = 8, thumb: int = 128,
                    html_page: bool = True) -> list[Path]:
    """One gallery PNG per value of ``table[group]`` (in table order) and one HTML page of all.

    ``table`` needs ``slide_id, x, y, score`` and ``group`` columns; tiles appear in table
    order. PNGs are ``<out_dir>/gallery-<group>.png``, named after the group (a query, a
    cluster: :func:`gallery_names`), the page ``<out_dir>/gallery.html``. Each PNG's title says
    what it shows, the tiles' size, the score, and that the weights are random when they are.
    """
    from slide_clip.pictures import random_weights_title

    out_dir = upath(out_dir)
    tiles = read_tiles(cohort, table["slide_id"], table["x"], table["y"]) if len(table) else []
    written, sections = [], []
    keys = list(dict.fromkeys(table[group])) if len(table) else []
    names = gallery_names(keys)
    t = cohort.slides[0].store.tiling if cohort.slides else None
    size = (f"tiles of {int(t['tile_size'])} px at {float(t['target_mpp']):g} µm/px "
            f"({int(t['tile_size']) * float(t['target_mpp']):g} µm wide)" if t else "")
    for key, sub in table.groupby(group, sort=False):
        idx = np.flatnonzero((table[group] == key).to_numpy())
        ims = [tiles[i] for i in idx]
        labels = [hit_label(r.slide_id, r.score, r.x, r.y, score_label) for r in sub.itertuples()]
        head = random_weights_title(f"{title}: {key} [{cohort.model}]\n{size}; under each: slide (level-0 x,y), "
                                    f"{score_label}", cohort.random_weights)
        written.append(gallery_png(ims, labels, out_dir / names[key], head, columns, thumb))
        sections.append((str(key), ims, labels))
    if html_page and sections:
        written.append(gallery_html(sections, out_dir / "gallery.html", title))
    return written


def gallery_names(keys) -> dict:
    """A file name per group: ``gallery-<key>.png``, the key made safe for any file system
    (letters, digits, ``-`` and ``_``; at most 60 characters) and unique (``-2``, ``-3``... for
    keys that become the same name)."""
    import re

    out, used = {}, set()
    for key in keys:
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", str(key)).strip("_")[:60] or "query"
        name, n = base, 1
        while name.lower() in used:
            n += 1
            name = f"{base}-{n}"
        used.add(name.lower())
        out[key] = f"gallery-{name}.png"
    return out
