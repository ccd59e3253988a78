"""Which stores are a cohort's slides, and whose they are.

A cohort lists its slides in a manifest (``--manifest``: ``path`` and ``patient_id``), or in
``out/patients.csv`` (``slide_id,patient_id``, recorded by the cohort flow). A manifest row is
matched to a store the way the pipeline names stores (:func:`slide_clip.slide_ids.assign_slide_ids`:
a file keeps the id of the store made from it; slides sharing a file name are named by their
folders, ``a__x``), and the store must hold that file: its recorded path is the row's path,
or (a moved folder) its recorded fingerprint is the row's file's. Never by file name alone:
``a/x.tif`` and ``b/x.tif`` are two slides.

Every listed slide must have a complete store: one without (not embedded, embedding failed,
partial) stops the run naming it, unless the caller allows dropping, and then it is listed
in :attr:`Listing.dropped`. A store nobody lists is its own patient (patient id = slide id)
unless ``out/status/<slide>.json`` carries a ``patient_id``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from slide_clip.errors import ConfigError, SlideClipError
from slide_clip.storage import objects
from slide_clip.storage.filesystems import upath
from slide_clip.storage.urls import absolute, is_url


@dataclass(frozen=True)
class Listed:
    """One slide a listing names: ``given`` is the manifest's path (or the slide id of
    patients.csv), ``slide_id`` the store id it has in the output folder."""

    given: str
    slide_id: str
    patient_id: str | None
    source: str
    by_path: bool = True  # a manifest row names a file (checked against the store); patients.csv names the id


@dataclass
class Listing:
    """The listed slides of a cohort folder, matched to its stores.

    ``patients``: slide id -> patient id of every store (listed or not); ``dropped``: listed
    slides without a complete store (``{"slide", "slide_id", "source", "reason"}``), each a
    reason it cannot be used.
    """

    listed: list[Listed]
    patients: dict[str, str] = field(default_factory=dict)
    dropped: list[dict] = field(default_factory=list)


def _abs(p: str | Path) -> str:
    return absolute(p)


def _store_header(path: Path) -> dict:
    """The store's recorded slide (``path``, ``fingerprint``, ``name``) read from its zarr.json."""
    try:
        return dict(json.loads((path / "zarr.json").read_text())["attributes"]["slide"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _status(out: Path, sid: str) -> dict:
    try:
        return json.loads((out / "status" / f"{sid}.json").read_text())
    except (OSError, ValueError):
        return {}


def _why_no_store(out: Path, sid: str) -> str:
    st = _status(out, sid)
    if st.get("status") == "failed":
        return f"no store: its embedding failed ({st.get('error') or 'see out/status/' + sid + '.json'})"
    return f"no store {sid}.zarr in {out}"


def _manifest_rows(out: Path, manifest: Path) -> list[Listed]:
    from slide_clip.manifest import read_manifest
    from slide_clip.slide_ids import assign_slide_ids

    rows = read_manifest(manifest)
    ids = assign_slide_ids([r.path for r in rows], out)
    return [Listed(r.path, ids[r.path], r.patient_id, str(manifest)) for r in rows]


def _recorded_rows(out: Path) -> list[Listed]:
    from slide_clip.manifest import PATIENTS_FILE, read_patients

    return [Listed(sid, sid, pid, str(out / PATIENTS_FILE), by_path=False)
            for sid, pid in sorted(read_patients(out).items())]


def _same_slide(row: Listed, store: Path) -> str | None:
    """None if ``store`` holds the row's file; else why not."""
    from slide_clip.slide import slide_info

    rec = _store_header(store)
    recorded = str(rec.get("path") or "")
    if recorded and _abs(recorded) == _abs(row.given):
        return None
    if not (objects.exists(row.given) if is_url(row.given) else Path(row.given).exists()):
        return (f"store {store.name} was made from {recorded or 'an unrecorded file'}, and {row.given} is not there "
                "to compare fingerprints")
    try:
        fp = slide_info(row.given).fingerprint
    except SlideClipError as e:
        return f"cannot be opened to compare it with store {store.name} ({e})"
    if fp == rec.get("fingerprint"):
        return None  # the same pixels at another path (a moved or copied folder)
    return f"store {store.name} holds another slide ({recorded})"


def list_slides(out: str | Path, stores: dict[str, Path], manifest: str | Path | None = None) -> Listing:
    """Match the cohort's listed slides to ``stores`` (slide id -> store path).

    Listed slides: the manifest's rows when one is given, else ``out/patients.csv``. Patients
    of stores nobody lists come from ``out/patients.csv``, then ``out/status/<slide>.json``
    metadata, else the slide is its own patient.
    """
    from slide_clip.manifest import read_patients

    out = upath(out)  # a Path, or a UPath for a URL (never Path(url))
    listed = _manifest_rows(out, upath(manifest)) if manifest else _recorded_rows(out)
    result = Listing(listed)
    seen: dict[str, Listed] = {}
    for row in listed:
        store = stores.get(row.slide_id)
        if store is None:
            reason = _why_no_store(out, row.slide_id)
        else:
            reason = _same_slide(row, store) if row.by_path else None
        if row.slide_id in seen and reason is None:
            raise ConfigError(f"lists {seen[row.slide_id].given} and {row.given}, which are one slide (store "
                              f"{row.slide_id})", path=row.source, hint="List each slide once.")
        seen[row.slide_id] = row
        if reason is not None:
            result.dropped.append({"slide": row.given, "slide_id": row.slide_id, "source": row.source,
                                   "reason": reason})
        elif row.patient_id is not None:
            result.patients[row.slide_id] = row.patient_id
    fallbacks = [read_patients(out), _status_patients(out)] if manifest else [_status_patients(out)]
    for sid in stores:
        if sid in result.patients:
            continue
        result.patients[sid] = next((src[sid] for src in fallbacks if sid in src), sid)
    result.patients = dict(sorted(result.patients.items()))
    return result


def _status_patients(out: Path) -> dict[str, str]:
    found = {}
    d = out / "status"
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            st = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        pid = ((st.get("extra") or {}).get("metadata") or {}).get("patient_id")
        if pid not in (None, ""):
            found[str(st.get("name") or f.stem)] = str(pid)
    return found


def missing_error(dropped: list[dict]) -> ConfigError:
    """The one-line error for listed slides without a complete store."""
    d = dropped[0]
    more = f" ({len(dropped)} listed slides cannot be used)" if len(dropped) > 1 else ""
    return ConfigError(f"slide {d['slide']} cannot be used: {d['reason']}{more}", path=d["source"],
                       hint="Embed it (`slide-clip embed`), remove it from the list, or pass --allow-missing to "
                            "leave such slides out (the report then lists them).")
