"""Overlays as small images: one pixel per grid cell (a tile, without overlap), never per-tile DOM.

A probability overlay is the score set's per-cell probability grid
(:func:`slide_clip.heatmap.probability_grid`, as the heatmap PNGs use) in the heatmap
colormap on the fixed 0-1 scale, transparent where no tile lies. A cluster overlay is each
cell's majority cluster (:func:`slide_clip.heatmap.label_grid`) in the colours of the cluster
maps (:func:`slide_clip.heatmap.categorical_colours`). Cell ``(r, c)`` covers level-0
``[c * stride_x, (c + 1) * stride_x) x [r * stride_y, (r + 1) * stride_y)``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from slide_clip.errors import ConfigError
from slide_clip.heatmap import categorical_colours, label_grid, probability_grid
from slide_clip.store import SlideStore

#: Score-set kind whose tiles carry one label (argmax) rather than probabilities.
CLUSTERS = "clusters"


def png(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba), "RGBA" if rgba.shape[-1] == 4 else "RGB").save(buf, "png")
    return buf.getvalue()


def colours(values: np.ndarray, colormap: str) -> np.ndarray:
    """uint8 RGB of probabilities in ``colormap`` on the fixed 0-1 scale."""
    from matplotlib import colormaps

    v = np.clip(np.nan_to_num(np.asarray(values, np.float64), nan=0.0), 0.0, 1.0)
    return (colormaps[colormap](v)[..., :3] * 255 + 0.5).astype(np.uint8)


def probability_image(store: SlideStore, model: str, set_name: str, cls: str, colormap: str) -> np.ndarray:
    """(cells_y, cells_x, 4) uint8: class ``cls``'s probability per cell; alpha 0 where no tile."""
    probs, _, attrs = store.scores(model, set_name)
    classes = list(attrs["classes"])
    if cls not in classes:
        raise ConfigError(f"score set {set_name!r} has no class {cls!r} (classes: {', '.join(classes)})")
    t = store.tiling
    grid = probability_grid(store.grid(), probs[:, classes.index(cls)], t["grid_shape"], t["overlap"])
    rgba = np.zeros(grid.shape + (4,), np.uint8)
    rgba[..., :3] = colours(grid, colormap)
    rgba[..., 3] = np.where(np.isnan(grid), 0, 255)
    return rgba


def cluster_image(store: SlideStore, model: str, set_name: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(cells_y, cells_x, 4) uint8 of each cell's majority cluster, the cluster names and their colours."""
    probs, _, attrs = store.scores(model, set_name)
    names = list(attrs["classes"])
    t = store.tiling
    grid = label_grid(store.grid(), probs.argmax(1), len(names), t["grid_shape"], t["overlap"])
    table = categorical_colours(len(names))
    rgba = np.zeros(grid.shape + (4,), np.uint8)
    valid = ~np.isnan(grid)
    rgba[valid, :3] = table[grid[valid].astype(int)]
    rgba[valid, 3] = 255
    return rgba, names, table


def overlay_png(store: SlideStore, model: str, set_name: str, cls: str | None, colormap: str) -> bytes:
    """The overlay PNG of one score set: a class's probabilities, or the clusters of a ``clusters`` set."""
    kind = store.scores(model, set_name)[2].get("kind")
    if kind == CLUSTERS:
        return png(cluster_image(store, model, set_name)[0])
    if cls is None:
        raise ConfigError(f"score set {set_name!r} needs a class to draw")
    return png(probability_image(store, model, set_name, cls, colormap))


def legend(store: SlideStore, model: str, set_name: str) -> list[dict]:
    """Cluster names and their colours (as the cluster maps draw them)."""
    probs, _, attrs = store.scores(model, set_name)
    names = list(attrs["classes"])
    table = categorical_colours(len(names))
    return [{"name": n, "colour": "#%02x%02x%02x" % tuple(int(v) for v in c)} for n, c in zip(names, table)]


def colour_bar_png(colormap: str, width: int = 256) -> bytes:
    """A ``width`` x 1 picture of ``colormap`` from probability 0 (left) to 1 (right)."""
    return png(colours(np.linspace(0.0, 1.0, width), colormap)[None, :, :])
