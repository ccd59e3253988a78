"""Prefect tasks: thin wrappers over slide_clip, one module per pipeline stage.

Tasks take and return paths and small JSON-able values (never models, arrays or slide
handles), cache nothing (``NO_CACHE``: the stores on disk are the cache), and retry only
transient failures: a user's bad input (:class:`slide_clip.errors.SlideClipError`) is final.

Importing this package (the flows import it first) turns Prefect's telemetry off by default,
before Prefect itself is imported: no usage data leaves an offline hospital machine and no
telemetry notice appears on the user's terminal. A user who sets ``DO_NOT_TRACK`` or
``PREFECT_SERVER_ANALYTICS_ENABLED`` themselves keeps their value.
"""

import os

#: Environment defaults that keep Prefect quiet: ``DO_NOT_TRACK`` switches off Prefect's SDK
#: telemetry and its first-run notice (read at ``import prefect``); the server setting
#: switches off the usage report a (temporary) server sends at start.
TELEMETRY_OFF = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
for _k, _v in TELEMETRY_OFF.items():
    os.environ.setdefault(_k, _v)

#: The global concurrency limit held around encoding; "{host}" is the machine's name, so each
#: GPU machine gets its own limit, created with one slot on first use. For one worker per
#: GPU, add "{gpu}" (the worker's CUDA_VISIBLE_DEVICES): "slide-clip-encoder-{host}-gpu{gpu}".
ENCODER_LIMIT = "slide-clip-encoder-{host}"
