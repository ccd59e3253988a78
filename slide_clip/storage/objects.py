"""Files beside the stores at URLs: written whole, so a reader sees the old object or the new one.

An object store has no rename, but a PUT is atomic from a reader's view: the object appears
whole when the upload completes (a multipart upload too, at its completion), or not at all.
So every file slide-clip writes beside remote stores (cohort tables, summaries, status files,
heatmaps, QC pictures) is written completely to a local temporary file first, then sent in one
upload: :func:`replace_file` is :func:`slide_clip.atomic.replace_file` for URLs and local paths
alike, and the write helpers below take either.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from slide_clip.storage.failures import remote_errors
from slide_clip.storage.filesystems import filesystem, upath
from slide_clip.storage.urls import is_url, url_name


@contextlib.contextmanager
def replace_file(path):
    """Yield a local path to write; when the block ends without error it becomes ``path``.

    Local: a hidden temporary file beside ``path``, renamed over it. URL: a local temporary
    file (same suffix, so writers pick the format from it), uploaded in one PUT; a failed
    block or upload leaves the old object as it was.
    """
    if not is_url(path):
        from slide_clip.atomic import replace_file as local_replace

        with local_replace(path) as tmp:
            yield tmp
        return
    url = str(path)
    suffix = os.path.splitext(url_name(url))[1]
    fd, tmp = tempfile.mkstemp(prefix=".slide-clip-upload-", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        fs, p = filesystem(url)
        with remote_errors(url, "write"):
            fs.put_file(tmp, p)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def write_bytes(path, data: bytes):
    """Write ``data`` to ``path`` (a local path or a URL) whole; returns it as a path object
    (:func:`~.filesystems.upath`)."""
    with replace_file(path) as tmp:
        Path(tmp).write_bytes(data)
    return upath(path)


def write_text(path, text: str):
    """Write ``text`` (UTF-8) to ``path`` (a local path or a URL) whole."""
    return write_bytes(path, text.encode())


def upload(local, url) -> None:
    """Put the local file ``local`` at ``url`` whole, in one PUT (a failed upload leaves the old object)."""
    _remote(url, lambda fs, p: fs.put_file(str(local), p), "write")


def _remote(path, call, action: str = "read"):
    """``call(fs, p)`` on the file system of the URL ``path``, its failures as one line."""
    fs, p = filesystem(str(path))
    with remote_errors(str(path), action):
        return call(fs, p)


def read_bytes(path) -> bytes:
    """The bytes of ``path`` (a local path or a URL); a missing object is a one-line StorageError."""
    return _remote(path, lambda fs, p: fs.cat_file(p)) if is_url(path) else Path(path).read_bytes()


def read_text(path) -> str:
    return read_bytes(path).decode()


def _exists(fs, p) -> bool:
    fs.invalidate_cache(p)  # asked of the service: another process may have written it since a listing
    return fs.exists(p)


def exists(path) -> bool:
    return _remote(path, _exists) if is_url(path) else Path(path).exists()


def remove(path) -> None:
    """Delete the file ``path`` (nothing if absent)."""
    if not is_url(path):
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()
        return
    with contextlib.suppress(FileNotFoundError):
        _remote(path, lambda fs, p: fs.rm_file(p), "write")
