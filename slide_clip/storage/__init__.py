"""Slides and stores at URLs: object storage (S3, GCS, Azure, HTTP) beside local files.

One module a concept (docs/ARCHITECTURE.md, "Storage"):

| module | concept |
|---|---|
| ``urls`` | what is a URL, its name, joining parts |
| ``options`` | storage options: the ``storage:`` config section and ``--storage-options``, process-wide |
| ``filesystems`` | the fsspec file system of a URL (a missing extra is one line), ``upath`` path objects |
| ``failures`` | a service's refusal or a cut connection as one :class:`~slide_clip.errors.StorageError` line |
| ``mirror`` | byte ranges of a remote file, and a sparse local file holding just the ranges read |
| ``remote_tiff`` | OpenSlide on a remote TIFF/SVS through its sparse mirror (filled before each read) |
| ``cache`` | a bounded local cache of whole slides (formats only OpenSlide reads, DICOM folders), prefetch |
| ``objects`` | writing and replacing objects (tables, summaries, pictures) atomically from a reader's view |
| ``claims`` | who writes a store on object storage: a conditional-write claim that expires |
| ``owner`` | ``store_owner``: the store's flock for a local path, its claim for a URL |

Nothing here imports Prefect, the pipeline or the encoders.
"""

from slide_clip.storage.urls import is_url, join, url_name  # noqa: F401
