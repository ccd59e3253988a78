"""A run's folder, written beside the previous one and swapped in only when complete.

``out/survival/<baseline>/<run>/`` is never a mix of two runs. A run writes into
``.<run>.partial-<pid>/`` beside it; when everything is written, the previous folder is
renamed aside (``.<run>.old-<pid>``), the new one renamed into place, and the previous one
deleted. A run that fails or is killed leaves the previous folder as it was (its partial
folder is removed by the next run of that name). Were a run killed between the two
renames, the next run of the name puts the previous folder back first.

At a URL (``s3://...``; an object store has no rename) the run is written into a local
temporary folder and uploaded when complete (:class:`RemoteRunFolder`): the previous run's
``report.json`` is deleted first, then its other objects, the new files are uploaded and the
new ``report.json`` last, so a folder holding a ``report.json`` holds that one whole run.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid(p: Path) -> int | None:
    try:
        return int(p.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return None


class RunFolder:
    """``with RunFolder(final) as rf: write into rf.path; rf.commit()``."""

    def __init__(self, final: str | Path):
        self.final = Path(final)
        self.path = self.final.parent / f".{self.final.name}.partial-{os.getpid()}"
        self._old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
        self.committed = False

    def _leftovers(self, kind: str) -> list[Path]:
        found = self.final.parent.glob(f".{self.final.name}.{kind}-*")
        return sorted(p for p in found if (pid := _pid(p)) is not None and pid != os.getpid() and not _alive(pid))

    def __enter__(self) -> "RunFolder":
        self.final.parent.mkdir(parents=True, exist_ok=True)
        old = self._leftovers("old")
        if old and not self.final.exists():  # killed between the two renames: the previous run comes back
            os.rename(old[-1], self.final)
            old = old[:-1]
        for p in [*old, *self._leftovers("partial")]:
            shutil.rmtree(p, ignore_errors=True)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir()
        return self

    def commit(self) -> Path:
        """Put the finished folder in place of the previous one; returns the final path."""
        had = self.final.exists()
        if had:
            os.rename(self.final, self._old)
        os.rename(self.path, self.final)
        self.committed = True
        if had:
            shutil.rmtree(self._old, ignore_errors=True)
        return self.final

    def __exit__(self, *exc) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)


class RemoteRunFolder:
    """:class:`RunFolder` for a URL ``final``: ``path`` is a local temporary folder, uploaded by
    :meth:`commit` (``report.json`` last); a run that fails before leaves the objects as they were."""

    MARKER = "report.json"

    def __init__(self, final):
        import tempfile

        from slide_clip.storage.urls import url_name

        self.final = final
        self._tmp = Path(tempfile.mkdtemp(prefix="slide-clip-run-"))
        self.path = self._tmp / f".{url_name(str(final))}.partial-{os.getpid()}"
        self.committed = False

    def __enter__(self) -> "RemoteRunFolder":
        self.path.mkdir()
        return self

    def commit(self):
        """Replace the objects under ``final`` with the finished folder; returns ``final``."""
        from slide_clip.storage import objects
        from slide_clip.storage.failures import remote_errors
        from slide_clip.storage.filesystems import filesystem
        from slide_clip.storage.urls import join

        url = str(self.final)
        files = sorted(p for p in self.path.rglob("*") if p.is_file())
        names = {p.relative_to(self.path).as_posix() for p in files}
        fs, root = filesystem(url)
        with remote_errors(url, "write"):
            fs.invalidate_cache(root)
            old = fs.find(root) if fs.exists(root) else []
        objects.remove(join(url, self.MARKER))  # from now on the folder is no complete run until the new marker
        for o in old:
            rel = o[len(root):].lstrip("/")
            if rel != self.MARKER and rel not in names:
                objects.remove(join(url, rel))
        for p in sorted(files, key=lambda p: p.relative_to(self.path).as_posix() == self.MARKER):
            objects.upload(p, join(url, p.relative_to(self.path).as_posix()))
        self.committed = True
        return self.final

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def run_name(path) -> str:
    """The run's name from the folder it is being written in (``.<run>.partial-<pid>``)."""
    m = re.fullmatch(r"\.(.+)\.partial-\d+", Path(str(path)).name)
    return m.group(1) if m else Path(str(path)).name


def run_folder(final):
    """The run folder for ``final``: :class:`RunFolder` for a local path, :class:`RemoteRunFolder` for a URL."""
    from slide_clip.storage.urls import is_url

    return RemoteRunFolder(final) if is_url(final) else RunFolder(final)
