"""What happened to one slide: :class:`SlideResult`, its status file, one-line fault messages.

``out/status/<slide_id>.json`` is written for every slide a command or a flow processed,
whether it succeeded or failed (see docs/FORMAT.md); summaries and cohort tables read it.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class SlideResult:
    """What happened to one slide (JSON-able via :meth:`to_dict`).

    ``status`` is ``ok`` (work done), ``skipped`` (nothing left to do) or ``failed`` (with a
    one-line ``error``). ``extra`` holds what the orchestration adds (scores, metadata, the
    window in which the slide held the device: ``encode_window``, epoch seconds).
    """

    slide: str
    name: str
    status: str
    store: str | None = None
    n_tiles: int | None = None
    encoded: int = 0  # tiles encoded in this run
    seconds: float = 0.0
    error: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def unexpected_error(slide, exc: BaseException) -> str:
    """One line for an error that is not the user's (a bug or a system fault)."""
    from slide_clip.errors import shown_path

    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]
    return f"{shown_path(slide)}: unexpected error: {detail}"


def failed_result(slide, message: str, t0: float, name: str | None = None) -> SlideResult:
    """A ``failed`` result with its one-line message; ``t0`` is when the slide was started."""
    from slide_clip.slide import slide_id

    return SlideResult(slide=str(slide), name=name or slide_id(slide), status="failed", error=message,
                       seconds=round(time.perf_counter() - t0, 3))


def status_path(out_dir, slide_id: str) -> Path:
    """``out/status/<slide_id>.json`` (a UPath for an output folder at a URL)."""
    from slide_clip.storage.filesystems import upath

    return upath(out_dir) / "status" / f"{slide_id}.json"


def read_status(out_dir, slide_id: str) -> dict | None:
    """The slide's last status record, or None (none yet, or unreadable)."""
    try:
        st = json.loads(status_path(out_dir, slide_id).read_text())
    except (OSError, ValueError):
        return None
    return st if isinstance(st, dict) else None


def record_status(out_dir, r: SlideResult) -> None:
    """Record what happened to a slide in ``out/status/<slide_id>.json`` (read by summaries).

    ``extra.seconds_embed`` (seconds from opening the slide to its last embedding written,
    in the run that encoded it) is carried over from the previous record when this run
    encoded nothing (a finished slide skipped, or only re-scored).

    A slide refused because another run holds its store (``extra.busy``: two shards or
    workers over one cohort) is not recorded: the status is the holder's to write.
    """
    if r.extra.get("busy"):
        return
    from slide_clip.output import output_errors
    from slide_clip.storage.urls import absolute, is_url

    data = r.to_dict()
    data["path"] = absolute(r.slide)
    data["extra"] = {k: v for k, v in data["extra"].items() if k != "traceback"}
    path = status_path(out_dir, r.name)
    if "seconds_embed" not in data["extra"] and r.status != "failed" and not r.encoded:
        previous = (read_status(out_dir, r.name) or {}).get("extra", {})
        if isinstance(previous, dict) and previous.get("seconds_embed") is not None:
            data["extra"]["seconds_embed"] = previous["seconds_embed"]
    if is_url(path):  # one PUT: the object appears whole
        from slide_clip.storage import objects

        objects.write_text(str(path), json.dumps(data, indent=1))
        return
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # never a half-written status; the temporary name ends in .tmp so that readers listing
        # status/*.json (run's progress, slide ids) never see it (atomic.replace_file keeps .json)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
