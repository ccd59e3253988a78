"""Slide ids: unique within an output folder, derived from where each slide lives.

A slide's id names its store (``<out>/<id>.zarr``), its status file and its row in the
cohort table, so two slides must never share one. The id is the slide's path relative to
the deepest folder that holds all the slides of a run, without the extension, with the
folder separators written as ``__``::

    slides/a/x.svs, slides/b/x.svs      ->  a__x, b__x
    slides/x.svs, slides/y.svs          ->  x, y
    slides/case7/ (one DICOM series)    ->  case7
    slides/mixed/1.2.3.dcm (a series among others in the folder)  ->  1.2.3

Within an output folder an id is never given to a second file: if ``out`` already holds a
store made from this file, the slide keeps that store's id (so giving the same slides in
another way does not duplicate them); if the derived id's store was made from another file
that still exists (or to another slide of the run), the nearest parent folder name is
prepended, then the file name with its extension is tried (``x.tif`` beside ``x.svs``),
then more parent folders, and a short hash of the full path as a last resort. Characters other than letters, digits,
``-``, ``_``, ``.``, spaces and non-ASCII letters are replaced by ``_``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from slide_clip.slide import slide_id

SEPARATOR = "__"


def _abs(p: str | Path) -> str:
    return str(Path(p).expanduser().resolve())


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
    return Path(os.path.commonpath(parents)) if parents else Path("/")


def existing_owners(out_dir: str | Path | None) -> dict[str, str]:
    """``{slide id: absolute path of its slide}`` of the stores (and recorded statuses) in ``out_dir``."""
    owners: dict[str, str] = {}
    if out_dir is None or not Path(out_dir).is_dir():
        return owners
    out = Path(out_dir)
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
    paths = [Path(s).expanduser() for s in slides]
    absolute = [Path(_abs(p)) for p in paths]
    root = _common_root(absolute)
    owners = existing_owners(out_dir)
    by_owner = {v: k for k, v in owners.items()}
    taken: dict[str, str] = {}  # id -> absolute slide path, in this run
    result: dict[str, str] = {}

    def free(candidate: str, me: str) -> bool:
        if candidate in taken and taken[candidate] != me:
            return False
        owner = owners.get(candidate)
        return owner is None or owner == me or not Path(owner).exists()

    # slides whose store already exists keep their id
    for given, a in zip(slides, absolute):
        sid = by_owner.get(str(a))
        if sid is not None and sid not in taken:
            taken[sid] = str(a)
            result[str(given)] = sid
    for given, a in zip(slides, absolute):
        if str(given) in result:
            continue
        parts = _parts(a, root)
        candidates = [SEPARATOR.join(parts)]
        extra = [_clean(x) for x in reversed(root.parts[1:])]  # folders above the common root, nearest first
        for k in range(1, len(extra) + 1):
            candidates.append(SEPARATOR.join(list(reversed(extra[:k])) + parts))
        candidates.insert(2, SEPARATOR.join(parts[:-1] + [_clean(a.name)]))  # x.tif: same stem, same folder
        digest = hashlib.sha1(str(a).encode()).hexdigest()[:8]
        candidates.append(f"{candidates[0]}-{digest}")
        sid = next((c for c in candidates if free(c, str(a))), f"{candidates[0]}-{digest}")
        taken[sid] = str(a)
        result[str(given)] = sid
    return result
