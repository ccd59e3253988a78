"""Prefect tasks: thin wrappers over slide_clip, one module per pipeline stage.

Tasks take and return paths and small JSON-able values (never models, arrays or slide
handles), cache nothing (``NO_CACHE``: the stores on disk are the cache), and retry only
transient failures: a user's bad input (:class:`slide_clip.errors.SlideClipError`) is final.
"""
