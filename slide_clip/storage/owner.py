"""Who may write a store: its OS file lock for a local path, its claim for a URL.

``store_owner(path, wait)`` is the one call writers use; both have the same interface and the
same error (:class:`~slide_clip.errors.StoreBusyError` naming the holder) when another run
holds the store.
"""

from __future__ import annotations

from slide_clip.storage.urls import is_url


def store_owner(path, wait: float = 0.0):
    """A context manager holding ``path``'s store for writing: ``store_lock`` (local) or ``claim`` (URL)."""
    if is_url(path):
        from slide_clip.storage.claims import claim

        return claim(str(path), wait=wait)
    from slide_clip.store import store_lock

    return store_lock(path, wait=wait)
