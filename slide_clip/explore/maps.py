"""2-D maps of a cohort's embedding space: UMAP, t-SNE or PCA of tiles or of pooled slides.

Tiles: a seeded sample stratified by slide (``per_slide`` tiles from each). Slides: one point
per slide, the normalised mean of all its tile embeddings (streamed). Points are coloured by
slide, by the top class of a stored score set (zero-shot or few-shot), or by cluster (a
``clusters`` score set). Outputs::

    <out>/explore/maps/<model>/<of>-<method>-<colour>.png     scatter with a legend
    <out>/explore/maps/<model>/<of>-<method>-mosaic.png       tile thumbnails placed on the map
    <out>/explore/maps/<model>/<of>-<method>.csv              the points: slide_id, tile, x, y, map_1, map_2, labels

UMAP needs ``umap-learn``; t-SNE and PCA come from scikit-learn. Coordinates ``x, y`` are
level-0 pixels of the tile's top-left corner; ``map_1, map_2`` are map units (arbitrary).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from slide_clip.atomic import replace_file
from slide_clip.errors import ConfigError
from slide_clip.explore.cohort import Cohort
from slide_clip.output import BESIDE_STORES, output_errors
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


def colour_labels(cohort: Cohort, slide_idx: np.ndarray, rows: np.ndarray | None, by: str) -> tuple[list[str], str]:
    """A label per point and a legend title: ``slide``, or a score set's top class / cluster.

    For slide points (``rows`` None) a score set gives the slide's most frequent top class.
    """
    if by == "slide":
        return [cohort.slides[int(i)].slide_id for i in slide_idx], "slide"
    labels = []
    kind = None
    for j, i in enumerate(slide_idx):
        s = cohort.slides[int(i)]
        probs, _, attrs = s.store.scores(cohort.model, by)
        classes = list(attrs["classes"])
        kind = attrs.get("kind")
        top = probs.argmax(1)
        if rows is None:
            labels.append(classes[int(np.bincount(top, minlength=len(classes)).argmax())] if len(top) else "none")
        else:
            labels.append(classes[int(top[rows[j]])])
    return labels, ("cluster" if kind == "clusters" else f"top class ({by})")


def _cached_scores(cohort: Cohort, by: str):
    cache = {}

    def get(i):
        if i not in cache:
            probs, _, attrs = cohort.slides[i].store.scores(cohort.model, by)
            cache[i] = (probs.argmax(1), list(attrs["classes"]), attrs.get("kind"))
        return cache[i]
    return get


def point_labels(cohort: Cohort, slide_idx, rows, by: str) -> tuple[list[str], str]:
    """Like :func:`colour_labels`, reading each store's score set once."""
    if by == "slide" or rows is None:
        return colour_labels(cohort, slide_idx, rows, by)
    get = _cached_scores(cohort, by)
    out, kind = [], None
    for i, r in zip(slide_idx, rows):
        top, classes, kind = get(int(i))
        out.append(classes[int(top[int(r)])])
    return out, ("cluster" if kind == "clusters" else f"top class ({by})")


def draw_map(xy: np.ndarray, labels: list[str], path: str | Path, title: str, legend_title: str,
             point_size: float | None = None) -> Path:
    """Scatter plot of a map, one colour per label (in sorted order), with a legend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from slide_clip.heatmap import categorical_colours

    names = sorted(set(labels))
    colours = categorical_colours(len(names)) / 255
    lab = np.array(labels)
    size = point_size or (40 if len(xy) < 200 else 6)
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=100)
    for n, c in zip(names, colours):
        sel = lab == n
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=c, label=f"{n} ({int(sel.sum())})", linewidths=0)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(title=legend_title, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
              markerscale=max(1.0, 20 / size))
    path = Path(path)
    try:
        with replace_file(path) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def mosaic_cells(xy: np.ndarray, cells: int) -> dict[tuple[int, int], int]:
    """Which point each occupied cell of a ``cells`` × ``cells`` grid over the map shows.

    The point closest to the cell's centre, so thumbnails never overlap. Keys are (row, col)
    with row 0 at the top (largest map_2).
    """
    lo, hi = xy.min(0), xy.max(0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    u = (xy - lo) / span * (cells - 1e-6)
    col = np.floor(u[:, 0]).astype(int)
    row = (cells - 1) - np.floor(u[:, 1]).astype(int)
    centre_d = (u[:, 0] - (col + 0.5)) ** 2 + (u[:, 1] - ((cells - 1 - row) + 0.5)) ** 2
    best: dict[tuple[int, int], int] = {}
    for j in np.argsort(centre_d, kind="stable"):
        best.setdefault((int(row[j]), int(col[j])), int(j))
    return best


def draw_mosaic(cohort: Cohort, xy: np.ndarray, slide_idx, rows, path: str | Path, cells: int = 24,
                thumb: int = 48) -> Path:
    """A ``cells * thumb`` pixel square picture: tile thumbnails placed at their map positions."""
    from PIL import Image

    from slide_clip.explore.gallery import read_tiles

    chosen = mosaic_cells(xy, cells)
    keys = list(chosen)
    pts = [chosen[k] for k in keys]
    coords = {int(i): cohort.coords(int(i)) for i in set(int(slide_idx[p]) for p in pts)}
    sids = [cohort.slides[int(slide_idx[p])].slide_id for p in pts]
    xs = [coords[int(slide_idx[p])][int(rows[p])][0] for p in pts]
    ys = [coords[int(slide_idx[p])][int(rows[p])][1] for p in pts]
    tiles = read_tiles(cohort, sids, xs, ys)
    canvas = Image.new("RGB", (cells * thumb, cells * thumb), (255, 255, 255))
    for (r, c), tile in zip(keys, tiles):
        canvas.paste(tile.resize((thumb, thumb), Image.Resampling.BILINEAR), (c * thumb, r * thumb))
    path = Path(path)
    with replace_file(path) as tmp:
        canvas.save(tmp, optimize=True)
    return path


def embedding_map(stores, *, model: str | None = None, of: str = "tiles", method: str = "umap",
                  per_slide: int = 200, seed: int = 0, colour_by=("slide",), mosaic: bool = False,
                  mosaic_cells_: int = 24, thumb: int = 48) -> dict:
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
    with output_errors(cohort.out, BESIDE_STORES):
        for by, labels, legend in labelled:
            pts[f"colour:{by}"] = labels
            title = f"{of} of {len(cohort.slides)} slides, {used.upper()} [{cohort.model}], coloured by {legend}"
            files.append(draw_map(xy, labels, out / f"{of}-{used}-{model_key(by)}.png", title, legend))
        if mosaic and rows is not None:
            files.append(draw_mosaic(cohort, xy, slide_idx, rows, out / f"{of}-{used}-mosaic.png", mosaic_cells_,
                                     thumb))
        csv = out / f"{of}-{used}.csv"
        with replace_file(csv) as tmp:
            pts.to_csv(tmp, index=False)
        files.append(csv)
    return {"points": pts, "files": files, "method": used, "failed": cohort.failed, "dir": out}
