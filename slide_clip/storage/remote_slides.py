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

from pathlib import Path

from slide_clip.storage.remote_tiff import (STAGED_SUFFIXES, NotRanged, mirror_tiff, mirrored,  # noqa: F401
                                           needs_staging, ranged_candidate, remote_object)


def open_remote_slide(url: str, mpp_override: float | None, open_file, resolve):
    """``(handle, SlideInfo)`` of the slide at ``url``: :func:`slide_clip.slide.open_slide` for URLs.

    ``open_file`` and ``resolve`` are :mod:`slide_clip.slide`'s (given by it: this module never
    imports the slide module, which imports this one)."""
    from slide_clip.storage.cache import default_cache

    remote = remote_object(url)
    if ranged_candidate(url, remote):
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
    return open_file(resolve(local), url, mpp_override)


def open_remote_handle(url: str, resolve):
    """An OpenSlide-like handle on ``url`` for a loader (no checks: the slide was opened and checked
    with :func:`open_remote_slide` before): a :class:`~.remote_tiff.MirroredSlide`, or OpenSlide
    on the cached copy (``resolve``: :func:`slide_clip.slide.resolve_slide_path`)."""
    import openslide

    from slide_clip.storage.cache import default_cache

    remote = remote_object(url)
    if ranged_candidate(url, remote):
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
    return openslide.OpenSlide(str(resolve(default_cache().stage(url))))
