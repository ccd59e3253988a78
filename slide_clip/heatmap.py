"""Heatmaps of tile probabilities, always at thumbnail or tile-grid scale.

Memory never depends on the slide's full resolution: grids are (rows, cols) of tiles, and
pictures are the size of the stored thumbnail. Frames: ``grid`` arrays are grid cells at
the stride spacing; ``value_map``/overlays are thumbnail pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from slide_clip.storage.objects import write_text


def probability_grid(grid_rc: np.ndarray, values: np.ndarray, grid_shape, overlap: float = 0.0) -> np.ndarray:
    """Per-cell mean of tile values on the grid; NaN where no tile (outside tissue).

    Cells are stride-sized. With overlap, a tile covers ``round(1 / (1 - overlap))`` cells a
    side and overlapping tiles' values are averaged.
    """
    rows, cols = (int(x) for x in grid_shape)
    m = max(1, int(round(1.0 / (1.0 - overlap))))
    total = np.zeros((rows + m - 1, cols + m - 1), np.float64)
    count = np.zeros_like(total)
    r, c = np.asarray(grid_rc[:, 0], int), np.asarray(grid_rc[:, 1], int)
    v = np.asarray(values, np.float64)
    for dr in range(m):
        for dc in range(m):
            np.add.at(total, (r + dr, c + dc), v)
            np.add.at(count, (r + dr, c + dc), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total / count
    out[count == 0] = np.nan
    return out


def smooth_grid(grid: np.ndarray, sigma_tiles: float) -> np.ndarray:
    """Gaussian smoothing over neighbouring tiles that ignores (and keeps) NaN cells."""
    if sigma_tiles <= 0:
        return grid
    valid = ~np.isnan(grid)
    num = ndimage.gaussian_filter(np.where(valid, grid, 0.0), sigma_tiles, mode="constant")
    den = ndimage.gaussian_filter(valid.astype(np.float64), sigma_tiles, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[~valid] = np.nan
    return out


def grid_to_thumbnail(grid: np.ndarray, stride_level0, thumb_shape, thumb_downsample) -> np.ndarray:
    """Sample a cell grid at every thumbnail pixel (nearest cell): (h, w) float, NaN off-grid."""
    h, w = thumb_shape
    ys = (np.arange(h) + 0.5) * thumb_downsample[1]
    xs = (np.arange(w) + 0.5) * thumb_downsample[0]
    ri = np.floor(ys / stride_level0[1]).astype(int)
    ci = np.floor(xs / stride_level0[0]).astype(int)
    rows, cols = grid.shape
    out = np.full((h, w), np.nan)
    rv, cv = (ri >= 0) & (ri < rows), (ci >= 0) & (ci < cols)
    out[np.ix_(rv, cv)] = grid[np.ix_(ri[rv], ci[cv])]
    return out


def overlay(thumbnail: np.ndarray, mask: np.ndarray, value_map: np.ndarray, colormap: str = "viridis",
            alpha: float = 0.55, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """The thumbnail with ``value_map`` drawn in ``colormap`` only inside tissue (uint8 RGB)."""
    from matplotlib import colormaps

    cmap = colormaps[colormap]
    norm = np.clip((np.nan_to_num(value_map, nan=0.0) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    colour = (cmap(norm)[..., :3] * 255).astype(np.float32)
    draw = mask & ~np.isnan(value_map)
    out = thumbnail.astype(np.float32)
    out[draw] = (1 - alpha) * out[draw] + alpha * colour[draw]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def value_range(value_map: np.ndarray, mask: np.ndarray, scale: str = "fixed") -> tuple[float, float]:
    """The colour scale's (vmin, vmax): (0, 1) for ``fixed``; for ``auto``, the min and max of
    ``value_map`` inside tissue (``mask``; both in thumbnail pixels), widened to at least 1e-3
    so a perfectly flat map still draws."""
    if scale == "fixed":
        return 0.0, 1.0
    if scale != "auto":
        raise ValueError(f"scale must be 'fixed' or 'auto', not {scale!r}")
    v = value_map[mask & ~np.isnan(value_map)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-3:
        mid = (lo + hi) / 2
        lo, hi = mid - 5e-4, mid + 5e-4
    return lo, hi


def render_png(image: np.ndarray, path: str | Path, title: str, colormap: str = "viridis",
               label: str = "probability", vmin: float = 0.0, vmax: float = 1.0,
               mm_per_px: float | None = None) -> Path:
    """Save an overlay picture with a colour bar spanning ``vmin``-``vmax`` and a title (matplotlib,
    Agg); with ``mm_per_px`` (mm per picture pixel) the axes are the slide's mm."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    from slide_clip.pictures import mm_extent, save_figure, slide_axes

    h, w = image.shape[:2]
    dpi = 100
    scale = min(1.0, 1600 / max(h, w))  # the picture is at most 1600 px: never slide-sized
    fig_w, fig_h = w * scale / dpi + 1.8, h * scale / dpi + 1.0
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=dpi)
    ax.imshow(image, interpolation="antialiased", extent=mm_extent(image.shape, mm_per_px))
    slide_axes(ax, mm_per_px)
    ax.set_title(title, fontsize=11)
    sm = cm.ScalarMappable(norm=colors.Normalize(vmin, vmax), cmap=colormap)
    fig.colorbar(sm, ax=ax, fraction=0.04, pad=0.02, label=label)
    return save_figure(fig, path, dpi, title)


def tiles_geojson(coords: np.ndarray, extent, probs: np.ndarray, class_names: list[str],
                  path: str | Path, name: str = "") -> Path:
    """Write tiles as QuPath-importable GeoJSON: level-0 polygons with per-class probabilities.

    Each feature is a QuPath ``tile`` object classified as its top class, with measurements
    ``p(<class>)``.
    """
    ex, ey = float(extent[0]), float(extent[1])
    features = []
    top = probs.argmax(axis=1) if len(probs) else np.array([], int)
    for (x, y), p, t in zip(np.asarray(coords, float), probs, top):
        x1, y1 = x + ex, y + ey
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]},
            "properties": {
                "objectType": "tile",
                "classification": {"name": class_names[int(t)]},
                "measurements": {f"p({c})": float(v) for c, v in zip(class_names, p)},
            },
        })
    return write_text(path, json.dumps({"type": "FeatureCollection", "name": name, "features": features}))


# ----------------------------------------------------------------------------- categories
def categorical_colours(n: int) -> np.ndarray:
    """(n, 3) uint8 colours of categories 0..n-1: the one table of :mod:`slide_clip.pictures`."""
    from slide_clip.pictures import category_colours

    return category_colours(n)


def label_grid(grid_rc: np.ndarray, labels: np.ndarray, n_labels: int, grid_shape, overlap: float = 0.0) -> np.ndarray:
    """Per-cell majority label of the tiles covering it (grid cells; NaN where no tile).

    Uses :func:`probability_grid` on each label's indicator, so overlapping tiles vote.
    """
    fractions = np.stack([probability_grid(grid_rc, (labels == k).astype(np.float32), grid_shape, overlap)
                          for k in range(n_labels)])
    out = np.full(fractions.shape[1:], np.nan)
    valid = ~np.isnan(fractions[0])
    out[valid] = np.argmax(fractions[:, valid], axis=0)
    return out


def categorical_overlay(thumbnail: np.ndarray, mask: np.ndarray, label_map: np.ndarray, colours: np.ndarray,
                        alpha: float = 0.55) -> np.ndarray:
    """The thumbnail with each pixel's label (thumbnail pixels, NaN = none) in its colour, inside tissue."""
    draw = mask & ~np.isnan(label_map)
    out = thumbnail.astype(np.float32)
    lab = np.nan_to_num(label_map, nan=0).astype(int)
    out[draw] = (1 - alpha) * out[draw] + alpha * np.asarray(colours, np.float32)[lab[draw]]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def category_image(mask: np.ndarray, label_map: np.ndarray, colours: np.ndarray,
                   background=(255, 255, 255), outline=(60, 60, 60)) -> np.ndarray:
    """Each tissue pixel with a label in its category's colour, unblended (exactly the legend's);
    no label: ``background``; the tissue's edge drawn in ``outline`` (uint8 RGB, thumbnail pixels)."""
    from skimage import morphology

    h, w = mask.shape
    out = np.empty((h, w, 3), np.uint8)
    out[:] = np.asarray(background, np.uint8)
    draw = mask & ~np.isnan(label_map)
    lab = np.nan_to_num(label_map, nan=0).astype(int)
    out[draw] = np.asarray(colours, np.uint8)[lab[draw]]
    edge = mask & ~morphology.erosion(mask, morphology.disk(1))
    out[edge] = np.asarray(outline, np.uint8)
    return out


def render_category_png(thumbnail: np.ndarray, categories: np.ndarray, path: str | Path, title: str,
                        names: list[str], colours: np.ndarray, legend_title: str | None = None,
                        mm_per_px: float | None = None) -> Path:
    """The slide and its categories side by side (same axes, in mm when known), a title, and a
    legend of ``names`` in exactly ``colours`` (the colours drawn in the right panel)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from slide_clip.pictures import mm_extent, save_figure, slide_axes, swatch_legend

    h, w = categories.shape[:2]
    dpi = 100
    scale = min(1.0, 900 / max(h, w))
    fig, axes = plt.subplots(1, 2, figsize=(2 * w * scale / dpi + 2.6, h * scale / dpi + 1.2), dpi=dpi,
                             sharex=True, sharey=True)
    extent = mm_extent(categories.shape, mm_per_px)
    for ax, img, sub in ((axes[0], thumbnail, "slide"), (axes[1], categories, legend_title or "categories")):
        ax.imshow(img, interpolation="nearest", extent=extent)
        slide_axes(ax, mm_per_px)
        ax.set_title(sub, fontsize=9)
    fig.suptitle(title, fontsize=11)
    swatch_legend(axes[1], names, colours, title=legend_title)
    return save_figure(fig, path, dpi, title)
