"""Explore a cohort's stores: text and image search, tissue clusters, embedding maps, AnnData.

Everything here reads the per-slide stores (never re-encodes a stored tile) through
:class:`~slide_clip.explore.cohort.Cohort`, streaming embeddings chunk by chunk.

- :func:`slide_clip.explore.retrieval.search`: words / image files / stored tiles → ranked tiles,
  a table and galleries (exact streaming search, or an optional FAISS index: :mod:`.ann`).
- :func:`slide_clip.explore.clusters.cluster`: k-means on a seeded sample, every tile assigned;
  a ``clusters`` score set per store, cluster maps, galleries, a composition table.
- :func:`slide_clip.explore.maps.embedding_map`: UMAP / t-SNE / PCA maps of tiles or slides.
- :func:`slide_clip.explore.h5ad.export_h5ad`: an AnnData ``.h5ad`` of tiles for scanpy.
"""

from slide_clip.explore.cohort import Cohort

__all__ = ["Cohort"]
