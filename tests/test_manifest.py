"""Cohort inputs: CSV manifests, folders, duplicate ids, and slides still being copied in."""

import os
import time

import pytest

from slide_clip.errors import ConfigError
from slide_clip.manifest import cohort_slides, last_modified, read_manifest, split_settled


def test_manifest_paths_mpp_and_metadata(tmp_path):
    (tmp_path / "slides").mkdir()
    m = tmp_path / "cohort.csv"
    m.write_text("path,mpp,patient_id,site\nslides/a.svs,0.25,P1,left\n/abs/b.tif,,P2,right\n")
    a, b = read_manifest(m)
    assert a.path == str(tmp_path / "slides" / "a.svs") and a.mpp == 0.25 and a.slide_id == "a"
    assert a.row_metadata() == {"patient_id": "P1", "site": "left"}
    assert b.path == "/abs/b.tif" and b.mpp is None


@pytest.mark.parametrize("body,message", [
    ("file,mpp\na.svs,0.5\n", "needs a 'path' column"),
    ("path,mpp\n,0.5\n", "line 2: empty path"),
    ("path,mpp\na.svs,fast\n", "line 2: mpp 'fast' is not a number"),
    ("path,mpp\na.svs,-1\n", "line 2: mpp must be positive"),
])
def test_bad_manifests_name_the_file_and_line(tmp_path, body, message):
    m = tmp_path / "cohort.csv"
    m.write_text(body)
    with pytest.raises(ConfigError) as e:
        read_manifest(m)
    assert message in str(e.value) and str(m) in str(e.value) and "\n" not in str(e.value)


def test_folders_and_manifests_mix(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "c.svs").write_bytes(b"x")
    m = tmp_path / "m.csv"
    m.write_text("path\nother/d.svs\n")
    ids = [s.slide_id for s in cohort_slides([m, tmp_path / "in"])]
    assert ids == ["d", "c"]


def test_same_stem_in_two_folders_gets_two_ids(tmp_path):
    m = tmp_path / "cohort.csv"
    m.write_text("path\nx/a.svs\ny/a.tif\nx/a.svs\n")
    ids = [s.slide_id for s in cohort_slides([m])]
    assert ids == ["x__a", "y__a"]  # and a slide listed twice is one slide


def test_slides_being_copied_wait_for_a_later_run(tmp_path):
    old, fresh = tmp_path / "old.svs", tmp_path / "fresh.svs"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    now = time.time()
    os.utime(old, (now - 600, now - 600))
    mirax = tmp_path / "scan.mrxs"  # MIRAX: an index file and a folder of data files
    mirax.write_bytes(b"x")
    os.utime(mirax, (now - 600, now - 600))
    (tmp_path / "scan").mkdir()
    (tmp_path / "scan" / "Data0001.dat").write_bytes(b"still arriving")
    assert last_modified(mirax) >= now - 5
    slides = cohort_slides([old, fresh, mirax])
    ready, waiting = split_settled(slides, 60, now=now + 1)
    assert [s.slide_id for s in ready] == ["old"]
    assert sorted(s.slide_id for s in waiting) == ["fresh", "scan"]
    assert split_settled(slides, 0) == (slides, [])


# ----------------------------------------------------------------------------- --mpp-csv rows match slides
@pytest.fixture
def same_stems(tmp_path):
    """a/x.tif, b/x.tif (ids a__x, b__x) and y.tif; dummy files: the CSV is checked before any
    slide is opened."""
    d = tmp_path / "slides"
    for rel in ("a/x.tif", "b/x.tif", "y.tif"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(b"x")
    return d


@pytest.mark.parametrize("rows,message", [
    ("yy.tif,0.5\n", "line 2: 'yy.tif' matches no slide of this run"),
    ("y.tif,0.5\nb__x,0.25\na__z,0.25\n", "line 4: 'a__z' matches no slide of this run"),
    ("y.tif,0.5\ny,0.25\n", "lines 2 and 3 give the slide {d}/y.tif two resolutions (0.5 and 0.25 µm/px)"),
    ("a__x,0.5\nslides/a/x.tif,0.3\n", "lines 2 and 3 give the slide {d}/a/x.tif two resolutions (0.5 and 0.3 µm/px)"),
    ("x.tif,0.5\n", "line 2: 'x.tif' matches 2 slides (a__x, b__x)"),
    ("y.tif,nan\n", "line 2: mpp nan: must be a finite positive number"),
    ("y.tif,0\n", "line 2: mpp 0: must be a finite positive number"),
])
def test_mpp_csv_rows_that_match_no_slide_or_disagree_are_errors(same_stems, tmp_path, rows, message):
    from slide_clip.errors import ConfigError as Error
    from slide_clip_flows.process_cohort import _with_mpp
    from test_cli import _invoke

    d = same_stems
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide,mpp\n" + rows)
    expected = f"{csv}: {message.format(d=d)}"
    for command in ("embed", "run"):  # both paths, before any slide is read (or a server started)
        r = _invoke(command, d, "--out", tmp_path / command, "--mpp-csv", csv, "--model", "random:ViT-B-32")
        assert r.exit_code == 2 and r.stderr.startswith(f"error: {expected}"), r.output
        assert r.stderr.count("\n") == 1 and not (tmp_path / command / "status").exists()
    with pytest.raises(Error) as e:  # the cohort flow's own check (a flow run started without the CLI)
        _with_mpp(cohort_slides([d], None, tmp_path / "flow"), None, str(csv))
    assert str(e.value).startswith(expected)


def test_mpp_csv_matches_paths_names_and_ids(same_stems, tmp_path):
    from slide_clip.mpp_overrides import read_mpp_csv
    from slide_clip_flows.process_cohort import _with_mpp

    d = same_stems
    (tmp_path / "not_in_this_run.svs").write_bytes(b"x")
    csv = d / "mpp.csv"
    # an id, a path relative to the CSV, a name given twice with one value (accepted), and the
    # path of an existing slide this run does not process (a cohort-wide CSV: accepted)
    csv.write_text(f"slide,mpp\na__x,0.25\nb/x.tif,0.3\ny.tif,0.5\ny,0.5\n{tmp_path / 'not_in_this_run.svs'},0.4\n")
    cohort = cohort_slides([d], None, tmp_path / "out")
    assert {c.slide_id: c.mpp for c in _with_mpp(cohort, None, str(csv))} == {"a__x": 0.25, "b__x": 0.3, "y": 0.5}
    assert {c.slide_id: c.mpp for c in _with_mpp(cohort, 0.7, str(csv))} == {"a__x": 0.7, "b__x": 0.7, "y": 0.7}
    table = read_mpp_csv(csv)  # the embed path: slides as given, ids assigned by embed_slides
    paths = [d / "a" / "x.tif", d / "b" / "x.tif", d / "y.tif"]
    assert table.match(list(zip(paths, ["a__x", "b__x", "y"]))) == dict(zip(map(str, paths), [0.25, 0.3, 0.5]))
