"""slide-clip: whole-slide images to CLIP tile embeddings, scores and heatmaps.

The domain library. It has no Prefect import; use it from a notebook::

    import slide_clip as sc
    info = sc.slide_info("slide.svs")
    result = sc.embed_slide("slide.svs", "out/", model="quiltnet-b-32")
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slide-clip")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+source"

from slide_clip.errors import (  # noqa: E402
    ConfigError,
    MppError,
    SlideClipError,
    SlideError,
    StoreError,
    WeightsError,
)
from slide_clip.slide import SlideInfo, open_slide, slide_info  # noqa: E402

__all__ = [
    "ConfigError",
    "MppError",
    "SlideClipError",
    "SlideError",
    "SlideInfo",
    "StoreError",
    "WeightsError",
    "__version__",
    "open_slide",
    "slide_info",
    "embed_slide",
]


def __getattr__(name):  # lazy: keep `import slide_clip` free of torch
    if name == "embed_slide":
        from slide_clip.pipeline import embed_slide

        return embed_slide
    raise AttributeError(name)
