"""Prompt sets: classes with synonyms and sentence templates, kept as data in ``configs/prompts/``.

::

    name: tumour
    templates: ["an H&E image of {}.", "a histopathology image showing {}."]
    classes:
      - name: tumour
        synonyms: [tumor tissue, carcinoma]
      - name: non-tumour
        synonyms: [normal tissue, benign tissue]

Natural sentences beat bare words, and averaging over several templates and synonyms beats
either alone (CONCH / MI-Zero practice).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from slide_clip.errors import ConfigError
from slide_clip.resources import config_file
from slide_clip.yaml_files import read_yaml

PROMPTS_DIR = config_file("prompts")


def _check_template(t: str) -> None:
    """A template has exactly one empty ``{}`` slot and no other format field (``{{`` is a brace)."""
    import string

    bad = ValueError(f"template {t!r} must have exactly one '{{}}' slot for the class name and no other "
                     "'{...}' field (write a literal brace as '{{' or '}}')")
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(t) if f is not None
                  for f in [(f, spec, conv)]]
    except ValueError:
        raise bad from None  # an unmatched brace
    if len(fields) != 1 or fields[0] != ("", "", None):
        raise bad


class PromptClass(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    synonyms: tuple[str, ...]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("a class has an empty name")
        return v.strip()

    @model_validator(mode="after")
    def _synonyms(self):
        syn = [s.strip() for s in self.synonyms]
        if not syn or not all(syn):
            raise ValueError(f"class {self.name!r} has no synonyms (or an empty one)")
        return self


class PromptSet(BaseModel):
    """Classes, each with synonyms, and templates with one ``{}`` slot."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    templates: tuple[str, ...]
    classes: tuple[PromptClass, ...]

    @model_validator(mode="after")
    def _check(self):
        if not self.name.strip() or any(c in self.name for c in "/\\:"):
            raise ValueError("the set needs a 'name' without '/', '\\' or ':'")
        if not self.templates:
            raise ValueError("the set has no templates")
        for t in self.templates:
            _check_template(t)
        if len(self.classes) < 2:
            raise ValueError("the set needs at least two classes")
        names = [c.name for c in self.classes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate class {dupes[0]!r}")
        from slide_clip.aggregate import column_key

        keys: dict[str, str] = {}
        for n in names:  # each class gets its own table columns (mean_prob__<class>, ...)
            if column_key(n) in keys:
                raise ValueError(f"classes {keys[column_key(n)]!r} and {n!r} would share the table column name "
                                 f"{column_key(n)!r}: rename one")
            keys[column_key(n)] = n
        return self

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def texts(self, cls: PromptClass) -> list[str]:
        """Every template filled with every synonym of ``cls``."""
        return [t.format(s) for s in cls.synonyms for t in self.templates]

    @property
    def hash(self) -> str:
        """sha256 of what decides the text embeddings (templates, classes, synonyms)."""
        canon = json.dumps({"templates": list(self.templates),
                            "classes": [[c.name, list(c.synonyms)] for c in self.classes]},
                           sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canon.encode()).hexdigest()


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _no_duplicate_keys(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def resolve_prompts_path(name_or_path: str | Path) -> Path:
    """A path, or the name of a set shipped in ``configs/prompts/`` (``tumour``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = PROMPTS_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(f.stem for f in PROMPTS_DIR.glob("*.yaml")))
    raise ConfigError("prompt set not found", path=p, hint=f"Give a YAML file, or one of: {known}.")


def load_prompts(name_or_path: str | Path) -> PromptSet:
    """Read and validate a prompt set; errors name the file and the problem."""
    p = resolve_prompts_path(name_or_path)
    try:
        data = read_yaml(p, "prompt set", _UniqueKeyLoader)
    except ConfigError as e:
        if e.path is not None:  # already names the file (a syntax error, an unreadable file)
            raise
        raise ConfigError(f"invalid prompt set: {e}", path=p) from None
    if not isinstance(data, dict):
        raise ConfigError("prompt set must be a mapping with name, templates and classes", path=p)
    try:
        return PromptSet.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"invalid prompt set: {where + ': ' if where else ''}{msg}", path=p) from None
