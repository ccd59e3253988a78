"""Reading the YAML files a user writes (pipeline configs, prompt sets, model registries).

A syntax error names the file, its line and column (from yaml's ``problem_mark``) and what
yaml found there, in one line; a file that is not UTF-8 text or cannot be read says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from slide_clip.errors import ConfigError


def read_yaml(path: str | Path, what: str, loader=yaml.SafeLoader) -> Any:
    """The data of the YAML file ``path`` (``what`` it is, for messages: "config", "prompt set")."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} is not UTF-8 text (byte {e.start} cannot be decoded)", path=p,
                          hint="Save it as UTF-8.") from None
    except OSError as e:
        raise ConfigError(f"{what} cannot be read ({e.strerror})", path=p) from None
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - SafeLoader or a subclass of it
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {yaml_problem(e)}", path=p,
                          hint="Fix the file at that line (indentation, a missing ':' or quote).") from None


def yaml_problem(e: yaml.YAMLError) -> str:
    """``line L, column C: <what yaml says>`` for a YAML error (1-based, as editors count)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or type(e).__name__
    context = getattr(e, "context", None)
    text = f"{problem} ({context})" if context else str(problem)
    if mark is None:
        return text
    return f"line {mark.line + 1}, column {mark.column + 1}: {text}"
