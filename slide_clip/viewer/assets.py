"""Where the page's files come from: our own page (package data) and OpenSeadragon (installed).

OpenSeadragon is not copied into this repository and never loaded from the internet
(hospital machines are offline): it is served from the installed ``tissuumaps`` package, a
dependency on PyPI whose wheel ships OpenSeadragon's build as plain files
(``tissuumaps/static/vendor/openseadragon-bin-<version>/``). The package is located without
importing it (its ``__init__`` starts a Flask app); see docs/ARCHITECTURE.md for why this
package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from slide_clip.errors import ConfigError

#: The page's own files (HTML, JS, CSS), shipped inside slide_clip.
PAGE_DIR = Path(__file__).resolve().parent / "static"

#: The PyPI package whose wheel ships OpenSeadragon.
OSD_PACKAGE = "tissuumaps"


def openseadragon_dir() -> Path:
    """The installed OpenSeadragon folder (``openseadragon.min.js`` and ``images/``).

    Raises :class:`ConfigError` in one line when the package or the file is missing.
    """
    hint = f"Reinstall slide-clip with its dependencies (pip install '{OSD_PACKAGE}>=3.2')."
    try:
        spec = importlib.util.find_spec(OSD_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the viewer needs OpenSeadragon from the {OSD_PACKAGE!r} package, which is not installed",
                          hint=hint)
    vendor = Path(next(iter(spec.submodule_search_locations))) / "static" / "vendor"
    found = sorted(vendor.glob("openseadragon-bin-*/openseadragon.min.js"))
    if not found:
        raise ConfigError(f"no openseadragon-bin-*/openseadragon.min.js in the installed {OSD_PACKAGE} package",
                          path=vendor, hint=hint)
    return found[-1].parent


def openseadragon_version(folder: Path) -> str:
    """The version from the folder name (``openseadragon-bin-4.1.0`` -> ``4.1.0``)."""
    return folder.name.rsplit("-", 1)[-1]
