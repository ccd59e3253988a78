"""Replacing files and folders so that a reader sees the old one or the new one, never half of one.

Everything that replaces something in an output folder or a store is written beside it
under a temporary name and swapped in only when complete:

- a file (summary JSON, cohort table, heatmap, QC picture, cluster table):
  :func:`replace_file` writes ``.<name>.<pid>.tmp`` in the same folder, then
  ``os.replace`` renames it over the old one (atomic on a local file system);
- a folder (a store's score set, a model's embeddings): :func:`swap_in` exchanges the
  complete new folder with the old one in one ``renameat2(RENAME_EXCHANGE)`` call where the
  kernel and the file system have it (Linux ≥ 3.15: ext4, xfs, btrfs, tmpfs), else it renames
  the old folder aside, the new one into place, and deletes the old one.

A folder written beside its target carries a :data:`TEMP_MARK` name
(``~new~<token>~<name>``, ``~old~<token>~<name>``): ``~`` is a character that names made by
:func:`slide_clip.store.model_key` never contain, so a temporary folder never collides with
a real one, and readers skip every name that starts with it. A temporary folder left by a
crash is never read; the next write into that folder removes it with
:func:`clean_leftovers` (and puts an ``~old`` folder back if a crash came between the two
renames of the fallback, so the old complete version is kept).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import threading
import uuid
from pathlib import Path

#: First character of every temporary name inside a store (never produced by ``model_key``).
TEMP_MARK = "~"

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def is_temporary(name: str) -> bool:
    """Whether ``name`` (a folder's last path component) is a write in progress or a leftover."""
    return name.startswith(TEMP_MARK)


def temporary_name(name: str, kind: str = "new") -> str:
    """A fresh temporary name for ``name`` (``kind``: ``new`` or ``old``)."""
    return f"{TEMP_MARK}{kind}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}{TEMP_MARK}{name}"


def parse_temporary(name: str) -> tuple[str, str] | None:
    """(kind, target name) of a temporary name (kind ``new`` or ``old``), or None for any other name."""
    parts = name.split(TEMP_MARK)
    if len(parts) != 4 or parts[0] or parts[1] not in ("new", "old"):
        return None
    return parts[1], parts[3]


def clean_leftovers(folder: str | Path, keep=()) -> None:
    """Remove the temporary folders a crashed write left in ``folder``, except those named in ``keep``
    (versions a pointer makes current, in a store written on object storage: see slide_clip.store).

    An ``~old`` folder whose target is missing (a crash between the fallback's two renames)
    is renamed back: it is the last complete version. Call it holding the store's lock.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in sorted(folder.iterdir()):
        parsed = parse_temporary(p.name)
        if parsed is None or p.name in keep:
            continue
        kind, target = parsed
        if kind == "old" and not (folder / target).exists():
            os.rename(p, folder / target)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (``renameat2`` with ``RENAME_EXCHANGE``); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # not on this kernel or file system: the fallback
    raise OSError(err, os.strerror(err), str(b))


def swap_in(new: str | Path, target: str | Path, after_swap=None) -> None:
    """Put the complete folder ``new`` at ``target``, replacing what is there; delete the old one.

    ``new`` must be a temporary name in ``target``'s folder. ``after_swap`` (a callable) runs
    once the new folder is in place and before the old one is deleted (a test's kill point).
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.rename(new, target)
        old = None
    elif _exchange(new, target):
        old = new  # the old version now sits under the temporary name
    else:
        old = target.with_name(temporary_name(target.name, "old"))
        os.rename(target, old)
        os.rename(new, target)
    if after_swap is not None:
        after_swap()
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def replace_file(path: str | Path):
    """Yield a temporary path beside ``path``; when the block ends without error, rename it over ``path``.

    A crash or a full disk leaves the old file (or none) and at most a hidden
    ``.<stem>.<pid>-<thread>.tmp<suffix>`` beside it, never a half-written ``path``; two threads
    writing one file (the viewer's requests) each write their own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the suffix tells writers the format
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`replace_file`)."""
    with replace_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)
