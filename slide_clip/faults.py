"""Test-only kill points: a deterministic ``kill -9`` at a named point of a command.

The fault tests (tests/test_faults.py) must kill a command between two of its steps
(after a score set is written and before it is swapped in; after scoring and before the
heatmaps), and a kill timed from outside lands there only by chance. With the environment
variable ``SLIDE_CLIP_KILL_AT=<point>[:<n>]`` the process sends itself ``SIGKILL`` the n-th
time (default the first) it reaches ``<point>``. Nothing else reads it; without it a kill
point costs one dictionary look-up. The points (see docs/RELIABILITY.md):

=====================  ==================================================================
``rows-written``       a chunk of embedding rows is on disk and counted (``rows_written``)
``scores-written``     a new score set is complete beside the old one, not yet swapped in
``scores-swapped``     the new set is in place, the old one not yet deleted, the slide's
                       summary not yet written
``scored``             `run`: a slide's scores and summary are written, its heatmaps not yet
``cohort-csv``         `summarize`: the cohort CSV is written, the Parquet not yet
``clusters-stored``    `cluster`: one more slide's clusters are stored
=====================  ==================================================================
"""

from __future__ import annotations

import os
import signal

ENV = "SLIDE_CLIP_KILL_AT"
_reached: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process here if ``SLIDE_CLIP_KILL_AT`` names this point (and count)."""
    want = os.environ.get(ENV)
    if not want:
        return
    point, _, count = want.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
