"""Clinical tables, checked, and their join with a cohort's slides.

A clinical table (CSV or Parquet) has one row per patient: ``patient_id``, a follow-up time
column, an event column (0/1 or booleans) and optional covariates. Slides reach patients
through :mod:`slide_clip.survival.patients` (the manifest's ``patient_id``, or
``out/patients.csv``); a slide without one is its own patient (patient id = slide id).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from slide_clip.errors import ConfigError
from slide_clip.storage.filesystems import upath

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


_SEPARATORS = {";": "semicolon (;)", "\t": "tab", "|": "vertical bar (|)"}


def _read_table(p: Path) -> pd.DataFrame:
    if not p.is_file():
        raise ConfigError("clinical table not found", path=p, hint="Give a CSV or Parquet file with patient_id, "
                          "a time and an event column.")
    data = io.BytesIO(p.read_bytes())  # read whole: a URL too (pandas alone would not take its storage options)
    if p.suffix.lower() in (".parquet", ".pq"):
        try:
            return pd.read_parquet(data)
        except Exception as e:  # noqa: BLE001 - any parser error is the user's file
            raise ConfigError(f"cannot be read as Parquet ({type(e).__name__}: {e})", path=p) from None
    try:
        df = pd.read_csv(data, dtype={"patient_id": str}, keep_default_na=True, encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}; Latin-1 or "
                          "another legacy encoding?)", path=p,
                          hint="Save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet) and run again.") from None
    except pd.errors.EmptyDataError:
        raise ConfigError("is empty: no header and no rows", path=p,
                          hint="Give a CSV with a header (patient_id, time, event) and one row per patient.") from None
    except Exception as e:  # noqa: BLE001 - any parser error is the user's file
        raise ConfigError(f"cannot be read as a CSV table ({type(e).__name__}: {e})", path=p) from None
    if len(df.columns) == 1:  # one column: maybe another separator than the comma
        header = str(df.columns[0])
        for sep, what in _SEPARATORS.items():
            if sep in header:
                raise ConfigError(f"is {what}-separated (its header is {header!r}); slide-clip reads comma-separated "
                                  "CSV", path=p, hint="Save it with commas between columns (or as Parquet).")
    return df


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
    p = upath(path)  # a Path, or a UPath of a URL
    df = _read_table(p)
    if df.empty:
        raise ConfigError(f"has no rows (only the header: {', '.join(map(str, df.columns))})", path=p,
                          hint="Add one row per patient.")
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
def join_cohort(clinical: Clinical, patients_of: dict[str, str], *,
                allow_missing: bool = False) -> tuple[dict[str, list[str]], list[str]]:
    """(patient id -> its slide ids (sorted), clinical patients left out), checked against
    the clinical table.

    Raises
    ------
    ConfigError
        If a slide's patient has no clinical row, or a clinical patient has no slide (unless
        ``allow_missing``: then such patients are left out and returned).
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
    if missing and not allow_missing:
        raise ConfigError(
            f"{len(missing)} patient(s) have no slide with complete embeddings, e.g. {missing[0]!r}",
            path=clinical.source,
            hint="Embed their slides (check out/status/ for failures), drop them from the clinical table, or pass "
                 "--allow-missing to leave them out (the report then lists them).")
    return {pid: slides[pid] for pid in sorted(slides)}, missing


def check_outcomes(clinical: Clinical, patients: list[str]) -> None:
    """Refuse outcomes no survival model can learn from: without a comparable pair (a patient
    with an event before another patient's time), every c-index and Cox fit is undefined."""
    t = clinical.table.loc[patients]
    time, event = t["time"].to_numpy(float), t["event"].to_numpy(bool)
    if not event.any():
        raise ConfigError(f"no patient of the cohort has an event ({clinical.event_column!r} is 0 for all "
                          f"{len(patients)}): no survival model can be fitted", path=clinical.source)
    if np.unique(time).size == 1:
        raise ConfigError(f"every patient of the cohort has the same follow-up time ({time[0]:g} in "
                          f"{clinical.time_column!r}): there is no order of events to learn", path=clinical.source,
                          hint="Check the time column (--time): it must hold each patient's own follow-up.")
    if not (time[event].min() < time.max()):
        raise ConfigError(f"no event happens before another patient's follow-up ends ({clinical.time_column!r}): "
                          "no pair of patients can be compared", path=clinical.source,
                          hint="Check the time and event columns (--time, --event).")
