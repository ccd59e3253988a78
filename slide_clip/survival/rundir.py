"""A run's folder, written beside the previous one and swapped in only when complete.

``out/survival/<baseline>/<run>/`` is never a mix of two runs. A run writes into
``.<run>.partial-<pid>/`` beside it; when everything is written, the previous folder is
renamed aside (``.<run>.old-<pid>``), the new one renamed into place, and the previous one
deleted. A run that fails or is killed leaves the previous folder as it was (its partial
folder is removed by the next run of that name). Were a run killed between the two
renames, the next run of the name puts the previous folder back first.
"""

from __future__ import annotations

import os
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
