"""What `slide-clip run` shows while it works: a line per finished slide and, while a slide
encodes, its tiles every few seconds, with the cohort's count of slides done, failed and left,
tiles per second and an estimate of the time left.

It reads what the run writes anyway, never Prefect's state: each slide's status file
(``out/status/<slide_id>.json``, written when the slide is finished, by whichever process
or machine ran it) and the ``rows_written`` of the embeddings group being filled
(``out/<slide_id>.zarr/embeddings/<model>/zarr.json``). So it shows the same progress for
shards run in this process, on ``--devices`` workers or on a work pool's machines. A
display only: nothing it reads or fails to read changes a result.

An output folder at a URL is read the same way through fsspec (a listing of the folder and
of ``status/`` a look, asked of the service each time); a status object is new when its
version (ETag, size) differs from the one listed when the run began, so no clock of the
storage service is compared with this machine's.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from slide_clip.store import model_key
from slide_clip.text import plural

#: Seconds between looks at the output folder, and between two "encoding" lines of one slide.
POLL_SECONDS = 1.0
ENCODING_EVERY = 10.0
#: Unfinished slides with a store whose embeddings are looked at in one look (in cohort order:
#: the slides being encoded are among the first unfinished ones of their shards).
MAX_ENCODING_PROBES = 32


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class _LocalFolder:
    """A local output folder: its stores, and the status files written since ``t0`` (mtime)."""

    def __init__(self, out, t0: float):
        self.out, self.t0 = Path(out), t0

    def listing(self) -> tuple[set[str], set[str]]:
        """(slide ids with a store, slide ids with a status file written in this run)."""
        stores = {n[:-5] for n in os.listdir(self.out) if n.endswith(".zarr")}
        try:
            fresh = {e.name[:-5] for e in os.scandir(self.out / "status")
                     if e.name.endswith(".json") and e.stat().st_mtime >= self.t0 - 1}
        except FileNotFoundError:  # status/ is made with the first finished slide
            fresh = set()
        return stores, fresh

    def read_text(self, rel: str) -> str:
        return (self.out / rel).read_text()


class _RemoteFolder:
    """An output folder at a URL: as :class:`_LocalFolder`, through fsspec; a status is new when
    its version differs from the one listed when the run began."""

    def __init__(self, out: str):
        from slide_clip.storage.filesystems import filesystem

        self.fs, self.root = filesystem(out)
        self.root = self.root.rstrip("/")
        try:
            self.before = self._statuses()
        except Exception:  # noqa: BLE001 - a display: the run reports the folder's own errors
            self.before = {}

    def _ls(self, path: str) -> list[dict]:
        try:  # a listing asked of the service each time (storage.options: no listings cache)
            return self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []

    def _statuses(self) -> dict[str, tuple]:
        from slide_clip.storage.cache import etag_of

        return {e["name"].rsplit("/", 1)[-1]: (e.get("size"), etag_of(e)) for e in self._ls(f"{self.root}/status")
                if e["name"].endswith(".json")}

    def listing(self) -> tuple[set[str], set[str]]:
        stores = {e["name"].rstrip("/").rsplit("/", 1)[-1][:-5] for e in self._ls(self.root)
                  if e["name"].rstrip("/").endswith(".zarr")}
        fresh = {n[:-5] for n, v in self._statuses().items() if self.before.get(n) != v}
        return stores, fresh

    def read_text(self, rel: str) -> str:
        return self.fs.cat_file(f"{self.root}/{rel}").decode()


class RunProgress:
    """Watch ``out`` for the slides ``slide_ids`` (embedded with ``model``) from now on, and
    call ``echo(line)`` as they progress. A context manager: started on enter, stopped (after
    a last look) on exit."""

    def __init__(self, out: str | Path, slide_ids: list[str], model: str, echo, *,
                 poll: float = POLL_SECONDS, every: float = ENCODING_EVERY):
        from slide_clip.storage.urls import is_url

        self.out = out
        self.t0 = time.time()
        self.folder = _RemoteFolder(str(out)) if is_url(out) else _LocalFolder(out, self.t0)
        self.ids = list(slide_ids)
        self.model = model_key(model)
        self.echo = echo
        self.poll, self.every = poll, every
        self.done: dict[str, str] = {}  # slide id -> status, for slides finished in this run
        self.tiles = 0  # tiles encoded by this run, in finished slides
        self._seen: dict[str, int] = {}  # slide id -> rows written when first seen encoding
        self._rows: dict[str, tuple[float, int]] = {}  # slide id -> (when, rows) its rate is timed from
        self._timed: set[str] = set()  # slides whose rate is timed from their first rows seen written
        self._said: dict[str, float] = {}  # slide id -> when its last encoding line was shown
        self._shown: dict[str, int] = {}  # slide id -> rows written that line showed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="run-progress", daemon=True)

    # ---------------------------------------------------------------- reading the folder
    def _status(self, sid: str) -> dict | None:
        """The slide's status written in this run (the listing said it is new), or None."""
        try:
            st = json.loads(self.folder.read_text(f"status/{sid}.json"))
        except (OSError, ValueError):
            return None
        return st if isinstance(st, dict) else None

    def _rows_written(self, sid: str) -> tuple[int, int] | None:
        try:
            attrs = json.loads(self.folder.read_text(f"{sid}.zarr/embeddings/{self.model}/zarr.json"))
            a = attrs.get("attributes") or {}
            if a.get("status") == "complete":
                return None
            return int(a.get("rows_written", 0)), int(a["n_tiles"])
        except (OSError, ValueError, TypeError, KeyError):
            return None

    # ---------------------------------------------------------------- lines
    def _counts(self, extra_tiles: int = 0) -> str:
        failed = sum(s == "failed" for s in self.done.values())
        left = len(self.ids) - len(self.done)
        elapsed = time.time() - self.t0
        parts = [f"{len(self.done) - failed} of {plural(len(self.ids), 'slide')} done", f"{failed} failed",
                 f"{left} left"]
        tiles = self.tiles + extra_tiles
        if tiles and elapsed > 0:
            parts.append(f"{tiles / elapsed:.1f} tiles/s")
        if self.done and left:
            parts.append(f"about {_duration(elapsed / len(self.done) * left)} left")
        return ", ".join(parts)

    def look(self) -> None:
        """One look at the folder: a line for each newly finished slide, and for a slide
        encoding (at most every ``every`` seconds)."""
        now = time.time()
        encoding_tiles = 0
        try:  # one listing a look, not a file probe per slide of the cohort
            stores, fresh = self.folder.listing()
        except OSError:
            return
        probed = 0
        for sid in self.ids:
            if sid in self.done or (sid not in fresh and sid not in stores):
                continue
            st = self._status(sid) if sid in fresh else None
            if st is not None and st.get("status") in ("ok", "skipped", "failed"):
                self.done[sid] = st["status"]
                self.tiles += int(st.get("encoded") or 0)
                self._rows.pop(sid, None)
                tail = (st.get("error") or "") if st["status"] == "failed" else \
                    f"{plural(int(st.get('n_tiles') or 0), 'tile')}, {int(st.get('encoded') or 0)} encoded"
                self.echo(f"[{len(self.done)}/{len(self.ids)}] {st['status']:7s} {sid}  {tail}")
                continue
            if probed >= MAX_ENCODING_PROBES:
                continue
            probed += 1
            rows = self._rows_written(sid)
            if rows is None:
                continue
            written, total = rows
            if sid not in self._rows:
                self.echo(f"encoding {sid}: {plural(total, 'tile')}" + (f", {written} already written" if written else ""))
                self._said[sid] = now
            seen = self._seen.setdefault(sid, written)
            first = self._rows.setdefault(sid, (now, written))
            if sid not in self._timed and written > first[1]:
                # its first rows since it was seen: a slide's store is begun while the slide
                # before it encodes, so its rate is timed from here, not from when it was seen
                self._timed.add(sid)
                self._rows[sid] = first = (now, written)
            encoding_tiles += written - seen
            # a line when rows were written since the last one (they reach the store in steps: never
            # the same counts again every few seconds)
            if now - self._said.get(sid, self.t0) >= self.every and written > max(seen, self._shown.get(sid, 0)):
                self._said[sid] = now
                self._shown[sid] = written
                rate = (written - first[1]) / max(1e-6, now - first[0])
                tail = f" ({rate:.1f} tiles/s, this slide about {_duration((total - written) / rate)} left)" \
                    if rate > 0 else ""
                self.echo(f"encoding {sid}: {written} of {plural(total, 'tile')}{tail}")
        if encoding_tiles and any(t == now for t in self._said.values()):  # under this look's lines
            self.echo("  " + self._counts(encoding_tiles))

    def _loop(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.look()
            except Exception:  # noqa: BLE001 - a display never stops the run
                pass

    def __enter__(self) -> "RunProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.look()
        except Exception:  # noqa: BLE001
            pass


def quiet_prefect_console(verbose: bool) -> None:
    """Without ``--verbose``, Prefect's own log lines stay in its UI and API, off the console
    (its console handler's level, set before Prefect configures logging; a user's own
    setting wins)."""
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
