"""Hostile inputs: each gives its own one-line error naming the file; a cohort of all of them
plus good slides completes the good ones and lists every failure. Slide ids never collide,
damaged stores are errors, and empty inputs are errors. Every input is written here."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import hostile_inputs as h
from slide_clip.errors import ConfigError, SlideClipError, StoreBusyError, StoreError
from slide_clip.scan import find_slides
from slide_clip.slide import check_mpp, slide_info
from slide_clip.store import SlideStore, store_lock

CMU = "/work/shared/data/slides/CMU-1-Small-Region.svs"

#: input name -> (how to write it, what its one-line error must say)
EXPECTED = {
    "zero.svs": "is an empty file (0 bytes)",
    "truncated.tif": "is a truncated TIFF",
    "plain.tif": "plain (untiled, non-pyramidal) 8-bit RGB TIFF",
    "grey16.tif": "16-bit single-channel (greyscale) image",
    "multichannel.tif": "5-channel (8-bit) fluorescence/multiplex image",
    "rgba.tif": "plain (untiled, non-pyramidal) 8-bit RGBA TIFF",
    "dpi96.tif": "impossible for a slide scan (the 96-dpi default",
    "coarse.tif": "coarser than the target 1 µm/px",
    "dicom_missing": "DICOM file without ImageType",
    "dicom_truncated": "is truncated or corrupt: its last tile cannot be read",
}
TARGET_MPP = 1.0  # coarse enough that the CMU slides are ~30 tiles each


@pytest.fixture(scope="session")
def hostile_dir(tmp_path_factory, cmu_dicom, cmu_svs):
    """A cohort folder: every hostile input, two DICOM series beside an SVS, same-stem slides in
    two folders and a good slide whose name has spaces and non-ASCII letters."""
    d = tmp_path_factory.mktemp("hostile") / "cohort"
    d.mkdir()
    good = h.good_slide(d / "good slide ü.tif")
    (d / "a").mkdir()
    shutil.copy(good, d / "a" / "x.tif")
    h.good_slide(d / "b" / "x.tif", mpp=0.499)  # another file with the same stem
    h.zero_byte(d / "zero.svs")
    h.truncated(d / "truncated.tif", good)
    h.plain_rgb_tiff(d / "plain.tif")
    h.grey16_tiff(d / "grey16.tif")
    h.multichannel_tiff(d / "multichannel.tif")
    h.rgba_tiff(d / "rgba.tif")
    h.dpi96_slide(d / "dpi96.tif")
    h.coarse_slide(d / "coarse.tif")
    h.two_series_beside_svs(d / "mixed", cmu_dicom, cmu_svs)
    h.dicom_missing(d / "dicom_missing", cmu_dicom)
    h.dicom_truncated(d / "dicom_truncated", cmu_dicom)
    return d


def _cfg(cfg):
    return cfg.with_overrides(tiling={"target_mpp": TARGET_MPP}, encode={"num_workers": 0},
                              tissue={"thumbnail_max_side": 512})


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_hostile_input_has_its_own_one_line_error(hostile_dir, name):
    path = hostile_dir / name
    with pytest.raises(SlideClipError) as e:
        check_mpp(slide_info(path), TARGET_MPP)
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(path)), text
    assert EXPECTED[name] in text, text
    if name == "dicom_missing":
        assert "will not help" in text and "Copy the file again" not in text
    if name == "coarse.tif":  # a plausible resolution: suggest a coarser target, not --mpp
        assert "--target-mpp 2" in text and "--mpp " not in text
    if name == "dpi96.tif":
        assert "--mpp" in text and "--target-mpp" not in text


def test_find_slides_splits_dicom_series_from_other_slides(hostile_dir):
    found = {str(p.relative_to(hostile_dir)) for p in find_slides([hostile_dir])}
    # two series in one folder are two slides (each by its largest file), the SVS beside them a third
    assert {"mixed/s1_volume.dcm", "mixed/s2_volume.dcm", "mixed/beside.svs"} <= found
    assert "mixed" not in found
    # a folder of one series is one slide
    assert {"dicom_missing", "dicom_truncated"} <= found
    assert {"a/x.tif", "b/x.tif", "good slide ü.tif"} <= found


@pytest.fixture(scope="session")
def hostile_cohort(hostile_dir, tiny_registry, tmp_path_factory):
    """`embed`, `zeroshot` and `summarize` of the whole hostile folder (library calls)."""
    from slide_clip.config import load_config
    from slide_clip.pipeline import embed_slides
    from slide_clip.prompts import load_prompts
    from slide_clip.scoring import find_stores, summarize, zeroshot

    cfg = _cfg(load_config().with_overrides(encode={"model": "tiny", "registries": (str(tiny_registry),),
                                                    "batch_size": 32, "device": "cpu"},
                                            tissue={"thumbnail_max_side": 512}))
    out = tmp_path_factory.mktemp("hostile_out")
    results = embed_slides(find_slides([hostile_dir]), out, cfg, progress=False)
    zeroshot(find_stores([out]), load_prompts("tumour"), cfg)
    df, _, _ = summarize(out)
    return out, results, df


def test_hostile_cohort_completes_the_good_slides_and_lists_every_failure(hostile_cohort, hostile_dir):
    out, results, df = hostile_cohort
    by_id = {r.name: r for r in results}
    good = {"good slide ü", "a__x", "b__x", "s1_volume", "s2_volume", "beside"}
    assert {k for k, r in by_id.items() if r.status == "ok"} == good
    failed = {k: r.error for k, r in by_id.items() if r.status == "failed"}
    assert set(failed) == {n.split(".")[0] for n in EXPECTED}
    table = df.set_index("slide_id")
    assert set(table.index) == good | set(failed)  # every slide has its row, failures included
    for name, message in EXPECTED.items():
        sid = name.split(".")[0]
        assert table.loc[sid, "status"] == "failed"
        assert message in table.loc[sid, "error"] and str(hostile_dir / name) in table.loc[sid, "error"]
    assert (table.loc[sorted(good), "status"] == "ok").all()
    # the two DICOM series and the SVS are three stores of the same image, from three different files
    stores = {sid: SlideStore.open(out / f"{sid}.zarr") for sid in good}
    paths = {s.slide["path"] for s in stores.values()}
    assert len(paths) == len(good)
    assert stores["s1_volume"].slide["fingerprint"] != stores["s2_volume"].slide["fingerprint"]
    np.testing.assert_array_equal(stores["s1_volume"].coords(), stores["s2_volume"].coords())
    # same stem in two folders: two stores, each from its own file
    assert stores["a__x"].slide["path"] == str((hostile_dir / "a" / "x.tif").resolve())
    assert stores["b__x"].slide["path"] == str((hostile_dir / "b" / "x.tif").resolve())
    assert stores["a__x"].slide["mpp_x"] == 0.5 and stores["b__x"].slide["mpp_x"] == pytest.approx(0.499)
    status = json.loads((out / "status" / "good slide ü.json").read_text())
    assert status["status"] == "ok" and status["path"].endswith("good slide ü.tif")


def test_ids_never_collide_across_runs_into_one_folder(hostile_dir, tmp_path, cfg):
    """a/x then b/x into one --out: b/x gets its own id; a/x's store and status are untouched,
    and --overwrite never replaces another file's store."""
    from slide_clip.pipeline import embed_slides

    cfg = _cfg(cfg)
    out = tmp_path / "out"
    [ra] = embed_slides([hostile_dir / "a" / "x.tif"], out, cfg, progress=False)
    assert ra.name == "x" and ra.status == "ok"
    before = (out / "x.zarr" / "embeddings" / "tiny" / "features" / "c" / "0" / "0").read_bytes()
    [rb] = embed_slides([hostile_dir / "b" / "x.tif"], out, cfg, progress=False, overwrite=True)
    assert rb.status == "ok" and rb.name == "b__x"
    assert SlideStore.open(out / "x.zarr").slide["path"] == str((hostile_dir / "a" / "x.tif").resolve())
    assert (out / "x.zarr" / "embeddings" / "tiny" / "features" / "c" / "0" / "0").read_bytes() == before
    assert json.loads((out / "status" / "x.json").read_text())["status"] == "ok"
    # given again, each file finds its own store (skipped, not re-embedded)
    again = embed_slides([hostile_dir / "b" / "x.tif", hostile_dir / "a" / "x.tif"], out, cfg, progress=False)
    assert [(r.name, r.status) for r in again] == [("b__x", "skipped"), ("x", "skipped")]
    # a store of another existing file, named directly, is refused even with --overwrite
    from slide_clip.pipeline import embed_slide

    with pytest.raises(StoreError, match="holds the slide .*a/x.tif, not .*b/x.tif"):
        embed_slide(hostile_dir / "b" / "x.tif", out, cfg, slide_id="x", overwrite=True, progress=False)
    assert (out / "x.zarr" / "embeddings" / "tiny" / "features" / "c" / "0" / "0").read_bytes() == before


# ------------------------------------------------------------------------------ damaged stores
@pytest.fixture
def scored_copy(hostile_cohort, tmp_path):
    out, _, _ = hostile_cohort
    dst = tmp_path / "out"
    dst.mkdir()
    shutil.copytree(out / "good slide ü.zarr", dst / "good slide ü.zarr")
    return dst, dst / "good slide ü.zarr"


def _chunk_files(array_dir):
    return sorted(p for p in (array_dir / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize("damage,message", [
    ("embeddings/tiny/features", "embeddings for 'tiny' hold missing values from row 0"),
    ("tiles/coords", "chunk files of tiles/coords are missing"),
    ("tiles/grid", "chunk files of tiles/grid are missing"),
    ("tiles/coords!", "the array tiles/coords is missing"),
])
def test_a_damaged_store_is_an_error_never_a_result(scored_copy, cfg, damage, message):
    from slide_clip.prompts import load_prompts
    from slide_clip.scoring import heatmaps, zeroshot

    out, store = scored_copy
    if damage.endswith("!"):
        shutil.rmtree(store / damage[:-1])
    else:
        _chunk_files(store / damage)[0].unlink()
    [r] = zeroshot([store], load_prompts("tumour"), cfg)
    assert r["status"] == "failed" and message in r["error"] and str(store) in r["error"]
    assert "\n" not in r["error"] and "--overwrite" in r["error"]
    if damage != "embeddings/tiny/features":  # heatmaps and GeoJSON read the tile arrays
        with pytest.raises(StoreError, match=message):
            heatmaps(store, "tumour", cfg)
    assert not (out / "heatmaps").exists() or not any((out / "heatmaps").rglob("*.geojson"))


def test_lost_score_chunk_is_an_error_for_heatmaps(scored_copy, cfg):
    from slide_clip.scoring import heatmaps

    _, store = scored_copy
    _chunk_files(store / "scores" / "tiny" / "tumour" / "probs")[0].unlink()
    with pytest.raises(StoreError, match="chunk files of scores/tiny/tumour/probs are missing"):
        heatmaps(store, "tumour", cfg)


# ------------------------------------------------------------------------------ locks
def test_a_held_lock_names_its_holder_and_how_to_clear_it(scored_copy, cfg, tmp_path):
    import socket

    from slide_clip.prompts import load_prompts
    from slide_clip.scoring import heatmaps, zeroshot

    out, store = scored_copy
    with store_lock(store):
        holder = json.loads((out / "good slide ü.zarr.lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(StoreBusyError) as e, store_lock(store):
            pass
        text = str(e.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in text and "delete the .lock file" in text
        # scoring waits for the lock, then gives the same line (and keeps the other writer's summary)
        import slide_clip.scoring as scoring

        old, scoring.LOCK_WAIT_SECONDS = scoring.LOCK_WAIT_SECONDS, 0.3
        try:
            [r] = zeroshot([store], load_prompts("tumour"), cfg)
            with pytest.raises(StoreBusyError):
                heatmaps(store, "tumour", cfg)
        finally:
            scoring.LOCK_WAIT_SECONDS = old
        assert r["status"] == "failed" and "being written by another process" in r["error"]
    # a writer that waits gets the lock once the holder lets go
    release = threading.Event()

    def hold():
        with store_lock(store):
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    threading.Timer(0.5, release.set).start()
    [r] = zeroshot([store], load_prompts("tumour"), cfg)
    t.join()
    assert r["status"] == "ok"


def test_a_released_lock_leaves_no_file_and_still_excludes(tmp_path):
    """The holder deletes its lock file on release; writers racing the deletion never overlap."""
    store = tmp_path / "s.zarr"
    lock = tmp_path / "s.zarr.lock"
    with store_lock(store):
        assert lock.is_file()
    assert not lock.exists()
    inside, most, count = [0], [0], [0]
    guard = threading.Lock()

    def writer():
        for _ in range(40):
            with store_lock(store, wait=30):
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                n = count[0]
                time.sleep(0.0005)
                count[0] = n + 1
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and count[0] == 240
    assert not lock.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ empty inputs, prompts
def test_empty_inputs_are_errors(tmp_path, cfg):
    from slide_clip.manifest import cohort_slides
    from slide_clip.pipeline import embed_slides

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no slides to process"):
        embed_slides([], tmp_path / "out", cfg)
    with pytest.raises(ConfigError, match=f"no slides found in {empty}"):
        cohort_slides([empty])
    (empty / "a.svs").write_bytes(b"x")
    with pytest.raises(ConfigError, match="matching '\\*.ndpi'"):
        cohort_slides([empty], "*.ndpi")
    assert [c.slide_id for c in cohort_slides([empty])] == ["a"]
    r = subprocess.run([sys.executable, "-m", "slide_clip.cli", "embed", str(empty), "--pattern", "*.ndpi",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "no slides found" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "slide_clip_flows.cli", "run", str(empty), "--pattern", "*.ndpi",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith(f"error: no slides found in {empty} matching '*.ndpi'")


@pytest.mark.parametrize("template", ["an image of {} {0}", "an image of {} {x}", "{} and {}", "{!r}", "{"])
def test_prompt_templates_need_exactly_one_plain_slot(tmp_path, template):
    from slide_clip.prompts import load_prompts

    p = tmp_path / "p.yaml"
    p.write_text(f"name: x\ntemplates: [{json.dumps(template)}]\n"
                 "classes:\n  - {name: a, synonyms: [a]}\n  - {name: b, synonyms: [b]}\n")
    with pytest.raises(ConfigError, match="exactly one '{}' slot") as e:
        load_prompts(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_literal_braces_are_fine_in_a_template(tmp_path):
    from slide_clip.prompts import load_prompts

    p = tmp_path / "p.yaml"
    p.write_text("name: x\ntemplates: ['{{H&E}} {}']\nclasses:\n  - {name: a, synonyms: [a]}\n"
                 "  - {name: b, synonyms: [b]}\n")
    ps = load_prompts(p)
    assert ps.texts(ps.classes[0]) == ["{H&E} a"]


# ------------------------------------------------------------------------------ background model build
def test_a_slide_failing_while_the_model_builds_exits_cleanly(hostile_dir, tmp_path, cfg):
    """The model builds in a background thread while tissue is found (once the slide has passed
    its checks); a slide that fails then (a dark, fluorescence-like scan, refused from its
    thumbnail) must not leave that thread running into interpreter shutdown (exit 134)."""
    from slide_clip.pipeline import embed_slides

    dark = h.dark_slide(tmp_path / "dark.tif")
    slow = cfg.with_overrides(encode={"model": "random:ViT-B-32"}, tiling={"target_mpp": 0.5})
    [r] = embed_slides([dark], tmp_path / "out", slow, progress=False)
    assert r.status == "failed" and "dark background" in r.error
    assert not [t for t in threading.enumerate() if t.name == "load-encoder"]  # joined before returning
    p = subprocess.run([sys.executable, "-m", "slide_clip.cli", "embed", str(dark),
                        "--out", str(tmp_path / "cli"), "--model", "random:ViT-B-32", "--device", "cpu",
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert "terminate called" not in p.stderr and "dark background" in p.stderr


def test_slide_id_rule(tmp_path):
    from slide_clip.slide_ids import assign_slide_ids

    for rel in ("a/x.svs", "a/x.tif", "b/x.svs", "c/y.svs", "d/z z é.svs"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    p = {rel: str(tmp_path / rel) for rel in ("a/x.svs", "a/x.tif", "b/x.svs", "c/y.svs", "d/z z é.svs")}
    # unique names stay names, wherever the files are
    assert assign_slide_ids([p["c/y.svs"], p["a/x.svs"], p["d/z z é.svs"]]) == {
        p["c/y.svs"]: "y", p["a/x.svs"]: "x", p["d/z z é.svs"]: "z z é"}
    # shared names: the path below the common folder; same folder: the extension tells them apart
    assert assign_slide_ids([p["a/x.svs"], p["b/x.svs"]]) == {p["a/x.svs"]: "a__x", p["b/x.svs"]: "b__x"}
    ids = assign_slide_ids([p["a/x.svs"], p["a/x.tif"]])
    assert ids == {p["a/x.svs"]: "x", p["a/x.tif"]: "x.tif"}


# ------------------------------------------------------------------------------ input side (issue 20)
@pytest.fixture
def mixed_folder(tmp_path):
    """A folder of slides as users keep them: one good slide, a multiplex .qptiff, notes, hidden
    files, a hidden folder, a format OpenSlide does not read, a link to a folder, and the
    output folder of an earlier run inside it."""
    d = tmp_path / "slides"
    d.mkdir()
    h.good_slide(d / "good.tif")
    h.multichannel_tiff(d / "panel.qptiff")  # a TIFF by its content: taken, and refused with its own error
    (d / "notes.txt").write_text("scanned on Tuesday")
    (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (d / ".snapshot").mkdir()
    shutil.copy(d / "good.tif", d / ".snapshot" / "good.tif")
    (d / "scan.vsi").write_bytes(b"\x00" * 64)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(d / "good.tif", tmp_path / "elsewhere" / "linked.tif")
    (d / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    return d


def test_folder_scan_names_every_skipped_file_and_never_takes_its_own_outputs(mixed_folder, tiny_registry):
    from typer.testing import CliRunner

    from slide_clip.cli import app
    from slide_clip.scan import scan_slides, skipped_line

    d = mixed_folder
    out = d / "out"  # the output folder inside the input folder
    args = ["embed", str(d), "--out", str(out), "--models", str(tiny_registry), "--model", "tiny",
            "--device", "cpu", "--workers", "0", "--target-mpp", "1", "--no-progress"]
    runner = CliRunner()
    for run in range(2):  # the second run finds the first one's stores, QC pictures and statuses in out/
        r = runner.invoke(app, args)
        assert r.exit_code == 1, r.output  # the multiplex .qptiff fails, with its own line
        rows = dict(line.split("\t")[:2] for line in r.stdout.strip().splitlines()[1:])
        assert rows == {"good": "ok" if run == 0 else "skipped", "panel": "failed"}, r.output
        assert "fluorescence/multiplex" in r.stdout and "_qc" not in r.stdout
        [line] = [ln for ln in r.stderr.splitlines() if re.match(r"skipped \d+ (file|folder)", ln)]
        for name, why in [("notes.txt", "not a slide image"), (".DS_Store", "hidden file"),
                          (".snapshot/", "hidden folder"), ("scan.vsi", "Olympus/Evident VSI: not a slide format"),
                          ("linked/", "a link to a folder: not followed")]:
            assert f"{name} ({why}" in line, line
        assert ("out/ (slide-clip's own output folder" in line) == (run == 1), line
    assert (out / "good_qc.png").is_file() and not (out / "good_qc.zarr").exists()
    # the full list beside the stores, absolute paths
    listed = (out / "skipped-files.csv").read_text()
    assert str(d / "notes.txt") in listed and str(d / "out") + "/" in listed
    # an output folder is known by its contents too (another run's --out): never a source of slides
    scan = scan_slides([d])
    assert [p.name for p in scan.slides] == ["good.tif", "panel.qptiff"]
    assert any(s.shown == "out/" and "output folder" in s.reason for s in scan.skipped)
    # past a few entries: a count, and where the full list is
    many = skipped_line(scan.skipped, out / "skipped-files.csv", limit=2)
    assert f"and {len(scan.skipped) - 2} more (all listed in {out / 'skipped-files.csv'})" in many
    assert "\n" not in many
    # with --pattern: the files it leaves out are counted
    scan = scan_slides([d], "*.qptiff")
    assert [p.name for p in scan.slides] == ["panel.qptiff"]
    assert "3 files (not matching --pattern '*.qptiff')" in skipped_line(scan.skipped)


@pytest.mark.usefixtures("prefect_harness")
def test_run_lists_the_files_its_scan_skipped(mixed_folder, cfg, tmp_path):
    from slide_clip_flows.process_cohort import process_cohort

    out = tmp_path / "out"
    r = process_cohort(slides=[str(mixed_folder)], out=str(out), config=_cfg(cfg), prompts=["tumour"],
                       heatmaps=False)
    assert {s["slide_id"]: s["status"] for s in r["slides"]} == {"good": "ok", "panel": "failed"}
    reasons = {row["path"]: row["reason"] for row in r["skipped_files"]}
    assert reasons[str(mixed_folder / "notes.txt")] == "not a slide image"
    assert reasons[str(mixed_folder / ".DS_Store")] == "hidden file"
    assert r["skipped_list"] == str(out / "skipped-files.csv") and (out / "skipped-files.csv").is_file()
    from test_flows import _read_artifact

    [report] = _read_artifact("cohort-report")
    assert "Skipped" in report.data and "notes.txt" in report.data


def test_a_refused_slide_never_starts_the_model_build(hostile_dir, tmp_path, cfg, monkeypatch):
    """The model is built in the background only once a slide has passed its checks, and then
    before its thumbnail is read (the start-up overlap of a good slide is kept)."""
    import slide_clip.stages as stages
    from slide_clip.encoders.cache import EncoderCache
    from slide_clip.pipeline import embed_slides

    events = []
    preload, thumbnail = EncoderCache.preload, stages.read_thumbnail
    monkeypatch.setattr(EncoderCache, "preload", lambda self, spec=None: (events.append("preload"), preload(self, spec))[1])
    monkeypatch.setattr(stages, "read_thumbnail", lambda *a, **k: (events.append("thumbnail"), thumbnail(*a, **k))[1])
    c = cfg.with_overrides(tiling={"target_mpp": 0.5}, encode={"num_workers": 0})
    [r] = embed_slides([hostile_dir / "coarse.tif"], tmp_path / "out", c, progress=False)
    assert r.status == "failed" and "coarser than the target" in r.error
    assert events == []  # refused before any model was asked for
    [r] = embed_slides([hostile_dir / "good slide ü.tif"], tmp_path / "out", c, progress=False)
    assert r.status == "ok" and events[:2] == ["preload", "thumbnail"]


def test_corrupt_jpeg_data_is_a_one_line_error_naming_where(tmp_path, cfg):
    """Bit rot in one JPEG tile: 'corrupt image data at level 0 in ... (x, y). Copy the file
    again', from the thumbnail, the tile loader (in a thread and in reader processes) and both
    decoders (tifffile + imagecodecs, OpenSlide), never an 'unexpected error'."""
    from conftest import tissue_scene

    from slide_clip.errors import SlideError
    from slide_clip.pipeline import embed_slides
    from slide_clip.reading import open_for_reading, read_tiles
    from slide_clip.synthetic import write_slide
    from slide_clip.tiling import make_grid

    slide = write_slide(tmp_path / "rot.tif", tissue_scene(1500, 1000, 0.5), 0.5, levels=3, compression="jpeg")
    x, y = h.corrupt_jpeg_tile(slide, row=3, col=4)  # inside the tissue, not the tile checked at open
    # end to end: the thumbnail (read from level 0), then the tile loader (in a thread here; in reader
    # processes: test_flows.py::test_cohort_flow_shares_reader_processes_and_a_slide_failing_mid_read_fails_alone)
    for thumb in (2048, 512):
        c = cfg.with_overrides(encode={"num_workers": 0}, tissue={"thumbnail_max_side": thumb})
        [r] = embed_slides([slide], tmp_path / f"out{thumb}", c, progress=False)
        assert r.status == "failed" and "unexpected error" not in r.error, r.error
        assert r.error.startswith(f"{slide}: has corrupt image data at level 0 in its file tile at level-0 "
                                  f"pixel ({x}, {y})"), r.error
    # each decoder on its own: tifffile + imagecodecs (the loader's), and OpenSlide's
    for decoder, where in [("auto", f"in its file tile at level-0 pixel ({x}, {y})"),
                           ("openslide", "in the region at level-0 pixel")]:
        osr = open_for_reading(str(slide), decoder)
        w, hh = osr.dimensions
        grid = make_grid(osr.dimensions, (0.5, 0.5), osr.level_downsamples, np.ones((64, 64), bool),
                         (w / 64, hh / 64), target_mpp=0.5, tile_size=224, min_tissue=0.5)
        with pytest.raises(SlideError) as e:
            read_tiles(osr, grid.coords, grid, path=str(slide))
        osr.close()
        text = str(e.value)
        assert text.startswith(f"{slide}: has corrupt image data at level 0 {where}"), text
        assert "Copy the file again" in text and "\n" not in text


def test_error_paths_are_absolute_whatever_form_they_were_given_in(hostile_dir, monkeypatch, tmp_path, cfg):
    from slide_clip.pipeline import embed_slides

    monkeypatch.chdir(hostile_dir)
    with pytest.raises(SlideClipError) as e:
        slide_info("zero.svs")  # relative
    assert str(e.value).startswith(f"{hostile_dir / 'zero.svs'}: is an empty file"), str(e.value)
    with pytest.raises(SlideClipError) as e:
        slide_info("a/../zero.svs")
    assert str(e.value).startswith(f"{hostile_dir / 'zero.svs'}: "), str(e.value)
    results = embed_slides(["zero.svs", "coarse.tif"], tmp_path / "out", _cfg(cfg).with_overrides(
        tiling={"target_mpp": 0.5}), progress=False)
    assert [r.error.split(": ")[0] for r in results] == [str(hostile_dir / "zero.svs"),
                                                        str(hostile_dir / "coarse.tif")]


@pytest.mark.parametrize("kind,text,where", [
    ("config", "tiling:\n  target_mpp: 0.5\n tile_size: 3\n", "line 3, column 2"),
    ("prompts", "name: x\ntemplates: ['a {}'\nclasses: []\n", "line 3, column 1"),
    ("registry", "models:\n  a: {arch: x\n", "line 3, column 1"),
])
def test_yaml_errors_name_the_line_and_column(tmp_path, kind, text, where):
    from slide_clip.config import load_config
    from slide_clip.encoders import load_registry
    from slide_clip.prompts import load_prompts

    p = tmp_path / f"{kind}.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        {"config": load_config, "prompts": load_prompts, "registry": load_registry}[kind](p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and "is not valid YAML: " + where in msg and "\n" not in msg, msg


# ------------------------------------------------------------------------------ scoring inputs
def test_fewshot_examples_outside_the_slide_or_labelled_twice_are_errors(scored_copy, cfg, tmp_path):
    """A tile outside the slide would be encoded as a blank tile (a silent wrong prototype); the
    same tile labelled twice would count twice, or for two classes: both are errors naming
    the CSV's line, before any model is loaded."""
    from slide_clip.examples import read_examples
    from slide_clip.scoring import fewshot

    out, store = scored_copy
    st = SlideStore.open(store)
    slide = st.slide["path"]
    (x0, y0), (x1, y1) = st.coords()[:2]
    csv = tmp_path / "ex.csv"
    csv.write_text(f"slide,x,y,label\n{slide},{x0},{y0},a\n{slide},{x1},{y1},b\n{slide},99999,99999,b\n")
    with pytest.raises(ConfigError) as e:
        fewshot([store], csv, cfg)
    text = str(e.value)
    assert text.startswith(str(csv)) and "line 4: the example tile at level-0 (99999, 99999) lies outside slide" in text
    assert "\n" not in text
    for label, what in (("a", "also 'a'"), ("b", "there as 'a', here as 'b'")):
        csv.write_text(f"slide,x,y,label\n{slide},{x0},{y0},a\n{slide},{x1},{y1},b\n{slide},{x0},{y0},{label}\n")
        with pytest.raises(ConfigError, match=f"line 4: the tile .* is labelled on line 2 already \\({what}\\)"):
            read_examples(csv)
    img = tmp_path / "t.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    csv.write_text(f"image,label\n{img},a\nt.png,b\n")
    with pytest.raises(ConfigError, match="line 3: the image .* is labelled on line 2 already"):
        read_examples(csv)


def test_scoring_an_empty_folder_is_an_error(tmp_path, cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    examples = tmp_path / "x.csv"
    examples.write_text("slide,x,y,label\ns.svs,0,0,a\ns.svs,0,224,b\n")
    for args in (["zeroshot", empty, "--prompts", "tumour"], ["heatmap", empty, "--set", "tumour"],
                 ["fewshot", empty, "--examples", examples], ["cluster", empty], ["search", empty, "x"],
                 ["map", empty], ["bags", empty]):
        code, stdout, stderr = cli(*args)
        assert code == 2 and stderr.strip() == (f"error: {empty}: holds no slide stores (<slide>.zarr). Give the --out "
                                                "folder of `slide-clip embed` or `run`, or embed the slides into it "
                                                "first."), (args, stdout, stderr)
