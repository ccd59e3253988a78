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
