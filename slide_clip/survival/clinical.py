"""Clinical tables and the slide-to-patient map of a cohort.

A clinical table (CSV or Parquet) has one row per patient: ``patient_id``, a follow-up time
column, an event column (0/1 or booleans) and optional covariates. Slides reach patients
through the manifest's ``patient_id``, recorded beside the stores in ``out/patients.csv`` by
the cohort flow (see :func:`slide_clip.manifest.record_patients`), or given here as a
manifest CSV; a slide without one is its own patient (patient id = slide id).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from slide_clip.errors import ConfigError

_TRUE = {"1", "1.0", "true", "yes"}
_FALSE = {"0", "0.0", "false", "no"}


@dataclass(frozen=True)
class Clinical:
    """A validated clinical table.

    Attributes
    ----------
    table : pandas.DataFrame
        Indexed by ``patient_id`` (str), with float ``time`` and int ``event`` (1 = the event
        was observed, 0 = censored) and the covariate columns, sorted by patient.
    source : str
        The file it was read from.
    time_column, event_column : str
        The names of those columns in the file.
    """

    table: pd.DataFrame
    source: str
    time_column: str
    event_column: str

    @property
    def patients(self) -> list[str]:
        return list(self.table.index)

    @property
    def covariates(self) -> list[str]:
        return [c for c in self.table.columns if c not in ("time", "event")]


def _read_table(p: Path) -> pd.DataFrame:
    if not p.is_file():
        raise ConfigError("clinical table not found", path=p, hint="Give a CSV or Parquet file with patient_id, "
                          "a time and an event column.")
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(p)
        return pd.read_csv(p, dtype={"patient_id": str}, keep_default_na=True)
    except Exception as e:  # noqa: BLE001 - any parser error is the user's file
        raise ConfigError(f"cannot be read as a table ({type(e).__name__}: {e})", path=p) from None


def _events(values: pd.Series, p: Path, column: str) -> np.ndarray:
    out = np.empty(len(values), np.int64)
    for i, (pid, v) in enumerate(values.items()):
        text = str(v).strip().lower()
        if isinstance(v, (bool, np.bool_)):
            out[i] = int(v)
        elif text in _TRUE:
            out[i] = 1
        elif text in _FALSE:
            out[i] = 0
        else:
            raise ConfigError(f"patient {pid!r}: event {column!r} is {v!r}; events must be 0/1 or true/false",
                              path=p, hint="Code an observed event as 1 and a censored follow-up as 0.")
    return out


def read_clinical(path: str | Path, time: str, event: str) -> Clinical:
    """Read and check a clinical table.

    Parameters
    ----------
    path : str or Path
        CSV or Parquet file with a ``patient_id`` column.
    time : str
        Column of follow-up times (any unit, e.g. months); must be finite and >= 0.
    event : str
        Column of event indicators: 0/1, booleans, or the strings true/false.

    Raises
    ------
    ConfigError
        A missing column, a duplicated or empty patient id, a missing or negative time, an
        event value other than 0/1 or a boolean, or no event at all: one line naming the file.
    """
    p = Path(path)
    df = _read_table(p)
    for col, what in (("patient_id", "patient id"), (time, "time"), (event, "event")):
        if col not in df.columns:
            raise ConfigError(f"has no {what} column {col!r} (columns: {', '.join(map(str, df.columns))})", path=p,
                              hint="Name the columns with --time and --event; patients are in 'patient_id'.")
    ids = df["patient_id"].astype("string").str.strip()
    if ids.isna().any() or (ids == "").any():
        line = int(np.flatnonzero((ids.isna() | (ids == "")).to_numpy())[0]) + 2
        raise ConfigError(f"row {line}: empty patient_id", path=p)
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise ConfigError(f"patient {dup[0]!r} has {int((ids == dup[0]).sum())} rows ({len(dup)} duplicated "
                          "patients)", path=p, hint="Keep one row per patient.")
    df = df.assign(patient_id=ids.astype(str)).set_index("patient_id")
    times = pd.to_numeric(df[time], errors="coerce")
    bad = times.isna() | ~np.isfinite(times.astype(float)) | (times < 0)
    if bad.any():
        pid = bad[bad].index[0]
        raise ConfigError(f"patient {pid!r}: time {time!r} is {df.loc[pid, time]}; times must be numbers >= 0",
                          path=p, hint="Fill in the follow-up time of every patient, or drop the row.")
    ev = df[event]
    if ev.isna().any():
        pid = ev[ev.isna()].index[0]
        raise ConfigError(f"patient {pid!r}: event {event!r} is missing", path=p)
    events = _events(ev, p, event)
    if events.sum() == 0:
        raise ConfigError(f"no patient has an event ({event!r} is 0 everywhere): no survival model can be fitted",
                          path=p)
    cov = df.drop(columns=[time, event])
    table = pd.concat([pd.DataFrame({"time": times.astype(float), "event": events}, index=df.index), cov], axis=1)
    table.index.name = "patient_id"
    return Clinical(table.sort_index(), str(p), time, event)


# ----------------------------------------------------------------------------- slides to patients
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


def _manifest_patients(manifest: Path) -> dict[str, str]:
    from slide_clip.manifest import read_manifest

    return {s.slide_id: s.patient_id for s in read_manifest(manifest) if s.patient_id is not None}


def slide_patients(out: str | Path, slide_ids: list[str], manifest: str | Path | None = None) -> dict[str, str]:
    """The patient of each slide.

    Looked up, first match wins, in: ``manifest`` (a cohort CSV with ``path`` and
    ``patient_id``), ``out/patients.csv`` (written by the cohort flow), the ``metadata`` of
    ``out/status/<slide>.json``; a slide found in none is its own patient.
    """
    from slide_clip.manifest import read_patients

    out = Path(out)
    sources = [_manifest_patients(Path(manifest))] if manifest else []
    sources += [read_patients(out), _status_patients(out)]
    mapping = {}
    for sid in slide_ids:
        mapping[sid] = next((src[sid] for src in sources if sid in src), sid)
    return mapping


def join_cohort(clinical: Clinical, patients_of: dict[str, str]) -> dict[str, list[str]]:
    """Patient id -> its slide ids (sorted), checked against the clinical table.

    Raises
    ------
    ConfigError
        If a slide's patient has no clinical row, or a clinical patient has no slide.
    """
    slides: dict[str, list[str]] = {}
    for sid, pid in sorted(patients_of.items()):
        slides.setdefault(pid, []).append(sid)
    have = set(clinical.patients)
    orphans = sorted(sid for sid, pid in patients_of.items() if pid not in have)
    if orphans:
        raise ConfigError(
            f"{len(orphans)} slide(s) have no patient row in the clinical table, e.g. slide {orphans[0]!r} "
            f"(patient {patients_of[orphans[0]]!r})", path=clinical.source,
            hint="Add the patient, give slides their patient_id with a manifest (--manifest), or remove the "
                 "slide's store from the folder.")
    missing = sorted(have - set(slides))
    if missing:
        raise ConfigError(
            f"{len(missing)} patient(s) have no slide with complete embeddings, e.g. {missing[0]!r}",
            path=clinical.source,
            hint="Embed their slides (check out/status/ for failures) or drop them from the clinical table.")
    return {pid: slides[pid] for pid in sorted(slides)}
