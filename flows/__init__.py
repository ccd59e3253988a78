"""Prefect flows: which slides, in what order, with what concurrency, retries and reports.

No image or tensor code lives here; the tasks call the slide_clip library.
"""

import logging

import slide_clip_tasks  # noqa: F401 - first: sets Prefect's telemetry off before Prefect is imported
from slide_clip.errors import SlideClipError


class _OneLineUserErrors(logging.Filter):
    """Drop the traceback from log records about a user's bad input (a SlideClipError):
    its message already says which file, what is wrong and what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], SlideClipError):
            record.exc_info = None
            record.exc_text = None
        return True


_FILTER = _OneLineUserErrors()


def quiet_user_errors() -> None:
    """Install the filter on Prefect's log handlers (console and API), once."""
    for name in ("prefect", ""):
        for h in logging.getLogger(name).handlers:
            if _FILTER not in h.filters:
                h.addFilter(_FILTER)
