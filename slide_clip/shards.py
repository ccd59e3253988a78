"""Shards: a cohort cut into shares of slides, the unit of distributed work.

A shard is a list of consecutive slides of the cohort (in cohort order, so the same cohort is
cut the same way on every run, and a shard run killed midway is picked up by the next run of
the cohort: its finished slides are skipped, its interrupted ones resume). A shard holds at
most ``slides`` slides, or, with ``tiles``, slides until their estimated tiles reach that
number (a slide larger than the budget is a shard of its own).

A slide's tiles are estimated from its grid: the tiles its store holds when it is tiled
already, else the full grid of tiles over the slide at the target resolution, times
:data:`TISSUE_GUESS` (the share of a slide that is tissue, on average, before it is masked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from slide_clip.errors import ConfigError, SlideClipError
from slide_clip.manifest import CohortSlide

#: Share of a slide's area taken as tissue when estimating an untiled slide's tiles.
TISSUE_GUESS = 0.5


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: its slides and their estimated tiles."""

    index: int
    count: int
    slides: tuple[CohortSlide, ...]
    tiles: int

    @property
    def name(self) -> str:
        width = len(str(max(1, self.count - 1)))
        return f"shard-{self.index:0{width}d}-of-{self.count}"

    def parameters(self) -> list[dict]:
        """The slides as the shard flow's ``slides`` parameter (JSON-able)."""
        return [{"path": c.path, "mpp": c.mpp, "patient_id": c.patient_id, "metadata": c.metadata,
                 "name": c.slide_id} for c in self.slides]


def estimated_tiles(c: CohortSlide, out: str | Path, tile_size: int, target_mpp: float) -> int:
    """Tiles of ``c``: its store's, when tiled; else the slide's full grid x :data:`TISSUE_GUESS`
    (0 when the slide cannot be opened: it will fail on its own, in its shard)."""
    from slide_clip.slide import open_slide
    from slide_clip.store import STATUS_TILED, SlideStore, store_path

    path = store_path(out, c.slide_id)
    if (path / "zarr.json").is_file():
        try:
            st = SlideStore.open(path)
            if st.status == STATUS_TILED:
                return int(st.n_tiles)
        except SlideClipError:
            pass
    try:
        osr, info = open_slide(c.path, c.mpp)
    except SlideClipError:
        return 0
    osr.close()
    if not info.mpp:
        return 0
    side_um = tile_size * target_mpp
    w_um, h_um = info.width * info.mpp, info.height * info.mpp
    return int(math.ceil(w_um / side_um) * math.ceil(h_um / side_um) * TISSUE_GUESS)


def make_shards(cohort: list[CohortSlide], *, slides: int | None = None, tiles: int | None = None,
                estimate=None) -> list[Shard]:
    """Cut ``cohort`` into shards of at most ``slides`` slides, or of about ``tiles`` estimated
    tiles (``estimate(slide) -> tiles``); neither: one shard."""
    if slides is not None and slides < 1:
        raise ConfigError(f"--shard-slides {slides}: a shard holds at least one slide")
    if tiles is not None and tiles < 1:
        raise ConfigError(f"--shard-tiles {tiles}: a shard holds at least one tile")
    if slides is not None and tiles is not None:
        raise ConfigError("give --shard-slides or --shard-tiles, not both")
    groups: list[list[CohortSlide]] = []
    counts: list[int] = []
    if tiles is not None:
        est = [int(estimate(c)) if estimate else 0 for c in cohort]
        for c, n in zip(cohort, est):
            if not groups or (counts[-1] + n > tiles and groups[-1]):
                groups.append([])
                counts.append(0)
            groups[-1].append(c)
            counts[-1] += n
    else:
        step = slides or max(1, len(cohort))
        groups = [list(cohort[i:i + step]) for i in range(0, len(cohort), step)]
        counts = [0] * len(groups)
    return [Shard(k, len(groups), tuple(g), n) for k, (g, n) in enumerate(zip(groups, counts))]
