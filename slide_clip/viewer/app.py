"""The viewer's web app (FastAPI): the page, Deep Zoom tiles, overlays, tile details, search, labels.

Everything is addressed by slide id (a query parameter), never by a file path: the only
slide files opened are those the output folder's stores name, and the only other files
served are the page's own, OpenSeadragon's (from its installed package) and files under
the output folder (``/files/...``: pictures and tables, resolved and checked to stay inside
it, symlinks included). The write endpoints are the label sets (``PUT``, QuPath import) and
re-scoring into a score set; nothing else writes.

Requests whose ``Host`` is not the address served (DNS rebinding) or whose ``Origin`` is
another site are refused; writes must be ``application/json`` (so a page elsewhere cannot
send them without a CORS preflight, which is never granted).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from slide_clip.errors import ConfigError, OutputError, SlideClipError, SlideError, StoreBusyError, StoreError
from slide_clip.viewer import labels as labels_mod
from slide_clip.viewer.assets import PAGE_DIR, openseadragon_dir, openseadragon_version
from slide_clip.viewer.catalog import Catalog, UnknownSlideError, slide_info, tile_at, tile_details
from slide_clip.viewer.deepzoom import SlidePool, TileAddressError
from slide_clip.viewer.overlays import colour_bar_png, legend, overlay_png
from slide_clip.viewer.search import Searcher

log = logging.getLogger("slide_clip.viewer")

#: Suffixes of the output folder's files the page may fetch (pictures and tables).
SERVED_SUFFIXES = (".png", ".csv", ".geojson", ".json")
#: Largest request body accepted (a label set or a QuPath GeoJSON), bytes.
MAX_BODY = 32 * 2**20
#: Hits a search returns at most.
MAX_TOP = 200

_STATUS = [(UnknownSlideError, 404), (TileAddressError, 404), (StoreBusyError, 409), (OutputError, 507),
           (StoreError, 409), (SlideError, 422), (ConfigError, 400), (SlideClipError, 400)]


def create_app(out: str | Path, cfg, *, model: str | None = None, allowed_hosts: list[str] | None = None):
    """The app serving output folder ``out`` with pipeline config ``cfg`` (scoring, heatmap, encoder).

    ``model``: the stored model to search and re-score with (needed when stores hold several).
    ``allowed_hosts``: ``Host`` header names accepted (default: loopback names).
    """
    from slide_clip.storage.options import apply

    apply(cfg)  # the config's storage section (endpoint, profile...), before the folder is listed
    catalog = Catalog(out)
    osd = openseadragon_dir()
    threading.Thread(target=_warm_imports, daemon=True).start()
    slides = SlidePool()
    searcher = Searcher(catalog.out, cfg, model)
    colormap = cfg.heatmap.colormap

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        slides.close()
        searcher.close()

    app = FastAPI(title="slide-clip viewer", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.catalog, app.state.slides, app.state.searcher = catalog, slides, searcher
    app.add_middleware(TrustedHostMiddleware,
                       allowed_hosts=allowed_hosts or ["127.0.0.1", "localhost", "[::1]", "::1"])

    @app.middleware("http")
    async def same_origin(request: Request, call_next):
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin and origin not in ("null",) and origin.split("://", 1)[-1] != host:
            return JSONResponse({"error": "requests from other sites are refused"}, status_code=403)
        if request.method not in ("GET", "HEAD") and \
                request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "writes must be sent as application/json"}, status_code=415)
        return await call_next(request)

    @app.exception_handler(SlideClipError)
    async def user_error(request, exc: SlideClipError):
        code = next(c for t, c in _STATUS if isinstance(exc, t))
        return JSONResponse({"error": str(exc)}, status_code=code)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):  # one line to the page, the traceback to the log
        log.exception("unexpected error serving %s", request.url.path)
        return JSONResponse({"error": f"unexpected error: {type(exc).__name__}: {exc}".splitlines()[0]},
                            status_code=500)

    app.mount("/static", StaticFiles(directory=PAGE_DIR), name="static")
    app.mount("/osd", StaticFiles(directory=osd), name="osd")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------------ cohort and slides
    @app.get("/api/cohort")
    def cohort():
        catalog.refresh()
        return {**catalog.cohort(), "colormap": colormap, "openseadragon": openseadragon_version(osd),
                "label_sets": labels_mod.list_sets(catalog.out)}

    @app.get("/api/slide")
    def slide(slide: str = Query(...)):
        info = slide_info(catalog.store(slide))
        dz = slides.slide(catalog.entry(slide).slide_path)
        return {**info, "dz_levels": dz.dz.level_count}

    @app.get("/api/slide/dzi")
    def dzi(slide: str = Query(...)):
        return Response(slides.slide(catalog.entry(slide).slide_path).dzi(), media_type="application/xml")

    @app.get("/api/slide/dz/{level}/{col}_{row}.jpeg")
    def dz_tile(level: int, col: int, row: int, slide: str = Query(...)):
        data = slides.jpeg(catalog.entry(slide).slide_path, level, col, row)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/slide/overlay.png")
    def overlay(slide: str = Query(...), model: str = Query(...), set: str = Query(...),
                cls: str | None = Query(None, alias="class")):
        data = overlay_png(catalog.store(slide), model, set, cls, colormap)
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-cache"})

    @app.get("/api/slide/legend")
    def cluster_legend(slide: str = Query(...), model: str = Query(...), set: str = Query(...)):
        return {"legend": legend(catalog.store(slide), model, set)}

    @app.get("/api/slide/tiles")
    def tiles(slide: str = Query(...)):
        st = catalog.store(slide)
        return {"coords": st.coords().tolist(), "extent": [float(v) for v in st.tiling["tile_extent_level0"]]}

    @app.get("/api/slide/tile")
    def tile(slide: str = Query(...), x: float = Query(...), y: float = Query(...)):
        st = catalog.store(slide)
        row = tile_at(st, x, y)
        if row is None:
            return {"slide_id": slide, "row": None}
        return tile_details(st, row)

    @app.get("/api/slide/tile.png")
    def tile_png(slide: str = Query(...), row: int = Query(...)):
        """The tile as the encoder saw it: read_tile with the store's own grid."""
        import io

        from slide_clip.stages import grid_from_store
        from slide_clip.tiling import read_tile

        st = catalog.store(slide)
        d = tile_details(st, row)
        img = read_tile(slides.slide(catalog.entry(slide).slide_path).reader, d["x"], d["y"], grid_from_store(st))
        buf = io.BytesIO()
        img.save(buf, "png")
        return Response(buf.getvalue(), media_type="image/png")

    @app.get("/api/colorbar.png")
    def colorbar():
        return Response(colour_bar_png(colormap), media_type="image/png")

    # ------------------------------------------------------------------ search
    @app.get("/api/search")
    def search(text: str | None = None, slide: str | None = None, x: int | None = None, y: int | None = None,
               top: int = 20):
        top = max(1, min(int(top), MAX_TOP))
        if text is not None and text.strip():
            return {"query": text, "hits": searcher.text(text, top)}
        if slide is not None and x is not None and y is not None:
            catalog.entry(slide)
            return {"query": f"{slide}:{x}:{y}", "hits": searcher.tile(slide, x, y, top)}
        raise ConfigError("give text=, or slide=, x= and y= of a tile")

    # ------------------------------------------------------------------ labels
    async def _json_body(request: Request):
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_BODY:
            raise ConfigError(f"request body over {MAX_BODY // 2**20} MiB")
        body = await request.body()
        if len(body) > MAX_BODY:
            raise ConfigError(f"request body over {MAX_BODY // 2**20} MiB")
        try:
            return json.loads(body or b"null")
        except ValueError:
            raise ConfigError("the request body is not JSON") from None

    @app.get("/api/labels")
    def label_sets():
        return {"sets": labels_mod.list_sets(catalog.out)}

    @app.get("/api/labels/{name}")
    def get_labels(name: str):
        return {"name": name, "rows": labels_mod.read_labels(catalog.out, name),
                "score_set": labels_mod.score_set_name(name)}

    @app.put("/api/labels/{name}")
    async def put_labels(name: str, request: Request):
        labels_mod.check_name(name)
        body = await _json_body(request)
        rows = body.get("rows") if isinstance(body, dict) else body
        from starlette.concurrency import run_in_threadpool

        written = await run_in_threadpool(labels_mod.write_labels, catalog, name, rows)
        return {"name": name, "rows": written}

    @app.post("/api/labels/{name}/rescore")
    def rescore(name: str):
        result = labels_mod.rescore(catalog, name, cfg, searcher.model or _cohort_model(searcher))
        return result

    @app.get("/api/labels/{name}/geojson")
    def export_geojson(name: str, slide: str = Query(...)):
        doc = labels_mod.to_geojson(catalog, labels_mod.read_labels(catalog.out, name), slide)
        return Response(json.dumps(doc), media_type="application/geo+json",
                        headers={"Content-Disposition": f'attachment; filename="{name}.geojson"'})

    @app.post("/api/labels/{name}/import")
    async def import_geojson(name: str, request: Request, slide: str = Query(...)):
        from starlette.concurrency import run_in_threadpool

        labels_mod.check_name(name)
        doc = await _json_body(request)
        new, skipped = await run_in_threadpool(labels_mod.from_geojson, catalog, slide, doc)
        keep = [r for r in labels_mod.read_labels(catalog.out, name)
                if (r["slide_id"], r["x"], r["y"]) not in {(n["slide_id"], n["x"], n["y"]) for n in new}]
        written = await run_in_threadpool(labels_mod.write_labels, catalog, name, keep + new)
        return {"name": name, "rows": written, "imported": len(new), "skipped_features": skipped}

    # ------------------------------------------------------------------ files under OUT
    @app.get("/files/{path:path}")
    def files(path: str):
        target = served_file(catalog.out, path)
        if isinstance(target, Path):
            return FileResponse(target)
        import mimetypes

        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return Response(target.read_bytes(), media_type=kind)

    return app


def _warm_imports() -> None:
    """Import, in the background at start, what the first tile details and searches need (skimage,
    zarr readers, the explore search; torch is left for the first text query), so a user's first
    clicks do not wait for imports."""
    import slide_clip.explore.queries  # noqa: F401
    import slide_clip.explore.search  # noqa: F401
    import slide_clip.stages  # noqa: F401
    from matplotlib import colormaps  # noqa: F401


def _cohort_model(searcher: Searcher) -> str:
    return searcher.cohort().model


def served_file(out, rel: str):
    """The file ``rel`` under ``out`` (a Path, or a UPath of a URL; the same kind is returned) if it is
    one the page may fetch, else :class:`UnknownSlideError` (404).

    Refused: absolute paths, any ``..``, anything whose real path (symlinks resolved) leaves
    ``out``, folders, and suffixes other than :data:`SERVED_SUFFIXES`. An output folder at a URL
    (a UPath) gives the object under it (an object store has no links).
    """
    bad = UnknownSlideError("no such file in the output folder")
    if not rel or rel.startswith(("/", "\\")) or "\\" in rel or "\x00" in rel:
        raise bad
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise bad
    if not isinstance(out, Path):
        target = out.joinpath(*parts)
        if target.suffix.lower() not in SERVED_SUFFIXES or not target.is_file():
            raise bad
        return target
    root = Path(os.path.realpath(out))
    target = Path(os.path.realpath(root.joinpath(*parts)))
    if os.path.commonpath([root, target]) != str(root) or not target.is_file() \
            or target.suffix.lower() not in SERVED_SUFFIXES:
        raise bad
    return target


def write_routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route that accepts anything but GET/HEAD: the app's write surface."""
    out = []
    for r in app.routes:
        for m in sorted(getattr(r, "methods", None) or ()):
            if m not in ("GET", "HEAD"):
                out.append((m, r.path))
    return out

