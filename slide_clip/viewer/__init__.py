"""A local slide viewer (`slide-clip view OUT`): a cohort's slides at full resolution, overlays of
any score set, tile details, cohort search, and a labelling loop that re-scores from the
stored embeddings.

- :mod:`.catalog`: the output folder's slides, stores, score sets and cohort tables (read only).
- :mod:`.deepzoom`: Deep Zoom tiles from the pipeline's own reader, OpenSlide's tile geometry.
- :mod:`.overlays`: one small image per score set (one pixel per grid cell), colour bar, legends.
- :mod:`.search`: text and "more like this tile" search (the explore search, exact).
- :mod:`.labels`: label sets as few-shot example CSVs, re-scoring, QuPath GeoJSON out and in.
- :mod:`.app`: the FastAPI app; :mod:`.server`: uvicorn on a loopback socket.
- ``static/``: the page (HTML, JS, CSS; no build step). OpenSeadragon is served from its
  installed package (:mod:`.assets`).
"""

from slide_clip.viewer.server import serve

__all__ = ["serve"]
