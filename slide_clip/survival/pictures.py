"""Pictures of a survival model: per-tile attention and tile-risk heatmaps (the zero-shot
heatmap renderer: thumbnail scale, drawn only inside tissue), and a gallery of the top tiles
of the highest- and lowest-risk patients, read from the slide files at the stored target
resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slide_clip.heatmap import grid_to_thumbnail, overlay, probability_grid, render_png
from slide_clip.pictures import save_figure, thumbnail_mm_per_px
from slide_clip.store import SlideStore, model_key


def tile_heatmap(store: SlideStore, values: np.ndarray, path: str | Path, title: str, label: str,
                 colormap: str = "magma", alpha: float = 0.6) -> Path:
    """Draw per-tile ``values`` in [0, 1] (tile order of the store) over the slide's thumbnail.

    Values go on the tile grid (grid cells), are sampled at thumbnail pixels and blended only
    inside the tissue mask; the picture is the thumbnail's size, never the slide's.
    """
    t = store.tiling
    tissue = store.group["tissue"].attrs
    mask = store.mask()
    grid = probability_grid(store.grid(), np.clip(values, 0, 1), t["grid_shape"], t["overlap"])
    vmap = grid_to_thumbnail(grid, t["stride_level0"], mask.shape, tissue["downsample"])
    return render_png(overlay(store.thumbnail(), mask, vmap, colormap, alpha), path, title, colormap, label,
                      mm_per_px=thumbnail_mm_per_px(store))


def _relative(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    if not len(v):
        return v
    lo, hi = v.min(), v.max()
    return np.zeros_like(v) if hi - lo < 1e-12 else (v - lo) / (hi - lo)


def slide_heatmaps(store: SlideStore, attention: np.ndarray, tile_risk: np.ndarray, folder: str | Path,
                   patient: str, risk: float, note: str = "") -> list[Path]:
    """Two PNGs per slide: attention (÷ the slide's largest) and tile risk (min–max in the slide)."""
    sid = store.slide["name"]
    folder = Path(folder)
    head = f"{sid} (patient {patient}, risk {risk:.2f})" + (f"  {note}" if note else "")
    a = np.asarray(attention, np.float64)
    return [
        tile_heatmap(store, a / a.max() if len(a) and a.max() > 0 else a, folder / f"{model_key(sid)}_attention.png",
                     f"{head}\nABMIL attention", "attention / slide max"),
        tile_heatmap(store, _relative(tile_risk), folder / f"{model_key(sid)}_tile_risk.png",
                     f"{head}\nper-tile risk c·h (higher = worse)", "tile risk (min–max in slide)", "coolwarm"),
    ]


def read_tiles(store: SlideStore, rows: list[int]) -> list:
    """RGB tiles (PIL images) of the given store rows (:func:`slide_clip.reading.store_tiles`)."""
    from slide_clip.reading import store_tiles

    return store_tiles(store, store.coords()[np.asarray(rows, dtype=np.int64)])


def gallery(rows: list[dict], path: str | Path, title: str) -> Path:
    """A grid of tiles: one row per patient (``{"label": str, "tiles": [PIL images]}``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ncol = max(1, max(len(r["tiles"]) for r in rows))
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.6 * ncol + 0.4, 1.75 * len(rows) + 0.6), dpi=100,
                             squeeze=False)
    for i, r in enumerate(rows):
        for j in range(ncol):
            ax = axes[i, j]
            ax.set_axis_off()
            if j < len(r["tiles"]):
                ax.imshow(np.asarray(r["tiles"][j]))
            if j == 0:
                ax.set_title(r["label"], fontsize=7, loc="left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, 100, title)
