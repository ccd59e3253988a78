"""URLs of slides and stores: ``s3://``, ``gs://``, ``az://`` (``abfs://``), ``http(s)://``.

A local path is never a URL (``file://`` is taken as its path). :func:`is_url` is the one test
every caller uses to pick the local or the remote code path.
"""

from __future__ import annotations

import os
import posixpath

#: URL schemes slide-clip reads and writes, and the package (an extra of slide-clip) that serves each.
SCHEMES = {
    "s3": ("s3fs", None),
    "s3a": ("s3fs", None),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"),
    "abfs": ("adlfs", "azure"),
    "abfss": ("adlfs", "azure"),
    "http": ("aiohttp", None),
    "https": ("aiohttp", None),
}


def scheme(text) -> str | None:
    """The URL scheme of ``text`` (lower case), or None for a local path."""
    s = str(text)
    head, sep, _ = s.partition("://")
    if not sep or not head or not head.replace("+", "").replace("-", "").isalnum():
        return None
    return head.lower()


def is_url(text) -> bool:
    """Whether ``text`` (a str, a Path, a :class:`upath.UPath`) names a remote object rather than a local file."""
    if text is None or isinstance(text, bytes):
        return False
    if isinstance(text, os.PathLike) and type(text).__module__.startswith("pathlib"):
        return False
    sch = scheme(text)
    return sch is not None and sch != "file"


def local_path(text) -> str:
    """A ``file://`` URL as its path; any other string as it is."""
    s = str(text)
    return s[len("file://"):] if s.lower().startswith("file://") else s


def absolute(path) -> str:
    """A slide's or store's identity as text: a URL as it is, a local path made absolute
    (never ``Path(url)``, which turns ``s3://b/k`` into ``s3:/b/k``)."""
    if is_url(path):
        return str(path)
    from pathlib import Path

    return str(Path(local_path(path)).expanduser().resolve())


def join(url: str, *parts: str) -> str:
    """``url`` with ``parts`` appended (``/``-separated, never a backslash)."""
    base = str(url).rstrip("/")
    for p in parts:
        base = f"{base}/{str(p).strip('/')}"
    return base


def url_name(url: str) -> str:
    """The last component of ``url`` (a file name, or a folder's name)."""
    s = str(url).rstrip("/")
    return posixpath.basename(s.split("://", 1)[-1])


def parent(url: str) -> str:
    """The URL of the folder (prefix) holding ``url``."""
    s = str(url).rstrip("/")
    head, _, rest = s.partition("://")
    return f"{head}://{posixpath.dirname(rest)}"
