"""The viewer's server over HTTP (a real uvicorn on a free loopback port): what it serves and what it
refuses, its write surface, label files in fewshot's format, QuPath GeoJSON, and Deep Zoom
tiles equal to OpenSlide's DeepZoomGenerator's on every format the pipeline reads.

Expected values come from OpenSlide, zarr, numpy and the files on disk, never from the viewer.
"""

from __future__ import annotations

import csv
import http.client
import json
import os
from pathlib import Path

import numpy as np
import pytest

from viewer_cohort import SCENES, T, ThreadServer, build_cohort, snapshot, texture_at


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_registry):
    out, cfg = build_cohort(tmp_path_factory.mktemp("viewer_srv"), tiny_registry, names=("slide_a",))
    (out / "secret_outside.txt").write_text("not served: wrong suffix")
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    outside.write_bytes(b"\x89PNG outside OUT")
    os.symlink(outside, out / "link_out.png")          # a symlink leaving OUT
    os.symlink(outside.parent, out / "link_dir")       # a folder symlink leaving OUT
    srv = ThreadServer(out, cfg)
    yield srv, out, cfg, outside
    srv.stop()


def raw_get(srv, path: str, headers=None, method="GET", body=None):
    """One request with the path sent byte for byte (no client-side normalisation of '..')."""
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    c.putrequest(method, path, skip_accept_encoding=True, skip_host=headers is not None and "Host" in headers)
    for k, v in (headers or {}).items():
        c.putheader(k, v)
    if body is not None:
        c.putheader("Content-Length", str(len(body)))
    c.endheaders()
    if body is not None:
        c.send(body)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), data


def get_json(srv, path):
    status, _, data = raw_get(srv, path)
    assert status == 200, data
    return json.loads(data)


# ----------------------------------------------------------------------------- what is served
def test_files_under_out_are_served(served):
    srv, out, _, _ = served
    status, headers, data = raw_get(srv, "/files/slide_a_qc.png")
    assert status == 200 and data == (out / "slide_a_qc.png").read_bytes()


@pytest.mark.parametrize("path", [
    "/files/../../../../etc/passwd",
    "/files/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/files/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/files/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/files//etc/passwd",
    "/files/%2Fetc%2Fpasswd",
    "/files/..%5c..%5cetc%5cpasswd",
    "/files/link_out.png",                 # symlink to a file outside OUT
    "/files/link_dir/secret.png",          # through a symlinked folder
    "/files/secret_outside.txt",           # under OUT, but not a picture or table
    "/files/slide_a.zarr/zarr.json/..",
    "/files/slide_a.zarr",
    "/static/../../../../etc/passwd",
    "/static/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/static/%2e%2e/%2e%2e/viewer/app.py",
    "/osd/../../../../etc/passwd",
    "/osd/..%2f..%2f..%2f__init__.py",
    "/osd/%2e%2e/%2e%2e/%2e%2e/__init__.py",
    "/api/slide/dzi?slide=../../../../etc/passwd",
    "/api/slide/dzi?slide=%2Fetc%2Fpasswd",
    "/api/slide?slide=/etc/passwd",
    "/api/slide/tile.png?slide=..%2Fslide_a&row=0",
])
def test_no_path_leaves_out_or_the_installed_assets(served, path):
    srv, _, _, outside = served
    status, _, data = raw_get(srv, path)
    assert status in (400, 404), (path, status, data[:200])
    assert b"root:" not in data and outside.read_bytes() not in data and b"import" not in data


def test_page_and_openseadragon_come_from_the_installed_packages(served):
    import importlib.util

    srv, *_ = served
    status, _, page = raw_get(srv, "/")
    assert status == 200 and b"osd/openseadragon.min.js" in page
    status, _, js = raw_get(srv, "/osd/openseadragon.min.js")
    spec = importlib.util.find_spec("tissuumaps")
    installed = sorted(Path(next(iter(spec.submodule_search_locations))).glob(
        "static/vendor/openseadragon-bin-*/openseadragon.min.js"))[-1]
    assert status == 200 and js == installed.read_bytes() and b"openseadragon" in js[:200]
    repo = Path(__file__).resolve().parents[1]
    copies = [f for d in ("slide_clip", "flows", "tasks", "configs") for f in (repo / d).rglob("*.js")
              if b"OpenSeadragon" in f.read_bytes()[:5000]]
    assert not copies, f"OpenSeadragon copied into the repository: {copies}"


def test_only_label_and_score_set_routes_write(served):
    from slide_clip.viewer.app import write_routes

    srv, *_ = served
    assert sorted(write_routes(srv.app)) == [("POST", "/api/labels/{name}/import"),
                                             ("POST", "/api/labels/{name}/rescore"),
                                             ("PUT", "/api/labels/{name}")]
    status, _, _ = raw_get(srv, "/api/cohort", method="POST", headers={"Content-Type": "application/json"}, body=b"{}")
    assert status == 405


def test_other_hosts_and_sites_and_form_posts_are_refused(served):
    srv, out, *_ = served
    status, _, _ = raw_get(srv, "/api/cohort", headers={"Host": "evil.example:80"})
    assert status == 400  # DNS rebinding: a name that is not ours
    status, _, _ = raw_get(srv, "/api/cohort", headers={"Origin": "http://evil.example"})
    assert status == 403
    body = json.dumps({"rows": []}).encode()
    status, _, _ = raw_get(srv, "/api/labels/x", method="PUT", headers={"Content-Type": "text/plain"}, body=body)
    assert status == 415  # a form or text/plain post from another page would need no preflight
    assert not (out / "labels" / "x.csv").exists()


def test_an_unknown_slide_is_one_line_404(served):
    srv, *_ = served
    status, _, data = raw_get(srv, "/api/slide?slide=nope")
    assert status == 404 and "\n" not in json.loads(data)["error"]


# ----------------------------------------------------------------------------- tiles and overlays
def test_tile_details_in_micrometres_and_probabilities_from_the_store(served):
    import zarr

    srv, out, _, _ = served
    g = zarr.open_group(str(out / "slide_a.zarr"), mode="r")
    coords, probs = g["tiles/coords"][:], g["scores/tiny/tumour/probs"][:]
    r = 5
    x, y = coords[r]
    d = get_json(srv, f"/api/slide/tile?slide=slide_a&x={x + 100}&y={y + 50}")
    assert (d["row"], d["x"], d["y"]) == (r, x, y)
    assert d["um"] == {"x": x * 0.5, "y": y * 0.5, "width": T * 0.5, "height": T * 0.5}
    tum = next(s for s in d["scores"] if s["set"] == "tumour")
    assert tum["probs"] == pytest.approx({"tumour": probs[r, 0], "non-tumour": probs[r, 1]}, abs=1e-6)
    assert get_json(srv, "/api/slide/tile?slide=slide_a&x=5&y=5")["row"] is None  # glass


def test_tile_png_is_what_the_encoder_saw(served):
    import io

    import openslide
    import zarr
    from PIL import Image

    srv, out, _, _ = served
    g = zarr.open_group(str(out / "slide_a.zarr"), mode="r")
    x, y = g["tiles/coords"][3]
    osr = openslide.OpenSlide(str(g.attrs["slide"]["path"]))
    want = np.asarray(osr.read_region((int(x), int(y)), 0, (T, T)).convert("RGB"))  # 224 px at level 0 = the tile
    status, _, data = raw_get(srv, "/api/slide/tile.png?slide=slide_a&row=3")
    assert status == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), want)


def test_overlay_is_one_pixel_per_tile_in_the_heatmap_colours(served):
    import io

    import zarr
    from matplotlib import colormaps
    from PIL import Image

    srv, out, _, _ = served
    g = zarr.open_group(str(out / "slide_a.zarr"), mode="r")
    rc, probs = g["tiles/grid"][:], g["scores/tiny/tumour/probs"][:]
    rows, cols = g.attrs["tiling"]["grid_shape"]
    status, _, data = raw_get(srv, "/api/slide/overlay.png?slide=slide_a&model=tiny&set=tumour&class=non-tumour")
    img = np.asarray(Image.open(io.BytesIO(data)))
    assert status == 200 and img.shape == (rows, cols, 4)
    want = (colormaps["viridis"](probs[:, 1])[:, :3] * 255).round()
    assert np.abs(img[rc[:, 0], rc[:, 1], :3].astype(int) - want).max() <= 1
    assert (img[rc[:, 0], rc[:, 1], 3] == 255).all()
    empty = np.ones((rows, cols), bool)
    empty[rc[:, 0], rc[:, 1]] = False
    assert (img[empty, 3] == 0).all()   # transparent where no tile


def _dz_equal(path, levels=None, rows_max=None):
    """Every tile (of ``levels``) of the viewer's Deep Zoom equals OpenSlide DeepZoomGenerator's."""
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    from slide_clip.slide import resolve_slide_path
    from slide_clip.viewer.deepzoom import DeepZoomSlide

    ours = DeepZoomSlide(path)
    osr = openslide.OpenSlide(str(resolve_slide_path(path)))
    ref = DeepZoomGenerator(osr, 254, 1)
    assert ours.dzi() == ref.get_dzi("jpeg")
    n = 0
    for level in levels or range(ref.level_count):
        cols, rows = ref.level_tiles[level]
        for c in range(cols):
            for r in range(min(rows, rows_max or rows)):
                a, b = np.asarray(ours.tile(level, c, r)), np.asarray(ref.get_tile(level, (c, r)))
                assert a.shape == b.shape and np.array_equal(a, b), (path, level, c, r)
                n += 1
    reader = type(ours.reader).__name__
    ours.close()
    osr.close()
    return n, reader


def test_deep_zoom_equals_openslide_on_jpeg_tiff_svs_and_dicom(tmp_path, cmu_svs, cmu_dicom):
    from slide_clip.synthetic import write_slide

    jpeg = write_slide(tmp_path / "j.tif", SCENES["slide_a"], 0.5, compression="jpeg")
    n, reader = _dz_equal(jpeg, [6, 9, 10, 11, 12], 4)  # level 12 = level 0
    assert n > 40 and reader == "JpegTiffReader"  # the pipeline's tifffile decoder served it
    levels = [8, 10, 12]  # thumbnail scale to full resolution (level 12 = level 0); 3 rows of tiles each
    assert _dz_equal(cmu_svs, levels, 3)[0] > 20
    assert _dz_equal(cmu_dicom, levels, 3)[0] > 20


def test_deep_zoom_over_http_is_the_jpeg_of_that_tile(served):
    import io

    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    srv, out, _, _ = served
    ref = DeepZoomGenerator(openslide.OpenSlide(str(out.parent / "slides" / "slide_a.tif")), 254, 1)
    level = ref.level_count - 1
    status, headers, data = raw_get(srv, f"/api/slide/dz/{level}/1_1.jpeg?slide=slide_a")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    buf = io.BytesIO()
    ref.get_tile(level, (1, 1)).save(buf, "jpeg", quality=90)  # OpenSlide's tile, encoded as served
    assert data == buf.getvalue()
    status, _, _ = raw_get(srv, f"/api/slide/dz/{level + 1}/0_0.jpeg?slide=slide_a")
    assert status == 404


# ----------------------------------------------------------------------------- labels
def _put(srv, name, rows):
    return raw_get(srv, f"/api/labels/{name}", method="PUT", headers={"Content-Type": "application/json"},
                   body=json.dumps({"rows": rows}).encode())


def test_labels_are_a_fewshot_csv_and_rescoring_uses_stored_embeddings(served):
    import zarr

    from slide_clip.examples import read_examples

    srv, out, cfg, _ = served
    g = zarr.open_group(str(out / "slide_a.zarr"), mode="r")
    coords, feats = g["tiles/coords"][:], g["embeddings/tiny/features"][:]
    tex = [texture_at(SCENES["slide_a"], x + T / 2, y + T / 2) for x, y in coords]
    pick = [tex.index("dense"), len(tex) - 1 - tex[::-1].index("dense"), tex.index("tissue")]
    rows = [{"slide_id": "slide_a", "x": int(coords[i, 0]), "y": int(coords[i, 1]), "label": tex[i]} for i in pick]
    before = snapshot(out)
    status, _, data = _put(srv, "mine", rows)
    assert status == 200, data
    path = out / "labels" / "mine.csv"
    with open(path, newline="") as f:
        written = list(csv.DictReader(f))
    assert [(r["slide"], int(r["x"]), int(r["y"]), r["label"]) for r in written] == \
        [(str(out.parent / "slides" / "slide_a.tif"), r["x"], r["y"], r["label"]) for r in rows]
    assert [(e.x, e.y, e.label) for e in read_examples(path)] == [(r["x"], r["y"], r["label"]) for r in rows]

    status, _, data = raw_get(srv, "/api/labels/mine/rescore", method="POST",
                              headers={"Content-Type": "application/json"}, body=b"{}")
    assert status == 200, data
    assert json.loads(data)["set"] == "fewshot-mine"
    # independent few-shot scores: normalised mean per label, the model's logit scale, softmax
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    classes = sorted({r["label"] for r in rows})
    protos = np.stack([f[[i for i in pick if tex[i] == c]].mean(0) for c in classes])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    scale = g["embeddings/tiny"].attrs["logit_scale"]
    z = scale * f @ protos.T
    want = np.exp(z - z.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    g = zarr.open_group(str(out / "slide_a.zarr"), mode="r")
    assert np.allclose(g["scores/tiny/fewshot-mine/probs"][:], want, atol=1e-5)
    assert (out / "cohort-fewshot-mine-tiny.csv").is_file()
    # what changed: the label file, the new score set, its summaries and table, the store's lock note
    changed = {p for p, v in snapshot(out).items() if before.get(p) != v}
    allowed = ("labels/mine.csv", "slide_a.zarr/scores/tiny/fewshot-mine/", "summaries/tiny/fewshot-mine/",
               "cohort-fewshot-mine-tiny.", "slide_a.zarr.lock")
    assert changed and all(p.startswith(allowed) for p in changed), sorted(changed)
    assert not any(p.startswith("slide_a.zarr/embeddings") for p in changed)


def test_labels_must_name_stored_tiles(served):
    srv, out, *_ = served
    for rows, why in [([{"slide_id": "slide_a", "x": 1, "y": 2, "label": "a"}], "no stored tile"),
                      ([{"slide_id": "other", "x": 0, "y": 0, "label": "a"}], "no such slide"),
                      ([{"slide_id": "slide_a", "x": T, "y": T, "label": "x\ny"}], "not allowed")]:
        status, _, data = _put(srv, "bad", rows)
        assert status in (400, 404) and why in json.loads(data)["error"]
    status, _, _ = _put(srv, "..%2Fevil", [])
    assert status in (400, 404)
    assert not (out / "labels" / "bad.csv").exists() and not (out / "evil.csv").exists()


def test_qupath_geojson_out_and_in(served):
    import zarr

    srv, out, *_ = served
    g = zarr.open_group(str(out / "slide_a.zarr"), mode="r")
    coords = g["tiles/coords"][:]
    x, y = (int(v) for v in coords[0])
    assert _put(srv, "qp", [{"slide_id": "slide_a", "x": x, "y": y, "label": "dense"}])[0] == 200
    doc = get_json(srv, "/api/labels/qp/geojson?slide=slide_a")
    [feat] = doc["features"]
    assert feat["properties"]["objectType"] == "annotation"
    assert feat["properties"]["classification"]["name"] == "dense"
    assert feat["geometry"]["coordinates"] == [[[x, y], [x + T, y], [x + T, y + T], [x, y + T], [x, y]]]
    # a QuPath annotation (polygon, level-0 px) over the dense rectangle of slide_a: cells 7..11 x 2..7
    box = [[7 * T + 10, 2 * T + 10], [9 * T + 10, 2 * T + 10], [9 * T + 10, 4 * T + 10], [7 * T + 10, 4 * T + 10]]
    qupath = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "a1", "geometry": {"type": "Polygon", "coordinates": [box + [box[0]]]},
         "properties": {"objectType": "annotation", "classification": {"name": "tumour", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]},
         "properties": {"objectType": "annotation"}}]}
    status, _, data = raw_get(srv, "/api/labels/qp/import?slide=slide_a", method="POST",
                              headers={"Content-Type": "application/json"}, body=json.dumps(qupath).encode())
    assert status == 200, data
    r = json.loads(data)
    centres = coords + T / 2
    inside = {(int(a), int(b)) for (a, b), (cx, cy) in zip(coords, centres)
              if 7 * T + 10 < cx < 9 * T + 10 and 2 * T + 10 < cy < 4 * T + 10}
    assert len(inside) == 4 and r["imported"] == 4 and r["skipped_features"] == 1
    got = {(q["x"], q["y"]): q["label"] for q in get_json(srv, "/api/labels/qp")["rows"]}
    assert got == {**{xy: "tumour" for xy in inside}, (x, y): "dense"}


# ----------------------------------------------------------------------------- the command
def test_view_refuses_a_remote_host_without_the_option(served):
    import subprocess
    import sys

    _, out, *_ = served
    r = subprocess.run([sys.executable, "-m", "slide_clip.cli", "view", str(out), "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--allow-remote" in r.stderr


def test_a_remote_host_prints_a_warning(served, monkeypatch):
    import uvicorn

    from slide_clip.viewer.server import serve

    _, out, cfg, _ = served
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # bind, then return at once
    lines = []
    serve(out, cfg, host="0.0.0.0", port=0, allow_remote=True, echo=lines.append)
    assert lines[0].startswith("warning: the viewer is reachable from other machines")
    assert "http://0.0.0.0:" in lines[1]
