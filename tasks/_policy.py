"""Retry policy shared by the tasks: retry transient failures, never a user's bad input."""

from __future__ import annotations

from slide_clip.errors import SlideClipError

RETRIES = 2
RETRY_DELAY_SECONDS = 5


def transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the failure is a :class:`SlideClipError`."""
    try:
        state.result()
    except SlideClipError:
        return False
    except Exception:  # noqa: BLE001 - I/O errors, CUDA out of memory, a lost server: retry
        return True
    return False
