"""Which slides a cohort holds: folders, files, or a CSV manifest with per-slide metadata."""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from slide_clip.errors import ConfigError
from slide_clip.slide import slide_id


@dataclass(frozen=True)
class CohortSlide:
    """One slide of a cohort: its path, an optional mpp override and metadata columns."""

    path: str
    mpp: float | None = None
    patient_id: str | None = None
    metadata: dict = field(default_factory=dict)
    name: str | None = None  # the assigned slide id (unique within the output folder)

    @property
    def slide_id(self) -> str:
        return self.name or slide_id(self.path)

    def row_metadata(self) -> dict:
        """Metadata carried into the cohort table (patient_id first)."""
        out = {"patient_id": self.patient_id} if self.patient_id is not None else {}
        return {**out, **self.metadata}


def read_manifest(path: str | Path) -> list[CohortSlide]:
    """A CSV with a ``path`` column and optional ``mpp``, ``patient_id`` and any other columns.

    Relative paths are relative to the CSV's folder; other columns are kept as metadata. The
    CSV, and each path in it, may be a URL (``s3://bucket/cohort.csv``; a relative path in a
    CSV at a URL is a URL beside it).
    """
    import io

    from slide_clip.storage import objects
    from slide_clip.storage.urls import is_url, join, parent

    remote = is_url(path)
    p = str(path) if remote else Path(path)
    if not objects.exists(p) or (not remote and not p.is_file()):
        raise ConfigError("manifest not found", path=p)
    with io.StringIO(objects.read_text(p), newline="") as f:
        reader = csv.DictReader(f)
        if "path" not in (reader.fieldnames or []):
            raise ConfigError("manifest needs a 'path' column", path=p,
                              hint="Columns: path, and optionally mpp, patient_id and any metadata.")
        rows = []
        for i, row in enumerate(reader, start=2):
            raw = (row.pop("path") or "").strip()
            if not raw:
                raise ConfigError(f"line {i}: empty path", path=p)
            if is_url(raw):
                sp = raw
            elif remote and not Path(raw).is_absolute():
                sp = join(parent(p), raw)
            else:
                sp = Path(raw).expanduser()
                sp = sp if sp.is_absolute() or remote else p.parent / sp
            mpp_text = (row.pop("mpp", None) or "").strip()
            try:
                mpp = float(mpp_text) if mpp_text else None
            except ValueError:
                raise ConfigError(f"line {i}: mpp {mpp_text!r} is not a number", path=p) from None
            if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
                raise ConfigError(f"line {i}: mpp must be positive", path=p)
            patient = (row.pop("patient_id", None) or "").strip() or None
            meta = {k: v for k, v in row.items() if k}
            rows.append(CohortSlide(str(sp), mpp, patient, meta))
    return rows


def cohort_slides(inputs: list[str | Path], pattern: str | None = None, out_dir: str | Path | None = None,
                  *, allow_empty: bool = False) -> list[CohortSlide]:
    """The slides of :func:`cohort_scan` (what the scan skipped is dropped: report it)."""
    return cohort_scan(inputs, pattern, out_dir, allow_empty=allow_empty)[0]


def cohort_scan(inputs: list[str | Path], pattern: str | None = None, out_dir: str | Path | None = None,
                *, allow_empty: bool = False) -> tuple[list[CohortSlide], list]:
    """Expand files, folders (with ``pattern``) and ``.csv`` manifests into cohort slides, and
    the files and folders the scan skipped (:class:`slide_clip.scan.Skipped`, with reasons).

    Each slide gets an id unique among them and within ``out_dir``
    (:func:`slide_clip.slide_ids.assign_slide_ids`); ``out_dir`` inside an input folder is
    never searched for slides. No slide at all is a :class:`ConfigError` (saying what was
    skipped) unless ``allow_empty`` (a watched folder may be empty).
    """
    from dataclasses import replace

    from slide_clip.scan import scan_slides, skipped_line
    from slide_clip.slide_ids import assign_slide_ids

    out: list[CohortSlide] = []
    plain: list[str | Path] = []
    skipped: list = []
    for item in inputs:
        if str(item).lower().endswith(".csv"):
            out.extend(read_manifest(item))
        else:
            plain.append(item)
    if plain:
        scan = scan_slides(plain, pattern, out_dir)
        out.extend(CohortSlide(str(p)) for p in scan.slides)
        skipped = scan.skipped
    seen: set[str] = set()
    out = [c for c in out if not (c.path in seen or seen.add(c.path))]  # a slide given twice is one slide
    if not out and not allow_empty:
        what = ", ".join(map(str, inputs)) or "nothing"
        line = skipped_line(skipped)
        raise ConfigError(f"no slides found in {what}" + (f" matching {pattern!r}" if pattern else "")
                          + (f" ({line})" if line else ""),
                          hint="Check the paths (and --pattern): a folder is searched for slide files "
                               "and DICOM series.")
    ids = assign_slide_ids([c.path for c in out], out_dir)
    out = [replace(c, name=ids[c.path]) for c in out]
    _check_unique(out, None)
    return out, skipped


def _check_unique(rows: list[CohortSlide], where) -> None:
    seen: dict[str, str] = {}
    for r in rows:
        if r.slide_id in seen and seen[r.slide_id] != r.path:
            raise ConfigError(f"two slides share the id {r.slide_id!r} ({seen[r.slide_id]} and {r.path}); "
                              "their stores would collide", path=where,
                              hint="Rename one, or process them into different --out folders.")
        seen[r.slide_id] = r.path


def last_modified(path: str | Path) -> float:
    """Newest modification time (epoch s) of a slide's files: the file, a DICOM folder's
    files, and a MIRAX slide's companion folder (``slide.mrxs`` + ``slide/``). A URL's: its
    object's, or the newest of a folder's objects (the storage service's clock)."""
    from slide_clip.storage.urls import is_url

    if is_url(path):
        from slide_clip.storage.cache import SlideCache
        from slide_clip.storage.filesystems import modified_epoch

        times = [t for i in SlideCache.remote_files(str(path)).values() if (t := modified_epoch(i)) is not None]
        return max(times) if times else 0.0
    p = Path(path)
    files = [p]
    for d in (p, p.with_suffix("")):
        if d.is_dir():
            files += [f for f in d.iterdir() if f.is_file()]
    times = [f.stat().st_mtime for f in files if f.exists()]
    return max(times) if times else 0.0


def split_settled(slides: list[CohortSlide], settle_seconds: float,
                  now: float | None = None) -> tuple[list[CohortSlide], list[CohortSlide]]:
    """(ready, waiting): slides whose files changed within ``settle_seconds`` are still being
    copied in, and wait for a later run."""
    if settle_seconds <= 0:
        return list(slides), []
    now = time.time() if now is None else now
    ready, waiting = [], []
    for s in slides:
        (waiting if now - last_modified(s.path) < settle_seconds else ready).append(s)
    return ready, waiting


#: Beside the stores: which patient each slide belongs to (columns ``slide_id,patient_id``),
#: written by the cohort flow from its manifest and read by the survival models.
PATIENTS_FILE = "patients.csv"


def record_patients(out_dir: str | Path, slides: list[CohortSlide]) -> Path | None:
    """Merge the slides' patient ids into ``out/patients.csv`` (rows of other slides are kept).

    Nothing is written when no slide has a patient id. A slide given again with a new
    patient id gets the new one.
    """
    given = {s.slide_id: s.patient_id for s in slides if s.patient_id is not None}
    if not given:
        return None
    merged = {**read_patients(out_dir), **given}
    from slide_clip.storage.urls import is_url, join

    if is_url(out_dir):  # a URL: the table written whole beside the stores (never Path(url), which folds s3://)
        import io

        from slide_clip.storage.objects import write_text

        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(["slide_id", "patient_id"])
        w.writerows(sorted(merged.items()))
        return write_text(join(str(out_dir), PATIENTS_FILE), buf.getvalue())
    path = Path(out_dir) / PATIENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.part")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "patient_id"])
        w.writerows(sorted(merged.items()))
    tmp.replace(path)
    return path


def read_patients(out_dir: str | Path) -> dict[str, str]:
    """Slide id -> patient id from ``out/patients.csv`` (empty when there is none)."""
    from slide_clip.storage import objects
    from slide_clip.storage.urls import is_url, join

    remote = is_url(out_dir)
    path = join(str(out_dir), PATIENTS_FILE) if remote else Path(out_dir) / PATIENTS_FILE
    if not (objects.exists(path) if remote else path.is_file()):
        return {}
    import io

    with (io.StringIO(objects.read_text(path), newline="") if remote else open(path, newline="")) as f:
        reader = csv.DictReader(f)
        if not {"slide_id", "patient_id"} <= set(reader.fieldnames or []):
            raise ConfigError("needs columns slide_id,patient_id", path=path)
        return {r["slide_id"]: r["patient_id"] for r in reader if r.get("slide_id") and r.get("patient_id")}
