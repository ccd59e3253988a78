"""What every picture shares: one colour table for categories, in numeric order, legends of
unblended swatches, slide axes in mm, and the note on pictures made from random weights.

- **One colour table** (:func:`category_colours`): category ``i`` (cluster ``i``, class ``i``
  of a score set in its recorded order, slide ``i`` of a cohort in natural order) has the same
  colour in every picture and in the viewer, however many categories a picture shows. The
  table is colorcet's Glasbey palette for light backgrounds (``glasbey_bw_minc_20_maxl_70``:
  no greys, no pale colours, each colour chosen as far as possible from those before it in
  CIELAB), so near neighbours stay apart: the first 12 differ pairwise by CIEDE2000 >= 17,
  the first 20 by >= 14 (matplotlib's tab20, used before, had pairs at 12).
- **Numeric order** (:func:`natural_order`): ``cluster_2`` before ``cluster_10``.
- **The random-weights note** (:data:`RANDOM_WEIGHTS_NOTE`) goes in the title of every
  picture drawn from embeddings of random weights.
"""

from __future__ import annotations

import re

import numpy as np

def text_font(size: int):
    """The font of text drawn with Pillow (titles, labels): DejaVu Sans from matplotlib, which
    has µ and ² (Pillow's default font draws µ as an empty box), else Pillow's default."""
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=True), size)
    except (ImportError, OSError, ValueError):
        try:
            return ImageFont.load_default(size=size)
        except (TypeError, OSError):
            return ImageFont.load_default()


#: The line every picture made from random weights carries.
RANDOM_WEIGHTS_NOTE = "random weights: not a trained model"


def _table() -> np.ndarray:
    import colorcet

    return (np.asarray(colorcet.glasbey_bw_minc_20_maxl_70, np.float64) * 255 + 0.5).astype(np.uint8)


def category_colours(n: int) -> np.ndarray:
    """(n, 3) uint8 colours of categories 0..n-1: the first ``n`` of the one table (so category
    ``i`` has one colour whatever ``n`` is); past the table's 256 colours it starts again."""
    table = _table()
    return table[np.arange(int(n)) % len(table)]


def natural_key(name) -> tuple:
    """Sort key reading runs of digits as numbers: ``cluster_2`` < ``cluster_10``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", str(name)) if p)


def natural_order(names) -> list:
    """The distinct names in natural (numeric) order."""
    return sorted(set(names), key=natural_key)


def random_weights_title(title: str, random_weights: bool) -> str:
    """``title`` with the random-weights note on a line of its own when the embeddings are random."""
    return f"{title}\n{RANDOM_WEIGHTS_NOTE}" if random_weights else title


def mm_extent(shape, mm_per_px: float | None):
    """matplotlib ``imshow`` extent putting a ``shape`` (h, w) picture in mm from the top-left,
    or None when the scale is unknown."""
    if not mm_per_px:
        return None
    h, w = shape[:2]
    return (0.0, w * mm_per_px, h * mm_per_px, 0.0)


def slide_axes(ax, mm_per_px: float | None) -> None:
    """Label a slide picture's axes in mm (or hide them when the scale is unknown)."""
    if not mm_per_px:
        ax.set_axis_off()
        return
    ax.set_xlabel("x (mm)", fontsize=8)
    ax.set_ylabel("y (mm)", fontsize=8)
    ax.tick_params(labelsize=7)


def thumbnail_mm_per_px(store) -> float | None:
    """mm per thumbnail pixel of a store (its level-0 µm/px times the thumbnail's downsample)."""
    try:
        mpp = float(store.slide.get("mpp_x") or 0)
        ds = float(store.group["tissue"].attrs["downsample"][0])
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return mpp * ds / 1000.0 if mpp > 0 and ds > 0 else None


def swatch_legend(ax, names, colours, title: str | None = None, **kw):
    """A legend of opaque rectangular swatches in exactly ``colours`` (uint8 RGB), beside ``ax``."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=np.asarray(c, np.float64) / 255, edgecolor="none", label=str(n))
               for n, c in zip(names, colours)]
    opts = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8, "frameon": False,
            "title_fontsize": 8}
    opts.update(kw)
    return ax.legend(handles=handles, title=title, **opts)


def save_figure(fig, path, dpi: int = 100, title: str | None = None):
    """Write a matplotlib figure whole (written beside, swapped in: a reader never sees half a
    picture) and close it. Its ``title`` also goes in the PNG's ``Title`` text field, so a
    script (or a test) can read what the picture says it shows."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    from slide_clip.storage.filesystems import upath
    from slide_clip.storage.objects import replace_file

    path = upath(path)
    try:
        with replace_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png",
                        metadata={"Title": title} if title else None)
    finally:
        plt.close(fig)
    return path


def png_title(path) -> str | None:
    """The ``Title`` text field of a PNG written by :func:`save_figure` (or a gallery)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.info.get("Title")
