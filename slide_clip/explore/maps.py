"""2-D maps of a cohort's embedding space: UMAP, t-SNE or PCA of tiles or of pooled slides.

Tiles: a seeded sample stratified by slide (``per_slide`` tiles from each). Slides: one point
per slide, the normalised mean of all its tile embeddings (streamed). Points are coloured by
slide, by the top class of a stored score set (zero-shot or few-shot), or by cluster (a
``clusters`` score set). Outputs::

    <out>/explore/maps/<model>/<of>-<method>-<colour>.png     scatter with a legend
    <out>/explore/maps/<model>/<of>-<method>-mosaic.png       tile thumbnails placed on the map
    <out>/explore/maps/<model>/<of>-<method>.csv              the points: slide_id, tile, x, y, map_1, map_2,
                                                               colour__<set> (each point's label)

UMAP needs ``umap-learn``; t-SNE and PCA come from scikit-learn. Coordinates ``x, y`` are
level-0 pixels of the tile's top-left corner; ``map_1, map_2`` are map units (arbitrary).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from slide_clip.aggregate import metric_column
from slide_clip.storage.objects import replace_file
from slide_clip.errors import ConfigError
from slide_clip.explore.cohort import Cohort
from slide_clip.output import BESIDE_STORES, output_errors
from slide_clip.pictures import random_weights_title
from slide_clip.store import model_key
from slide_clip.zeroshot import normalize

METHODS = ("umap", "tsne", "pca")


def reduce_2d(features: np.ndarray, method: str = "umap", seed: int = 0) -> tuple[np.ndarray, str]:
    """(n, 2) map of ``features`` and the method used.

    With fewer than 5 points, UMAP and t-SNE fall back to PCA (they need neighbours);
    the returned name says which ran.
    """
    x = np.asarray(features, np.float32)
    n = len(x)
    if method not in METHODS:
        raise ConfigError(f"unknown map method {method!r}", hint=f"Choose one of {', '.join(METHODS)}.")
    if n < 2:
        raise ConfigError(f"a map needs at least 2 points (got {n})")
    if method != "pca" and n < 5:
        method = "pca"
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ConfigError("UMAP maps need the umap-learn package",
                              hint="pip install umap-learn, or use --method tsne or pca.") from None
        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed, n_jobs=1,
                            init="spectral" if n > 10 else "random")
        return np.asarray(reducer.fit_transform(x), np.float32), "umap"
    if method == "tsne":
        from sklearn.manifold import TSNE

        return np.asarray(TSNE(2, perplexity=min(30.0, (n - 1) / 3), random_state=seed, init="pca")
                          .fit_transform(x), np.float32), "tsne"
    from sklearn.decomposition import PCA

    return np.asarray(PCA(2, random_state=seed).fit_transform(x), np.float32), "pca"


def slide_means(cohort: Cohort) -> np.ndarray:
    """(slides, d) normalised mean embedding of each slide (streamed)."""
    out = np.zeros((len(cohort.slides), cohort.embed_dim), np.float64)
    for i, _, block in cohort.iter_blocks():
        out[i] += block.sum(0)
    return normalize(out).astype(np.float32)


def colour_labels(cohort: Cohort, slide_idx: np.ndarray, rows: np.ndarray | None, by: str
                  ) -> tuple[list[str], str, list[str]]:
    """A label per point, a legend title, and the categories in colour order: ``slide`` (the
    cohort's slides in natural order), or a score set's top class / cluster (the set's classes
    in their recorded order: cluster ``i`` is colour ``i`` here as on the cluster maps).

    For slide points (``rows`` None) a score set gives the slide's most frequent top class.
    """
    from slide_clip.pictures import natural_order

    if by == "slide":
        return ([cohort.slides[int(i)].slide_id for i in slide_idx], "slide",
                natural_order(s.slide_id for s in cohort.slides))
    labels = []
    kind, classes = None, []
    for j, i in enumerate(slide_idx):
        s = cohort.slides[int(i)]
        probs, _, attrs = s.store.scores(cohort.model, by)
        classes = _merge(classes, attrs["classes"])
        kind = attrs.get("kind")
        top = probs.argmax(1)
        cls = list(attrs["classes"])
        if rows is None:
            labels.append(cls[int(np.bincount(top, minlength=len(cls)).argmax())] if len(top) else "none")
        else:
            labels.append(cls[int(top[rows[j]])])
    if "none" in labels:
        classes = _merge(classes, ["none"])
    return labels, ("cluster" if kind == "clusters" else f"top class ({by})"), classes


def _merge(order: list[str], more) -> list[str]:
    """``order`` then the names of ``more`` it lacks, in their order."""
    return order + [c for c in more if c not in order]


def _cached_scores(cohort: Cohort, by: str):
    cache = {}

    def get(i):
        if i not in cache:
            probs, _, attrs = cohort.slides[i].store.scores(cohort.model, by)
            cache[i] = (probs.argmax(1), list(attrs["classes"]), attrs.get("kind"))
        return cache[i]
    return get


def point_labels(cohort: Cohort, slide_idx, rows, by: str) -> tuple[list[str], str, list[str]]:
    """Like :func:`colour_labels`, reading each store's score set once."""
    if by == "slide" or rows is None:
        return colour_labels(cohort, slide_idx, rows, by)
    get = _cached_scores(cohort, by)
    out, kind, order = [], None, []
    for i, r in zip(slide_idx, rows):
        top, classes, kind = get(int(i))
        order = _merge(order, classes)
        out.append(classes[int(top[int(r)])])
    return out, ("cluster" if kind == "clusters" else f"top class ({by})"), order


def draw_map(xy: np.ndarray, labels: list[str], path: str | Path, title: str, legend_title: str,
             point_size: float | None = None, order: list[str] | None = None, method: str = "map") -> Path:
    """Scatter plot of a map, one colour per category, with a legend of unblended swatches.

    ``order`` lists the categories in colour order (category ``i`` gets colour ``i`` of the one
    table, :func:`slide_clip.pictures.category_colours`); default: the labels in natural order.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from slide_clip.pictures import category_colours, natural_order, save_figure, swatch_legend

    order = list(order) if order is not None else natural_order(labels)
    colours = category_colours(len(order))
    lab = np.array(labels)
    size = point_size or (40 if len(xy) < 200 else 8)
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=100)
    names, shown = [], []
    for n, c in zip(order, colours):
        sel = lab == n
        if not sel.any():
            continue
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=np.asarray(c) / 255, linewidths=0)
        names.append(f"{n} ({int(sel.sum())})")
        shown.append(c)
    ax.set_title(title, fontsize=10)
    _map_axes(ax, method)
    swatch_legend(ax, names, shown, title=f"{legend_title} (points)")
    return save_figure(fig, path, title=title)


def _map_axes(ax, method: str) -> None:
    """Axis names of a 2-D map: its method's components, in the map's own (arbitrary) units."""
    name = {"umap": "UMAP", "tsne": "t-SNE", "pca": "PC"}.get(method, method)
    unit = "embedding units" if method == "pca" else "arbitrary units"
    ax.set_xlabel(f"{name} 1 ({unit})", fontsize=8)
    ax.set_ylabel(f"{name} 2 ({unit})", fontsize=8)
    ax.tick_params(labelsize=7)


def mosaic_cells(xy: np.ndarray, cells: int, seed: int = 0) -> dict[tuple[int, int], int]:
    """Which point each cell of a ``cells`` × ``cells`` grid over the map shows: every cell one
    point, never one twice, the layout of the map kept as far as it can be.

    The map is scaled to the grid's square and points are assigned to cells so that the sum of
    squared distances from each point to its cell's centre is least (scipy's
    ``linear_sum_assignment``: a grid-ified map, as such mosaics are usually made). With fewer
    points than cells the grid shrinks to ``floor(sqrt(n))`` a side, so no cell stays white;
    with many more points than cells, a seeded sample of ``4 × cells²`` of them takes part.
    Keys are (row, col) with row 0 at the top (largest map_2).
    """
    from scipy.optimize import linear_sum_assignment

    n = len(xy)
    g = max(1, min(int(cells), int(np.floor(np.sqrt(n)))))
    idx = np.arange(n)
    if n > 4 * g * g:
        idx = np.sort(np.random.default_rng(seed).choice(n, 4 * g * g, replace=False))
    pts = xy[idx].astype(np.float64)
    lo, hi = pts.min(0), pts.max(0)
    u = (pts - lo) / np.where(hi - lo > 0, hi - lo, 1.0) * g
    rr, cc = np.mgrid[0:g, 0:g]
    centres = np.stack([cc.ravel() + 0.5, (g - 1 - rr.ravel()) + 0.5], axis=1)
    cost = ((centres[:, None, :] - u[None, :, :]) ** 2).sum(-1)
    cell_i, point_j = linear_sum_assignment(cost)
    return {(int(rr.ravel()[c]), int(cc.ravel()[c])): int(idx[j]) for c, j in zip(cell_i, point_j)}


def draw_mosaic(cohort: Cohort, xy: np.ndarray, slide_idx, rows, path: str | Path, cells: int = 24,
                thumb: int = 64, labels: list[str] | None = None, order: list[str] | None = None,
                legend_title: str | None = None, title: str = "", method: str = "map") -> Path:
    """Tile thumbnails placed at their map positions, with a title, the map's axes and, with
    ``labels``, each thumbnail framed in its category's colour and a legend of those colours.

    The grid (:func:`mosaic_cells`) has at most ``cells`` cells a side and every cell shows a
    tile, so the thumbnails cover the map instead of leaving it white.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from PIL import Image, ImageDraw

    from slide_clip.explore.gallery import read_tiles
    from slide_clip.pictures import category_colours, natural_order, save_figure, swatch_legend

    chosen = mosaic_cells(xy, cells)
    cells = 1 + max(max(k) for k in chosen)
    keys = list(chosen)
    pts = [chosen[k] for k in keys]
    coords = {int(i): cohort.coords(int(i)) for i in set(int(slide_idx[p]) for p in pts)}
    sids = [cohort.slides[int(slide_idx[p])].slide_id for p in pts]
    xs = [coords[int(slide_idx[p])][int(rows[p])][0] for p in pts]
    ys = [coords[int(slide_idx[p])][int(rows[p])][1] for p in pts]
    tiles = read_tiles(cohort, sids, xs, ys)
    canvas = Image.new("RGB", (cells * thumb, cells * thumb), (255, 255, 255))
    frame = max(2, thumb // 16)
    order = list(order) if order is not None else (natural_order(labels) if labels is not None else [])
    colours = category_colours(len(order))
    for (r, c), tile, p in zip(keys, tiles, pts):
        canvas.paste(tile.resize((thumb, thumb), Image.Resampling.BILINEAR), (c * thumb, r * thumb))
        if labels is not None:
            colour = tuple(int(v) for v in colours[order.index(labels[p])])
            ImageDraw.Draw(canvas).rectangle((c * thumb, r * thumb, (c + 1) * thumb - 1, (r + 1) * thumb - 1),
                                             outline=colour, width=frame)
    lo, hi = xy.min(0), xy.max(0)
    side = min(9.0, cells * thumb / 100)
    fig, ax = plt.subplots(figsize=(side + 2.4, side + 0.9), dpi=100)
    ax.imshow(np.asarray(canvas), extent=(lo[0], hi[0], lo[1], hi[1]), aspect="auto", interpolation="antialiased")
    ax.set_title(title, fontsize=10)
    _map_axes(ax, method)
    if labels is not None:
        present = [n for n in order if n in {labels[p] for p in pts}]
        swatch_legend(ax, present, [colours[order.index(n)] for n in present],
                      title=f"{legend_title or 'category'} (frame)")
    return save_figure(fig, path, title=title)


_METHOD_NAMES = {"umap": "UMAP", "tsne": "t-SNE", "pca": "PCA"}


def _sampled(cohort: Cohort, n_points: int, of: str) -> str:
    """What a map shows, counted: "200 of 301 tiles sampled from 2 slides" (or all of them)."""
    from slide_clip.text import plural

    if of == "slides":
        return plural(n_points, "slide") + " (the mean of each slide's tiles)"
    n, total = n_points, cohort.n_tiles
    slides = plural(len(cohort.slides), "slide")
    if n >= total:
        return f"all {plural(total, 'tile')} of {slides}"
    return f"{n} of {plural(total, 'tile')} sampled from {slides}"


def embedding_map(stores, *, model: str | None = None, of: str = "tiles", method: str = "umap",
                  per_slide: int = 200, seed: int = 0, colour_by=("slide",), mosaic: bool = False,
                  mosaic_cells_: int = 24, thumb: int = 64) -> dict:
    """Draw a 2-D map of a cohort (tiles or slides) coloured each way asked; returns what was written.

    Parameters
    ----------
    of : ``"tiles"`` or ``"slides"``
        Points: a seeded sample of ``per_slide`` tiles per slide, or one pooled point per slide.
    method : ``"umap"``, ``"tsne"`` or ``"pca"``
    colour_by : sequence of str
        ``slide`` and/or score set names (top class) or ``clusters`` set names (cluster).
    mosaic : bool
        Also place tile thumbnails on the map (tiles only).

    Returns
    -------
    dict with ``points`` (DataFrame), ``files``, ``method`` (the one that ran), ``failed``.
    """
    if of not in ("tiles", "slides"):
        raise ConfigError(f"--of must be tiles or slides (got {of!r})")
    cohort = Cohort.open(stores, model)
    if of == "tiles":
        slide_idx, rows, feats = cohort.sample(per_slide=per_slide, seed=seed)
    else:
        slide_idx, rows, feats = np.arange(len(cohort.slides)), None, slide_means(cohort)
    xy, used = reduce_2d(feats, method, seed)
    pts = pd.DataFrame({"slide_id": [cohort.slides[int(i)].slide_id for i in slide_idx]})
    if rows is not None:
        pts["tile"] = rows
        coords = {int(i): cohort.coords(int(i)) for i in np.unique(slide_idx)}
        xy0 = np.array([coords[int(i)][int(r)] for i, r in zip(slide_idx, rows)], np.int64).reshape(-1, 2)
        pts["x"], pts["y"] = xy0[:, 0], xy0[:, 1]
    pts["map_1"], pts["map_2"] = xy[:, 0], xy[:, 1]
    out = cohort.out / "explore" / "maps" / model_key(cohort.model)
    files = []
    labelled = [(by, *point_labels(cohort, slide_idx, rows, by)) for by in colour_by]  # read before writing
    what = _sampled(cohort, len(pts), of)
    with output_errors(cohort.out, BESIDE_STORES):
        for by, labels, legend, order in labelled:
            pts[metric_column("colour", by)] = labels
            title = random_weights_title(f"{_METHOD_NAMES.get(used, used)} of {what} [{cohort.model}], coloured by "
                                         f"{legend}", cohort.random_weights)
            files.append(draw_map(xy, labels, out / f"{of}-{used}-{model_key(by)}.png", title, legend,
                                  order=order, method=used))
        if mosaic and rows is not None:
            by, labels, legend, order = labelled[0] if labelled else (None, None, None, None)
            t = cohort.slides[0].store.tiling
            side_um = float(t["tile_size"]) * float(t["target_mpp"])
            title = random_weights_title(
                f"{_METHOD_NAMES.get(used, used)} of {what} [{cohort.model}]: tiles on the map\n(each thumbnail a "
                f"{int(t['tile_size'])} px tile, {side_um:g} µm wide; frames coloured by {legend})", cohort.random_weights)
            files.append(draw_mosaic(cohort, xy, slide_idx, rows, out / f"{of}-{used}-mosaic.png", mosaic_cells_,
                                     thumb, labels, order, legend, title, used))
        csv = out / f"{of}-{used}.csv"
        with replace_file(csv) as tmp:
            pts.to_csv(tmp, index=False)
        files.append(csv)
    return {"points": pts, "files": files, "method": used, "failed": cohort.failed, "dir": out}
