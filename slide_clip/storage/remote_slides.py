"""Opening a slide at a URL: by byte range where possible, else from a whole local copy.

- A TIFF that OpenSlide reads as Aperio SVS or generic tiled TIFF, every level a tiled
  directory, is read by range through a sparse mirror (:mod:`.remote_tiff`): its header and
  directories, OpenSlide's quickhash level and the tiles read, never the whole file.
- Anything else (other formats, DICOM series folders, a TIFF of another vendor) is staged
  whole in the local cache (:mod:`.cache`) and opened there.

Either way the caller (``slide.open_slide``) runs the checks it runs for local files, and the
:class:`~slide_clip.slide.SlideInfo` is the local file's (same fingerprint), with the URL as
its ``path``.
"""

from __future__ import annotations

import os
from pathlib import Path

from slide_clip.storage.mirror import RemoteFile
from slide_clip.storage.remote_tiff import NotRanged, is_tiff_header, mirror_tiff, mirrored

#: Files that are never read by range: formats whose data is not (only) tiled TIFF directories.
STAGED_SUFFIXES = (".mrxs", ".vms", ".vmu", ".ndpi", ".scn", ".bif", ".svslide", ".dcm", ".dicom", ".isyntax")


def _remote(url: str) -> RemoteFile | None:
    """The object at ``url``, or None when ``url`` is a folder (a DICOM series)."""
    try:
        return RemoteFile(url)
    except IsADirectoryError:
        return None


def _ranged_candidate(url: str, remote: RemoteFile | None) -> bool:
    if remote is None or os.path.splitext(url.lower().rstrip("/"))[1] in STAGED_SUFFIXES:
        return False
    return remote.size >= 8 and is_tiff_header(remote.pread(8, 0))


def needs_staging(url: str) -> bool:
    """Whether ``url`` is read from a whole local copy (not by range)."""
    return not _ranged_candidate(url, _remote(url))


def open_remote_slide(url: str, mpp_override: float | None = None):
    """``(handle, SlideInfo)`` of the slide at ``url``: :func:`slide_clip.slide.open_slide` for URLs."""
    from slide_clip.slide import open_file, resolve_slide_path
    from slide_clip.storage.cache import default_cache

    remote = _remote(url)
    if _ranged_candidate(url, remote):
        mirror, tif = mirror_tiff(url, remote)
        try:
            return open_file(Path(mirror.path), url, mpp_override, wrap=lambda osr: mirrored(url, mirror, tif, osr))
        except NotRanged:
            pass
        finally:
            if not getattr(mirror, "owned", False):
                tif.close()
                mirror.close()
    local = default_cache().stage(url)
    return open_file(resolve_slide_path(local), url, mpp_override)


def open_remote_handle(url: str):
    """An OpenSlide-like handle on ``url`` for a loader (no checks: the slide was opened and checked
    with :func:`open_remote_slide` before): a :class:`~.remote_tiff.MirroredSlide`, or OpenSlide
    on the cached copy."""
    import openslide

    from slide_clip.slide import resolve_slide_path
    from slide_clip.storage.cache import default_cache

    remote = _remote(url)
    if _ranged_candidate(url, remote):
        mirror, tif = mirror_tiff(url, remote)
        osr = None
        try:
            osr = openslide.OpenSlide(mirror.path)
            return mirrored(url, mirror, tif, osr)
        except NotRanged:
            pass
        finally:
            if not getattr(mirror, "owned", False):
                if osr is not None:
                    osr.close()
                tif.close()
                mirror.close()
    return openslide.OpenSlide(str(resolve_slide_path(default_cache().stage(url))))
