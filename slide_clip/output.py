"""Writing to the output folder: failures of the disk said as what happened and what to do.

A read-only folder, a full disk or a missing permission surfaces deep inside Zarr, pandas
or matplotlib as a bare ``OSError``; :func:`output_errors` turns it into an
:class:`~slide_clip.errors.OutputError` naming the path, what happened and what to do.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

from slide_clip.errors import OutputError, SlideClipError

#: What slide-clip writes into an output folder: folder and file name patterns (fnmatch). A
#: folder scan (:mod:`slide_clip.scan`) never takes any of them as a slide. A new kind of
#: output gets its pattern here.
OUTPUT_FOLDERS = ("*.zarr", "status", "summaries", "heatmaps", "classifiers", "explore", "survival", "tables", "labels")
OUTPUT_FILES = ("*.zarr.lock", "*_qc.png", "cohort-*.csv", "cohort-*.parquet", "patients.csv", "patients.csv.part",
                "skipped-files.csv", ".slide-clip-write-test-*")


def is_output_folder(folder: str | Path, out_dir: str | Path | None = None) -> bool:
    """Whether ``folder`` is ``out_dir`` or holds what slide-clip writes (a store or statuses)."""
    d = Path(folder)
    if out_dir is not None and os.path.abspath(d) == os.path.abspath(out_dir):
        return True
    status = d / "status"
    if status.is_dir() and any(status.glob("*.json")):
        return True
    return any(is_store(z.parent) for z in d.glob("*.zarr/zarr.json"))


def is_store(folder: str | Path) -> bool:
    """Whether ``folder`` is a slide-clip store (its root attributes say so)."""
    import json

    try:
        return "slide_clip" in json.loads((Path(folder) / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False


#: errno -> (what happened, what to do when the folder was given as an option ``{opt}``,
#: what to do when the results go beside the stores, a folder no option names)
_DISK_ERRORS = {
    errno.ENOSPC: ("no space left on the device",
                   "Free space (or use another {opt}) and run the same command again: finished work is kept and "
                   "interrupted slides resume.",
                   "Free space and run the same command again: finished work is kept."),
    errno.EDQUOT: ("the disk quota is exceeded",
                   "Free space within your quota (or use another {opt}) and run the same command again: finished "
                   "work is kept.",
                   "Free space within your quota and run the same command again: finished work is kept."),
    errno.EROFS: ("the file system is read-only", "Give a writable {opt} folder.",
                  "This command writes beside the stores: copy the output folder to a writable place (or make "
                  "it writable) and run it there."),
    errno.EACCES: ("permission denied", "Give an {opt} folder you can write to, or fix its permissions.",
                   "This command writes beside the stores: fix the folder's permissions, or copy the output "
                   "folder to a place you can write to and run it there."),
    errno.EPERM: ("operation not permitted", "Give an {opt} folder you can write to, or fix its permissions.",
                  "This command writes beside the stores: fix the folder's permissions, or copy the output "
                  "folder to a place you can write to and run it there."),
    errno.EFBIG: ("the file is too large for the file system or the process's file-size limit",
                  "Use another {opt} on a file system without that limit.",
                  "Copy the output folder to a file system without that limit and run it there."),
}

#: How libraries that hide the errno (pyarrow, FAISS) still say it, in their message.
_STRERRORS = {os.strerror(code): code for code in _DISK_ERRORS}

#: ``option`` of :func:`output_errors` for commands that write beside the stores (no --out).
BESIDE_STORES = None


def _errno_of(e: BaseException) -> int | None:
    if isinstance(e, OSError) and e.errno in _DISK_ERRORS:
        return e.errno
    text = str(e)
    for strerror, code in _STRERRORS.items():
        if strerror in text:
            return code
    return None


def disk_error(exc: BaseException, where: str | Path, option: str | None = "--out") -> OutputError | None:
    """An :class:`OutputError` for ``exc`` (or one in its cause/context chain) if it is a disk failure.

    ``option`` is the command-line option that named the folder being written (its hint
    says to give another), or :data:`BESIDE_STORES` for commands that write beside the stores.
    """
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = _errno_of(e)
        if code is not None:
            what, todo_opt, todo_beside = _DISK_ERRORS[code]
            path = (e.filename if isinstance(e, OSError) else None) or where
            return OutputError(f"cannot write: {what}", path=path,
                               hint=todo_beside if option is BESIDE_STORES else todo_opt.format(opt=option))
        e = e.__cause__ or e.__context__
    return None


@contextmanager
def output_errors(where: str | Path, option: str | None = "--out"):
    """Re-raise disk failures inside the block as one-line :class:`OutputError` s about ``where``
    (``option``: see :func:`disk_error`)."""
    try:
        yield
    except SlideClipError:
        raise  # already one line about the user's input
    except Exception as exc:  # noqa: BLE001 - only disk and storage errors are translated; others go on
        err = disk_error(exc, where, option)
        if err is None:
            from slide_clip.storage.failures import storage_error

            err = storage_error(exc, where, "write")
        if err is None:
            raise
        raise err from None


def ensure_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` if needed and check it can be written; returns it as a Path.

    Raises :class:`OutputError` (read-only, no permission, no space) naming the folder. A URL
    (``s3://bucket/out``) is checked by writing and deleting a probe object: a missing bucket,
    refused credentials or an unreachable service is one :class:`~slide_clip.errors.StorageError`
    line; the URL is returned as a :class:`upath.UPath`.
    """
    from slide_clip.storage.urls import is_url

    if is_url(out_dir):
        from slide_clip.storage import objects
        from slide_clip.storage.filesystems import upath

        probe = f"{str(out_dir).rstrip('/')}/.slide-clip-write-test-{os.getpid()}"
        objects.write_bytes(probe, b"x")
        objects.remove(probe)
        return upath(out_dir)
    out = Path(out_dir)
    with output_errors(out):
        if out.exists() and not out.is_dir():
            raise OutputError("is a file, not a folder", path=out, hint="Give a folder as --out.")
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".slide-clip-write-test-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"x")
        finally:
            try:
                probe.unlink()
            except OSError:
                pass
    return out
