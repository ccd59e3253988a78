"""Errors a user can act on.

Every error raised for a user's bad input is a :class:`SlideClipError`: its text is one
line that names the file, says what is wrong and what to do. The command line prints that
line, never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


def shown_path(path: str | Path) -> str:
    """How a file is named in a message: always its absolute path (``~`` expanded, ``..``
    folded, symbolic links kept as given), so a line means the same file wherever it is read
    (a log, a status file, a cohort table) and whichever form the path was given in. A URL
    (``s3://bucket/key``, a :class:`upath.UPath` of one) is shown as the URL."""
    text = str(path) if not isinstance(path, (str, bytes, os.PathLike)) or "://" in str(path) else None
    if text is not None:
        return text
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


class SlideClipError(Exception):
    """A problem with the user's input or environment, explained in one line.

    ``path`` (one path, or a list of them) is shown absolute (:func:`shown_path`).
    """

    def __init__(self, problem: str, *, path: str | Path | list | tuple | None = None, hint: str | None = None):
        if isinstance(path, (list, tuple)):
            self.path = ", ".join(shown_path(p) for p in path) if path else None
        else:
            self.path = shown_path(path) if path is not None else None
        self.problem = problem
        self.hint = hint
        text = problem if self.path is None else f"{self.path}: {problem}"
        if hint:
            text = f"{text}. {hint}" if not text.endswith((".", "?", "!")) else f"{text} {hint}"
        super().__init__(" ".join(text.split()))  # always one line


class SlideError(SlideClipError):
    """The slide cannot be opened, is not a brightfield RGB whole-slide image, or is corrupt."""


class MppError(SlideError):
    """The slide's resolution (micrometres per pixel) is missing or implausible."""


class ConfigError(SlideClipError):
    """A configuration file or option is invalid."""


class WeightsError(SlideClipError):
    """Model weights could not be obtained."""


class StoreError(SlideClipError):
    """A slide store is missing, partial, damaged, or does not match the request."""


class StoreBusyError(StoreError):
    """Another process holds the store's lock (it is being written)."""


class OutputError(SlideClipError):
    """The output folder cannot be written: read-only, no space left, no permission."""


class StorageError(SlideClipError):
    """Object storage (S3, GCS, Azure, HTTP) refused or lost a request: a missing bucket or object,
    bad credentials, throttling, a cut connection. Names the URL."""
