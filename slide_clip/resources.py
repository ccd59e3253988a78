"""Where the shipped configuration lives: the ``slide_clip_configs`` package data.

The repo keeps it in ``configs/`` at the top; an installed wheel carries it as the package
``slide_clip_configs``, so a non-editable install finds its defaults, model registry and
prompt sets from any working folder. A user's own files, given by path, always win.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def configs_dir() -> Path:
    """The folder of the shipped configs (``default.yaml``, ``models.yaml``, ``prompts/``)."""
    return Path(str(files("slide_clip_configs")))


def config_file(*parts: str) -> Path:
    """A shipped config file, e.g. ``config_file("prompts", "tumour.yaml")``."""
    return configs_dir().joinpath(*parts)
