"""The fsspec file system of a URL, with the process's storage options (:mod:`.options`).

``s3://`` is served by s3fs (a dependency of slide-clip); ``gs://`` by gcsfs and ``az://`` by
adlfs, extras of slide-clip (``pip install 'slide-clip[gcs]'``, ``'slide-clip[azure]'``): a
URL whose package is missing is one line naming the URL and the extra to install.
fsspec keeps one file system instance per set of options, so this is cheap to call per URL.
"""

from __future__ import annotations

from slide_clip.errors import StorageError
from slide_clip.storage.options import fsspec_options
from slide_clip.storage.urls import SCHEMES, is_url, local_path, scheme


def _missing(url: str, package: str, extra: str | None) -> StorageError:
    how = f"pip install 'slide-clip[{extra}]'" if extra else f"pip install {package}"
    return StorageError(f"reading {scheme(url)}:// URLs needs the package {package}, which is not installed",
                        path=url, hint=f"Install it: {how}.")


def protocol_of(url: str) -> str:
    """The fsspec protocol of ``url`` (one of :data:`~.urls.SCHEMES`); an unknown scheme is a StorageError."""
    sch = scheme(url)
    if sch not in SCHEMES:
        known = ", ".join(f"{s}://" for s in ("s3", "gs", "az", "https"))
        raise StorageError(f"has an unsupported URL scheme {sch}://", path=url,
                           hint=f"Give a local path or a URL of {known}.")
    return sch


def filesystem(url: str, storage=None):
    """``(fs, path)``: the fsspec file system serving ``url`` and the path of ``url`` in it."""
    import fsspec

    if not is_url(url):
        return fsspec.filesystem("file"), local_path(url)
    protocol = protocol_of(url)
    package, extra = SCHEMES[protocol]
    try:
        fs = fsspec.filesystem(protocol, **fsspec_options(protocol, storage))
    except ImportError:
        raise _missing(url, package, extra) from None
    return fs, fs._strip_protocol(str(url))


def upath(url, storage=None):
    """A path object for ``url``: :class:`upath.UPath` (pathlib's interface over fsspec) for a URL,
    :class:`pathlib.Path` for a local path. ``/``, ``.name``, ``.exists()``, ``.read_text()``,
    ``.iterdir()`` work the same on both."""
    from pathlib import Path

    if not is_url(url):
        return Path(local_path(url)) if not isinstance(url, Path) else url
    if type(url).__module__.startswith("upath"):
        return url
    from upath import UPath

    protocol = protocol_of(str(url))
    package, extra = SCHEMES[protocol]
    try:
        return UPath(str(url), **fsspec_options(protocol, storage))
    except ImportError:
        raise _missing(str(url), package, extra) from None


def remove_tree(path) -> None:
    """Delete a folder (a prefix of objects) and everything in it; nothing if it is absent."""
    import shutil

    if is_url(path):
        fs, p = filesystem(str(path))
        try:
            fs.rm(p, recursive=True)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(p)
    else:
        shutil.rmtree(path, ignore_errors=True)


def modified_epoch(info: dict) -> float | None:
    """When an object was last written (epoch seconds) from its fsspec info: ``LastModified``
    (S3), ``last_modified`` (Azure), ``updated`` (GCS), ``mtime`` (local); None if none is given."""
    import datetime as dt

    for key in ("LastModified", "last_modified", "updated", "mtime"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, str):
            try:
                v = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(v, dt.datetime):
            return (v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)).timestamp()
    return None
