"""Tissue clusters without labels: k-means fitted on a seeded sample, every tile assigned, streamed.

1. Fit: scikit-learn ``KMeans`` on a seeded sample of tiles pooled across the cohort
   (stratified by slide: each slide contributes in proportion to its tile count).
2. Assign: stream every store chunk by chunk; each tile goes to the nearest centroid
   (squared Euclidean distance in embedding space).
3. Write, per slide, a score set of kind ``clusters`` into the store
   (``scores/<model>/<set>/``, see docs/FORMAT.md): ``logits`` = −squared distance to each
   centroid, ``probs`` = one-hot of the assigned cluster, ``classifier`` = the centroids,
   ``grid`` = fraction of each cluster per grid cell.
4. Draw a cluster map per slide (the heatmap renderer, categorical colours and a legend),
   a gallery of each cluster's most central tiles, and the cohort's composition table::

    <out>/tables/<model>/<set>.parquet, .csv          one row per slide: fraction__cluster_i
    <out>/explore/clusters/<set>-<model>/maps/<slide_id>.png
    <out>/explore/clusters/<set>-<model>/gallery-cluster_<i>.png, gallery.html
    <out>/explore/clusters/<set>-<model>/centroids.npy, clusters.json

``<set>`` defaults to ``clusters-k<k>``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from slide_clip.aggregate import metric_column
from slide_clip.storage.objects import replace_file, write_text
from slide_clip.errors import ConfigError, SlideClipError
from slide_clip.explore.cohort import Cohort
from slide_clip.explore.search import TopN
from slide_clip.faults import kill_point
from slide_clip.output import BESIDE_STORES, output_errors
from slide_clip.storage.filesystems import upath
from slide_clip.storage.owner import store_owner
from slide_clip.store import model_key
from slide_clip.text import plural

KIND = "clusters"


def cluster_names(k: int) -> list[str]:
    return [f"cluster_{i}" for i in range(k)]


def fit_kmeans(features: np.ndarray, k: int, seed: int = 0, n_init: int = 4) -> np.ndarray:
    """(k, d) float32 k-means centroids of ``features`` (scikit-learn, seeded)."""
    from sklearn.cluster import KMeans

    if len(features) < k:
        raise ConfigError(f"only {plural(len(features), 'tile')} to fit {k} clusters", hint="Choose a smaller --k.")
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(np.asarray(features, np.float64))
    return km.cluster_centers_.astype(np.float32)


def squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n, k) squared Euclidean distances of rows of ``x`` to each centroid (never negative)."""
    x = np.asarray(x, np.float32)
    c = np.asarray(centroids, np.float32)
    d2 = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
    return np.maximum(d2, 0)


def composition_table(cohort: Cohort, labels: dict[int, np.ndarray], k: int, set_name: str) -> pd.DataFrame:
    """One row per slide: ``slide_id, status, error, model, set, k, n_tiles, fraction__cluster_i``.

    Stores the cohort could not use appear with ``status`` ``failed`` and their error
    (fractions empty), so no slide goes missing silently.
    """
    names = cluster_names(k)
    rows = []
    for i, s in enumerate(cohort.slides):
        if i not in labels:
            continue  # failed while assigned: listed in cohort.failed
        lab = labels[i]
        counts = np.bincount(lab, minlength=k)
        frac = counts / max(1, len(lab))
        rows.append({"slide_id": s.slide_id, "status": "ok", "error": None, "model": cohort.model,
                     "set": set_name, "k": k, "n_tiles": int(len(lab)),
                     **{metric_column("fraction", n): float(f) for n, f in zip(names, frac)}})
    for path, err in cohort.failed:
        from slide_clip.store import STORE_SUFFIX

        sid = upath(path).name.removesuffix(STORE_SUFFIX)
        rows.append({"slide_id": sid, "status": "failed", "error": err, "model": cohort.model, "set": set_name,
                     "k": k, "n_tiles": None})
    cols = ["slide_id", "status", "error", "model", "set", "k", "n_tiles", *[metric_column("fraction", n) for n in names]]
    return pd.DataFrame(rows).reindex(columns=cols)


def cluster(stores, *, k: int = 12, model: str | None = None, sample: int = 20000, seed: int = 0,
            name: str | None = None, maps: bool = True, gallery: bool = True, per_cluster: int = 8,
            alpha: float = 0.6) -> dict:
    """Cluster a cohort's tiles and write scores, maps, galleries and the composition table.

    Parameters
    ----------
    stores : list of paths
        Stores or folders of stores.
    k : int
        Number of clusters.
    sample : int
        Tiles the k-means is fitted on (a seeded sample, stratified by slide; all tiles if fewer).
    seed : int
        Seed of the sample and of k-means.
    name : str, optional
        Score set name (default ``clusters-k<k>``).
    per_cluster : int
        Representative tiles per cluster in the gallery: the tiles closest to its centroid.

    Returns
    -------
    dict with ``set``, ``table`` (DataFrame), ``table_path`` (Parquet), ``csv``, ``maps``,
    ``galleries``, ``dir``, ``failed``.
    """
    from slide_clip.heatmap import probability_grid

    if k < 2:
        raise ConfigError(f"--k must be at least 2 (got {k})")
    set_name = name or f"clusters-k{k}"
    cohort = Cohort.open(stores, model)
    _, _, feats = cohort.sample(total=sample if cohort.n_tiles > sample else None, seed=seed)
    centroids = fit_kmeans(feats, k, seed)
    del feats
    digest = hashlib.sha256(centroids.tobytes()).hexdigest()
    names = cluster_names(k)
    central = TopN(k, per_cluster)
    labels: dict[int, np.ndarray] = {}
    for i, s in enumerate(cohort.slides):
        try:
            d2_parts = []
            for start, block in s.store.iter_embeddings(cohort.model):
                d2 = squared_distances(block, centroids)
                lab = d2.argmin(1)
                d2_parts.append(d2)
                own = np.where(np.arange(k)[None, :] == lab[:, None], -d2, -np.inf)
                central.update(own, i, np.arange(start, start + len(block)))
            d2 = np.concatenate(d2_parts) if d2_parts else np.zeros((0, k), np.float32)
            lab = d2.argmin(1).astype(np.int64) if len(d2) else np.zeros(0, np.int64)
            labels[i] = lab
            onehot = np.eye(k, dtype=np.float32)[lab]
            t = s.store.tiling
            grid = np.stack([probability_grid(s.store.grid(), onehot[:, c], t["grid_shape"], t["overlap"])
                             for c in range(k)])
            attrs = {"kind": KIND, "classes": names, "method": "kmeans", "k": k, "seed": seed,
                     "sample_size": int(min(sample, cohort.n_tiles)), "fit_slides": cohort.slide_ids,
                     "prompt_hash": digest, "centroids_sha256": digest,
                     "weights_sha256": cohort.weights_sha256}
            # the set is swapped in whole (see SlideStore.write_scores); a read-only or full disk: this slide only
            with output_errors(s.path, BESIDE_STORES), store_owner(s.path):
                s.store.write_scores(cohort.model, set_name, -d2, onehot, centroids, attrs, grid=grid)
            kill_point("clusters-stored")
        except SlideClipError as e:  # a store locked by a writer, a damaged chunk: this slide only
            labels.pop(i, None)
            cohort.failed.append((str(s.path), str(e)))
    with output_errors(cohort.out, BESIDE_STORES):
        return _cluster_files(cohort, set_name, k, seed, sample, digest, centroids, labels, central, maps, gallery,
                              per_cluster, alpha)


def _cluster_files(cohort, set_name, k, seed, sample, digest, centroids, labels, central, maps, gallery, per_cluster,
                   alpha) -> dict:
    """The composition table, maps, gallery and parameters of a clustering (each file replaced whole)."""
    names = cluster_names(k)
    out = cohort.out / "explore" / "clusters" / f"{model_key(set_name)}-{model_key(cohort.model)}"
    with replace_file(out / "centroids.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, centroids)
    table = composition_table(cohort, labels, k, set_name)
    tables = cohort.out / "tables" / model_key(cohort.model)  # beside the pooled survival tables
    stem = tables / model_key(set_name)
    with replace_file(stem.with_suffix(".parquet")) as tp, replace_file(stem.with_suffix(".csv")) as tc:
        table.to_parquet(tp, index=False)
        table.to_csv(tc, index=False)
    written_maps = [cluster_map(cohort, i, set_name, out / "maps", alpha) for i in labels] if maps else []
    galleries = []
    if gallery:
        from slide_clip.explore.gallery import table_galleries

        sc, sl, rw = central.result()
        rows = []
        for c in range(k):
            for j in range(sc.shape[1]):
                if np.isfinite(sc[c, j]) and int(sl[c, j]) in labels:
                    x, y = cohort.coords(int(sl[c, j]))[int(rw[c, j])]
                    rows.append({"cluster": names[c], "slide_id": cohort.slides[int(sl[c, j])].slide_id,
                                 "tile": int(rw[c, j]), "x": int(x), "y": int(y), "score": float(-sc[c, j])})
        reps = pd.DataFrame(rows, columns=["cluster", "slide_id", "tile", "x", "y", "score"])
        with replace_file(out / "representatives.csv") as tmp:
            reps.to_csv(tmp, index=False)
        galleries = table_galleries(cohort, reps, "cluster", out, set_name, "sq. dist", columns=per_cluster)
    info = {"set": set_name, "model": cohort.model, "k": k, "seed": seed, "sample": sample,
            "centroids_sha256": digest, "slides": cohort.slide_ids, "failed": cohort.failed,
            "table": str(stem.with_suffix(".parquet"))}
    write_text(out / "clusters.json", json.dumps(info, indent=1))
    return {"set": set_name, "table": table, "table_path": stem.with_suffix(".parquet"),
            "csv": stem.with_suffix(".csv"), "maps": written_maps, "galleries": galleries, "dir": out,
            "failed": cohort.failed, "labels": labels, "centroids": centroids}


def stored_labels(store, model: str, set_name: str) -> tuple[np.ndarray, list[str]]:
    """(n,) cluster index of each tile and the cluster names, from a store's ``clusters`` set."""
    probs, _, attrs = store.scores(model, set_name)
    if attrs.get("kind") != KIND:
        raise ConfigError(f"score set {set_name!r} is of kind {attrs.get('kind')!r}, not {KIND!r}",
                          hint="Give a set written by `slide-clip cluster`.")
    return probs.argmax(1).astype(np.int64), list(attrs["classes"])


def cluster_map(cohort: Cohort, slide_index: int, set_name: str, out_dir: str | Path, alpha: float = 0.6) -> Path:
    """Draw one slide's clusters beside its thumbnail; returns the PNG.

    The clusters are drawn opaque, each in its colour of the one table
    (:func:`slide_clip.pictures.category_colours`, cluster ``i`` colour ``i``, as in the maps,
    the mosaic and the viewer), so the legend's swatches are the colours on the map; the
    tissue's edge is outlined. ``alpha`` is kept for callers; the map is not blended.
    """
    from slide_clip.heatmap import category_image, grid_to_thumbnail, label_grid, render_category_png
    from slide_clip.pictures import category_colours, random_weights_title, thumbnail_mm_per_px

    s = cohort.slides[slide_index]
    lab, names = stored_labels(s.store, cohort.model, set_name)
    t = s.store.tiling
    grid = label_grid(s.store.grid(), lab, len(names), t["grid_shape"], t["overlap"])
    tissue = s.store.group["tissue"].attrs
    mask = s.store.mask()
    lmap = grid_to_thumbnail(grid, t["stride_level0"], mask.shape, tissue["downsample"])
    colours = category_colours(len(names))
    present = np.bincount(lab, minlength=len(names))
    legend = [f"{n} ({plural(int(c), 'tile')})" for n, c in zip(names, present)]
    random = bool(s.store.embedding_attrs(cohort.model).get("random_weights"))
    title = random_weights_title(f"{s.slide_id}: {set_name}, {len(names)} clusters of "
                                 f"{plural(len(lab), 'tile')} [{cohort.model}]", random)
    return render_category_png(s.store.thumbnail(), category_image(mask, lmap, colours),
                               upath(out_dir) / f"{s.slide_id}.png", title, legend, colours, "cluster",
                               thumbnail_mm_per_px(s.store))
