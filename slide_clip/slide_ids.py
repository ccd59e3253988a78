"""Slide ids: unique within an output folder, derived from where each slide lives.

A slide's id names its store (``<out>/<id>.zarr``), its status file and its row in the
cohort table, so two slides must never share one. A slide's id is its file name without
the extension (a DICOM series folder's name); slides of one run that share a name are
named by their path below the deepest folder holding all of them, with the folder
separators written as ``__``::

    slides/x.svs, other/y.svs           ->  x, y
    slides/a/x.svs, slides/b/x.svs      ->  a__x, b__x
    slides/case7/ (one DICOM series)    ->  case7
    slides/mixed/1.2.3.dcm (a series among others in the folder)  ->  1.2.3

Within an output folder an id is never given to a second file: if ``out`` already holds a
store made from this file, the slide keeps that store's id (so giving the same slides in
another way does not duplicate them); if the id is held by another file that still exists
(a store or status of an earlier run, or another slide of this run), parent folder names
are prepended (``b__x``), or for a file in the same folder the name with its extension is
used (``x.tif`` beside ``x.svs``), and a short hash of the full path as a last resort.
Characters other than letters, digits (any script), ``-``, ``_``, ``.`` and spaces are
replaced by ``_``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

from slide_clip.storage.urls import absolute, is_url

from slide_clip.slide import slide_id

SEPARATOR = "__"


def _abs(p: str | Path) -> str:
    return absolute(p)


def _as_path(a: str) -> Path | PurePosixPath:
    """A slide's absolute path or URL as a path for the naming rule: a URL's scheme and bucket
    are its top folders (``s3://b/x/y.svs`` -> ``/s3:/b/x/y.svs``), so ids are made alike."""
    if not is_url(a):
        return Path(a)
    scheme, _, rest = a.rstrip("/").partition("://")
    return PurePosixPath("/", f"{scheme}:", *[x for x in rest.split("/") if x])


def _exists(a: str) -> bool:
    from slide_clip.storage.objects import exists

    return exists(a)


def _clean(text: str) -> str:
    out = "".join(c if (c.isalnum() or c in "-_. ") else "_" for c in text).strip()
    return out.lstrip(".") or "slide"


def _parts(path: Path, root: Path) -> list[str]:
    """The path's folders below ``root`` and its own name (extension dropped), in order."""
    rel = path.relative_to(root) if path != root else Path(path.name)
    folders = list(rel.parts[:-1])
    return [_clean(x) for x in folders] + [_clean(slide_id(path))]


def _common_root(paths: list[Path]) -> Path:
    parents = [str(p.parent) for p in paths]
    return type(paths[0])(os.path.commonpath(parents)) if parents else Path("/")


def existing_owners(out_dir: str | Path | None) -> dict[str, str]:
    """``{slide id: absolute path of its slide}`` of the stores (and recorded statuses) in ``out_dir``."""
    from slide_clip.storage.filesystems import upath

    owners: dict[str, str] = {}
    if out_dir is None or not upath(out_dir).is_dir():
        return owners
    out = upath(out_dir)
    status = out / "status"
    if status.is_dir():
        for f in status.glob("*.json"):
            try:
                st = json.loads(f.read_text())
                owners[f.stem] = str(st.get("path") or _abs(st["slide"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    for z in out.glob("*.zarr/zarr.json"):
        try:
            owners[z.parent.name[: -len(".zarr")]] = str(json.loads(z.read_text())["attributes"]["slide"]["path"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return owners


def assign_slide_ids(slides: list[str | Path], out_dir: str | Path | None = None) -> dict[str, str]:
    """``{slide path as given: id}``, unique among ``slides`` and within ``out_dir``.

    See the module docstring for the rule. Deterministic for a given list and output folder.
    """
    absolute = [_as_path(_abs(s)) for s in slides]
    text = {a: _abs(s) for s, a in zip(slides, absolute)}  # each path's own text (a URL as given)
    owners = existing_owners(out_dir)
    by_owner = {v: k for k, v in owners.items()}
    taken: dict[str, str] = {}  # id -> absolute slide path, in this run
    result: dict[str, str] = {}

    def holder(candidate: str, me: str) -> str | None:
        """Who else holds ``candidate`` (a slide of this run, or an existing file's store)."""
        if candidate in taken and taken[candidate] != me:
            return taken[candidate]
        owner = owners.get(candidate)
        return owner if owner is not None and owner != me and _exists(owner) else None

    # slides whose store already exists keep their id
    for given, a in zip(slides, absolute):
        sid = by_owner.get(text[a])
        if sid is not None and sid not in taken:
            taken[sid] = text[a]
            result[str(given)] = sid
    # slides sharing a name in this run are named by their path below their common folder
    names: dict[str, list[Path]] = {}
    for given, a in zip(slides, absolute):
        if str(given) not in result:
            names.setdefault(_clean(slide_id(a)), []).append(a)
    for given, a in zip(slides, absolute):
        if str(given) in result:
            continue
        group = names[_clean(slide_id(a))]
        parts = _parts(a, _common_root(group)) if len(group) > 1 else [_clean(slide_id(a))]
        first = SEPARATOR.join(parts)
        with_ext = SEPARATOR.join(parts[:-1] + [_clean(a.name)])
        above = [_clean(x) for x in reversed(a.parent.parts[1:])]  # parent folders, nearest first
        prefixed = [SEPARATOR.join(list(reversed(above[:k])) + [_clean(slide_id(a))])
                    for k in range(1, len(above) + 1)]
        prefixed = [c for c in prefixed if len(c) > len(first)]
        other = holder(first, text[a])
        same_folder = other is not None and _as_path(other).parent == a.parent
        candidates = [first] + ([with_ext] + prefixed if same_folder else prefixed + [with_ext])
        digest = hashlib.sha1(text[a].encode()).hexdigest()[:8]
        sid = next((c for c in candidates if holder(c, text[a]) is None), f"{first}-{digest}")
        taken[sid] = text[a]
        result[str(given)] = sid
    return result
