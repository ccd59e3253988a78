"""Prefect tasks: thin wrappers over slide_clip, one module per pipeline stage.

Tasks take and return paths and small JSON-able values (never models, arrays or slide
handles), cache nothing (``NO_CACHE``: the stores on disk are the cache), and retry only
transient failures: a user's bad input (:class:`slide_clip.errors.SlideClipError`) is final.
"""

#: The global concurrency limit held around encoding; "{host}" is the machine's name, so each
#: GPU machine gets its own limit, created with one slot on first use. For one worker per
#: GPU, add "{gpu}" (the worker's CUDA_VISIBLE_DEVICES): "slide-clip-encoder-{host}-gpu{gpu}".
ENCODER_LIMIT = "slide-clip-encoder-{host}"
