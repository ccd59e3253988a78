"""AnnData export for scanpy users: tiles × embedding dimensions, with tile metadata in ``obs``.

``X``: (tiles, d) float32 embeddings as stored (L2-normalised). ``obs`` (one row per tile,
index ``<slide_id>:<row>``):

- ``slide_id`` (categorical), ``tile`` (row in the store), ``x``, ``y`` (level-0 top-left),
  ``grid_row``, ``grid_col``, ``tissue_fraction``;
- per score set ``<set>``: ``<set>:top`` (categorical top class, or cluster for a
  ``clusters`` set) and, for zero-/few-shot sets, ``<set>:p(<class>)`` probabilities.

``var``: ``dim_0 … dim_{d-1}``. ``uns['slide_clip']``: model, weights_sha256, slides,
score sets. With ``per_slide`` a seeded sample of tiles per slide is exported; without it
every tile (memory: tiles × d × 4 bytes, as the file holds them all).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from slide_clip.errors import ConfigError
from slide_clip.explore.cohort import Cohort


def export_h5ad(stores, path: str | Path, *, model: str | None = None, per_slide: int | None = None, seed: int = 0,
                score_sets: list[str] | None = None, obsm: dict[str, np.ndarray] | None = None) -> dict:
    """Write an ``.h5ad`` of the cohort's tiles; returns ``{"path", "n_obs", "failed"}``.

    ``score_sets`` defaults to every score set the first store holds for the model; a set
    missing from any store is an error (never a column of blanks).
    """
    try:
        import anndata as ad
    except ImportError:
        raise ConfigError("AnnData export needs the anndata package", hint="pip install anndata.") from None
    from slide_clip.store import model_key

    cohort = Cohort.open(stores, model)
    slide_idx, rows, X = cohort.sample(per_slide=per_slide, seed=seed)
    if score_sets is None:
        first = cohort.slides[0].store
        score_sets = [s for m, s in first.score_sets(cohort.model) if m == model_key(cohort.model)]
    obs_parts = []
    for i, s in enumerate(cohort.slides):
        sel = slide_idx == i
        r = rows[sel]
        coords, grid, tf = s.store.coords(), s.store.grid(), s.store.tissue_fraction()
        part = pd.DataFrame({"slide_id": s.slide_id, "tile": r, "x": coords[r, 0], "y": coords[r, 1],
                             "grid_row": grid[r, 0], "grid_col": grid[r, 1], "tissue_fraction": tf[r]})
        for name in score_sets:
            probs, _, attrs = s.store.scores(cohort.model, name)
            classes = list(attrs["classes"])
            part[f"{name}:top"] = [classes[j] for j in probs[r].argmax(1)] if len(r) else []
            if attrs.get("kind") != "clusters":
                for c, col in zip(classes, probs[r].T):
                    part[f"{name}:p({c})"] = col
        obs_parts.append(part)
    obs = pd.concat(obs_parts, ignore_index=True)
    obs.index = [f"{a}:{b}" for a, b in zip(obs["slide_id"], obs["tile"])]
    for c in ["slide_id", *[f"{n}:top" for n in score_sets]]:
        obs[c] = obs[c].astype("category")
    var = pd.DataFrame(index=[f"dim_{j}" for j in range(cohort.embed_dim)])
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.uns["slide_clip"] = {"model": cohort.model, "weights_sha256": cohort.weights_sha256,
                               "slides": cohort.slide_ids, "score_sets": list(score_sets),
                               "per_slide": -1 if per_slide is None else int(per_slide), "seed": seed}
    for k, v in (obsm or {}).items():
        adata.obsm[k] = np.asarray(v)
    from slide_clip.output import output_errors
    from slide_clip.storage.objects import replace_file
    from slide_clip.storage.urls import is_url

    p = str(path) if is_url(path) else Path(path)  # a URL: written locally, then uploaded whole
    with output_errors(p, "--h5ad"), replace_file(p) as tmp:
        adata.write_h5ad(tmp)
    return {"path": p, "n_obs": int(adata.n_obs), "failed": cohort.failed}
