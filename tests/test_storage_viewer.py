"""The viewer of an output folder at an s3:// URL (a real S3 server, tests/s3_server.py): it
serves what the viewer of the same cohort on local disk serves (cohort list and tables, slide
facts, Deep Zoom tiles read from slides at URLs, overlays, tile pictures, files beside the
stores), writes label sets and re-scores into the stores at the URL, and runs from the command
line with ``--storage-options``.

Expected values come from the local cohort's viewer and from the objects themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from slide_clip.pipeline import embed_slides
from slide_clip.prompts import load_prompts
from slide_clip.scoring import find_stores, summarize_all, zeroshot
from slide_clip.storage import objects
from slide_clip.store import SlideStore
from test_viewer_server import get_json, raw_get
from viewer_cohort import ThreadServer


def _cohort(slides, out, cfg):
    rs = embed_slides(slides, out, cfg, progress=False)
    assert [r.status for r in rs] == ["ok"] * len(slides), [r.error for r in rs]
    zeroshot(find_stores([out]), load_prompts("tumour"), cfg)
    summarize_all(out)
    return [r.name for r in rs]


def _same(a, b, path: str) -> bytes:
    sa, _, da = raw_get(a, path)
    sb, _, db = raw_get(b, path)
    assert (sa, da) == (sb, db), (path, sa, da[:200], sb, db[:200])
    assert sa == 200, (path, da[:300])
    return da


def _without_paths(d):
    """A JSON answer with the output folder and the slides' paths left out (a URL there, a path
    here), and the score sets' creation times."""
    if isinstance(d, dict):
        return {k: _without_paths(v) for k, v in d.items() if k not in ("out", "slide", "store", "created")}
    if isinstance(d, list):
        return [_without_paths(v) for v in d]
    return d


@pytest.fixture
def two_servers(s3, cfg, tmp_path):
    """The same two slides embedded, scored and summarized at s3:// (slides and stores) and on
    local disk, each output folder under its own viewer."""
    from conftest import tissue_scene

    from slide_clip.synthetic import write_slide

    slides = [write_slide(tmp_path / f"v{i}.tif", tissue_scene(600 + 100 * i, 500, 0.5), 0.5, levels=2,
                          compression="jpeg") for i in range(2)]
    bucket = s3.new_bucket()
    urls = [s3.upload(bucket, f"slides/{p.name}", p) for p in slides]
    out, local = f"s3://{bucket}/out", tmp_path / "out"
    names = _cohort(urls, out, cfg)
    assert _cohort(slides, local, cfg) == names
    remote, here = ThreadServer(out, cfg), ThreadServer(local, cfg)
    try:
        yield remote, here, out, local, names, urls
    finally:
        remote.stop()
        here.stop()


def test_the_viewer_of_an_s3_folder_serves_what_a_local_one_does(s3, two_servers):
    remote, here, out, local, names, urls = two_servers
    rc, lc = get_json(remote, "/api/cohort"), get_json(here, "/api/cohort")
    assert rc["out"] == out and [s["slide_id"] for s in rc["slides"]] == sorted(names)
    assert all(s["status"] == "ok" and s["has_store"] for s in rc["slides"])
    assert rc["tables"] and rc["tables"][0]["set"] == "tumour" and not rc["tables"][0]["missing"]
    assert _without_paths(rc) == _without_paths(lc)

    for sid in sorted(names):
        info = get_json(remote, f"/api/slide?slide={sid}")
        assert _without_paths(info) == _without_paths(get_json(here, f"/api/slide?slide={sid}"))
        assert [s["set"] for s in info["score_sets"]] == ["tumour"]
        _same(remote, here, f"/api/slide/dzi?slide={sid}")
        top = info["dz_levels"] - 1
        for level, col, row in ((top, 0, 0), (top, 1, 1), (top - 1, 0, 0), (0, 0, 0)):
            _same(remote, here, f"/api/slide/dz/{level}/{col}_{row}.jpeg?slide={sid}")
        _same(remote, here, f"/api/slide/overlay.png?slide={sid}&model=tiny&set=tumour&class=tumour")
        _same(remote, here, f"/api/slide/tiles?slide={sid}")
        x, y = SlideStore.open(f"{out}/{sid}.zarr").coords()[3]
        assert get_json(remote, f"/api/slide/tile?slide={sid}&x={x + 5}&y={y + 5}")["row"] == 3
        assert get_json(remote, f"/api/slide/tile?slide={sid}&x={x + 5}&y={y + 5}") == \
            get_json(here, f"/api/slide/tile?slide={sid}&x={x + 5}&y={y + 5}")
        _same(remote, here, f"/api/slide/tile.png?slide={sid}&row=3")

    # files beside the stores: the object's bytes; nothing outside the folder, nothing but pictures and tables
    status, headers, data = raw_get(remote, "/files/cohort-tumour-tiny.csv")
    assert status == 200 and data == objects.read_bytes(f"{out}/cohort-tumour-tiny.csv")
    assert headers["content-type"].startswith("text/csv")
    s3.upload(out.split("/")[2], "secret.png", local / "cohort-tumour-tiny.csv")  # beside OUT, not under it
    for bad in ("/files/../secret.png", "/files/..%2fsecret.png", "/files/%2e%2e/secret.png",
                f"/files/{names[0]}.zarr", "/files/nothing.png"):
        status, _, data = raw_get(remote, bad)
        assert status == 404, (bad, data[:200])


def test_labels_and_rescoring_at_an_s3_folder(s3, two_servers):
    """A label set written from the page is an object under OUT/labels/ (fewshot's CSV, the slides'
    URLs); re-scoring writes the few-shot score set into the stores at the URL and its cohort
    table beside them: the same probabilities as the local viewer's."""
    import csv
    import io

    remote, here, out, local, names, urls = two_servers
    sid = sorted(names)[0]
    coords = SlideStore.open(f"{out}/{sid}.zarr").coords()
    rows = [{"slide_id": sid, "x": int(coords[i, 0]), "y": int(coords[i, 1]), "label": lab}
            for i, lab in ((0, "a"), (1, "a"), (len(coords) - 1, "b"))]
    body = json.dumps({"rows": rows}).encode()
    for srv in (remote, here):
        status, _, data = raw_get(srv, "/api/labels/mine", method="PUT",
                                  headers={"Content-Type": "application/json"}, body=body)
        assert status == 200, data
    written = list(csv.DictReader(io.StringIO(objects.read_text(f"{out}/labels/mine.csv"))))
    assert [(r["slide"], int(r["x"]), int(r["y"]), r["label"]) for r in written] == \
        [(sorted(urls)[0], r["x"], r["y"], r["label"]) for r in rows]
    assert get_json(remote, "/api/labels") == {"sets": ["mine"]}
    assert get_json(remote, "/api/labels/mine")["rows"] == rows

    for srv in (remote, here):
        status, _, data = raw_get(srv, "/api/labels/mine/rescore", method="POST",
                                  headers={"Content-Type": "application/json"}, body=b"{}")
        assert status == 200, data
        assert [s["status"] for s in json.loads(data)["slides"]] == ["ok", "ok"]
    for name in names:
        a = SlideStore.open(f"{out}/{name}.zarr").scores("tiny", "fewshot-mine")[0]
        b = SlideStore.open(local / f"{name}.zarr").scores("tiny", "fewshot-mine")[0]
        assert np.array_equal(a, b)
    assert objects.exists(f"{out}/cohort-fewshot-mine-tiny.csv")
    rc = get_json(remote, "/api/cohort")
    assert {t["set"] for t in rc["tables"]} == {"tumour", "fewshot-mine"}
    assert _without_paths(rc) == _without_paths(get_json(here, "/api/cohort"))
    _same(remote, here, f"/api/slide/overlay.png?slide={sid}&model=tiny&set=fewshot-mine&class=a")


def test_view_command_on_an_s3_folder_with_storage_options(s3, cfg, tmp_path, tiny_registry):
    """`slide-clip --storage-options endpoint_url=... view s3://bucket/out` prints the URL it serves
    and answers with the folder's slides; a bucket that does not exist is one line."""
    from conftest import tissue_scene
    from viewer_cohort import CliServer

    from slide_clip.storage import options
    from slide_clip.synthetic import write_slide

    slide = write_slide(tmp_path / "c.tif", tissue_scene(500, 400, 0.5), 0.5, levels=2, compression="jpeg")
    bucket = s3.new_bucket()
    out = f"s3://{bucket}/out"
    names = _cohort([s3.upload(bucket, "slides/c.tif", slide)], out, cfg)
    env = {k: v for k, v in os.environ.items() if k != options.ENV}  # only the command line names the server
    env.update({**s3.credentials(), "AWS_DEFAULT_REGION": "us-east-1", "HF_HUB_OFFLINE": "1"})

    srv = CliServer(out, "--models", str(tiny_registry), env=env,
                    before=("--storage-options", f"endpoint_url={s3.endpoint}"))
    try:
        assert f"slide-clip viewer of {out}:" in srv.line
        import urllib.request

        with urllib.request.urlopen(f"{srv.url}/api/cohort", timeout=60) as r:
            cohort = json.loads(r.read())
        assert [s["slide_id"] for s in cohort["slides"]] == names and cohort["out"] == out
        with urllib.request.urlopen(f"{srv.url}/api/slide/dz/0/0_0.jpeg?slide={names[0]}", timeout=60) as r:
            assert r.read()[:2] == b"\xff\xd8"
    finally:
        srv.stop()

    r = subprocess.run([sys.executable, "-m", "slide_clip.cli", "--storage-options", f"endpoint_url={s3.endpoint}",
                        "view", "s3://no-such-bucket-here/out", "--port", "0"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "s3://no-such-bucket-here/out" in lines[0], r.stderr
