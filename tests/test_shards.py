"""Shards: how a cohort is cut into units of distributed work (slide_clip.shards)."""

import pytest

from slide_clip.errors import ConfigError
from slide_clip.manifest import CohortSlide
from slide_clip.shards import TISSUE_GUESS, estimated_tiles, make_shards


def _cohort(n):
    return [CohortSlide(f"/slides/s{i}.tif", name=f"s{i}") for i in range(n)]


def test_shards_of_slides_keep_the_cohort_order_and_cover_it_once():
    cohort = _cohort(5)
    shards = make_shards(cohort, slides=2)
    assert [[c.slide_id for c in s.slides] for s in shards] == [["s0", "s1"], ["s2", "s3"], ["s4"]]
    assert [s.name for s in shards] == ["shard-0-of-3", "shard-1-of-3", "shard-2-of-3"]
    # the same cohort is cut the same way on every run (a killed shard is found again)
    assert [s.parameters() for s in make_shards(cohort, slides=2)] == [s.parameters() for s in shards]
    assert shards[0].parameters()[0] == {"path": "/slides/s0.tif", "mpp": None, "patient_id": None,
                                         "metadata": {}, "name": "s0"}
    [whole] = make_shards(cohort)
    assert [c.slide_id for c in whole.slides] == [c.slide_id for c in cohort]
    names = [s.name for s in make_shards(_cohort(12), slides=1)]
    assert names[0] == "shard-00-of-12" and names == sorted(names)  # sorted as text too


def test_shards_of_tiles_fill_up_to_the_budget_and_a_large_slide_stands_alone():
    cohort = _cohort(6)
    tiles = {"s0": 40, "s1": 50, "s2": 300, "s3": 10, "s4": 0, "s5": 95}
    shards = make_shards(cohort, tiles=100, estimate=lambda c: tiles[c.slide_id])
    assert [[c.slide_id for c in s.slides] for s in shards] == [["s0", "s1"], ["s2"], ["s3", "s4"], ["s5"]]
    assert [s.tiles for s in shards] == [90, 300, 10, 95]


@pytest.mark.parametrize("kwargs, message", [
    ({"slides": 0}, "at least one slide"),
    ({"tiles": 0}, "at least one tile"),
    ({"slides": 2, "tiles": 10}, "not both"),
])
def test_bad_shard_sizes_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_shards(_cohort(3), **kwargs)


def test_tiles_are_estimated_from_the_slide_then_counted_from_its_grid(make_slide, cfg, tmp_path):
    from slide_clip.pipeline import embed_slide

    # a name of its own: the fixture writes <name>.tif, and other tests hold "tissue_0.5" at its own size
    path, _ = make_slide("shards_0.5", mpp=0.5, width_um=2240, height_um=1120)
    c = CohortSlide(str(path), name="shards_0.5")
    out = tmp_path / "out"
    # untiled: the full grid of 224 px tiles at 0.5 µm/px (20 x 10) times the tissue guess
    assert estimated_tiles(c, out, 224, 0.5) == int(20 * 10 * TISSUE_GUESS)
    r = embed_slide(path, out, cfg, progress=False)
    assert 0 < r.n_tiles < 200 and estimated_tiles(c, out, 224, 0.5) == r.n_tiles
    missing = CohortSlide(str(tmp_path / "gone.tif"), name="gone")
    assert estimated_tiles(missing, out, 224, 0.5) == 0  # fails on its own, in its shard
