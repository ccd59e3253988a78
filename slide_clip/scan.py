"""Finding slides in folders, and saying what was left out and why.

A cohort must never shrink without a word. A folder scan returns the slides it found and
every file or folder it did not take, each with its reason:

* a file with a slide extension OpenSlide reads (``.svs``, ``.tif``, ``.ndpi``, ``.mrxs``,
  ...) is a slide; so is any other file that is a TIFF by its content (``.qptiff``,
  ``.btf``): opening it says whether it is a brightfield slide, so a multiplex ``.qptiff``
  fails with its own error instead of being passed over;
* DICOM files are grouped into series (:func:`slide_clip.slide.dicom_series`);
* formats of other scanners and microscopes that OpenSlide does not read (``.isyntax``,
  ``.vsi``, ``.lif``, ...) are skipped, with what to convert them to;
* hidden files and folders (a name starting with ``.``) are skipped;
* slide-clip's own outputs are never inputs: in an output folder (``--out``, or any
  folder holding slide-clip stores or statuses) everything slide-clip writes
  (:data:`slide_clip.output.OUTPUT_FOLDERS`, :data:`~slide_clip.output.OUTPUT_FILES`) is
  skipped as one entry per output folder;
* links to folders are not followed (they are named, so a linked cohort is not lost
  silently);
* with a ``pattern``, files that do not match it are counted, not named;
* everything else is "not a slide image".

A MIRAX slide's data folder (``scan/`` beside ``scan.mrxs``) and a Hamamatsu VMS's JPEG
files are parts of their slide: not slides, not skipped.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

#: Extensions OpenSlide reads (and plain images, which open with their own error).
SLIDE_EXTENSIONS = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
                    ".bif", ".dcm", ".czi", ".jpg", ".jpeg", ".png"}

_CONVERT = ("not a slide format slide-clip reads (OpenSlide does not): convert it to a pyramidal TIFF "
            "(QuPath, bfconvert or vips)")

#: Slide and microscopy formats OpenSlide does not read.
OTHER_FORMATS = {
    ".isyntax": "Philips iSyntax", ".vsi": "Olympus/Evident VSI", ".ets": "Olympus/Evident VSI data",
    ".lif": "Leica LIF", ".nd2": "Nikon ND2", ".kfb": "KFBio KFB", ".sdpc": "SQray SDPC", ".tmap": "UNIC TMAP",
    ".mds": "Motic MDS", ".mdsx": "Motic MDSX", ".zvi": "Zeiss ZVI", ".oir": "Olympus OIR", ".oib": "Olympus OIB",
    ".oif": "Olympus OIF", ".ims": "Imaris", ".dzi": "Deep Zoom", ".jp2": "JPEG 2000", ".heic": "HEIC",
    ".webp": "WebP", ".bmp": "BMP", ".gif": "GIF",
}

_DICOM = (".dcm", ".dicom")


@dataclass(frozen=True)
class Skipped:
    """A file or folder of the inputs that is not taken as a slide, and why."""

    path: Path
    reason: str
    folder: bool = False
    root: Path | None = None  # the input folder it was found in
    files: int = 1  # files it stands for (an entry for the files not matching --pattern: their number)
    label: str | None = None  # shown instead of the path

    @property
    def shown(self) -> str:
        """Its path below its input folder (a folder ends in ``/``)."""
        if self.label:
            return self.label
        rel = os.path.relpath(self.path, self.root) if self.root is not None else str(self.path)
        return rel + "/" if self.folder else rel


@dataclass
class Scan:
    """What a scan of the inputs found: the slides, and everything it skipped."""

    slides: list[Path] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _is_tiff(file: Path) -> bool:
    try:
        with open(file, "rb") as f:
            return f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    except OSError:
        return False


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def scan_slides(inputs: list[str | Path], pattern: str | None = None, out_dir: str | Path | None = None) -> Scan:
    """Expand files and folders into slides (each folder's slides sorted) and skipped entries.

    Files given by name are taken as they are. Folders are searched recursively (see the
    module text for what is taken and what is skipped). DICOM files are grouped by series
    (SeriesInstanceUID) per folder: a folder holding exactly one series and no other slide
    is that slide (the folder's path); otherwise each series is a slide of its own, given by
    its largest file (OpenSlide finds the rest of the series beside it). ``out_dir``, if
    inside a folder, is never searched for slides.
    """
    from slide_clip.output import OUTPUT_FILES, OUTPUT_FOLDERS, is_output_folder, is_store
    from slide_clip.slide import dicom_series

    from slide_clip.storage.urls import is_url

    scan = Scan()
    found: list[Path] = []
    for item in inputs:
        if is_url(item):
            found.extend(_scan_url(str(item), pattern, out_dir, scan))
            continue
        p = Path(item).expanduser()
        if not p.is_dir():
            found.append(p)
            continue
        matched = set(p.rglob(pattern)) if pattern else None
        not_matching = 0
        per_dir: dict[Path, list[Path]] = {}
        dicom_files: dict[Path, set[Path]] = {}

        def skip(path: Path, reason: str, folder: bool = False) -> None:
            scan.skipped.append(Skipped(path, reason, folder, p))

        for root, dirs, files in os.walk(p):
            here = Path(root)
            output = is_output_folder(here, out_dir)
            outputs = 0
            keep = []
            for d in sorted(dirs):
                sub = here / d
                if d.startswith("."):
                    skip(sub, "hidden folder", True)
                elif output and _matches(d, OUTPUT_FOLDERS):
                    outputs += 1
                elif sub.is_symlink():
                    skip(sub, "a link to a folder: not followed; give the folder itself as an input", True)
                elif (here / f"{d}.mrxs").is_file():
                    continue  # a MIRAX slide's data folder: part of that slide
                elif d.lower().endswith(".zarr"):
                    skip(sub, "a slide-clip store (an output, never an input)" if is_store(sub) else
                         f"a Zarr folder: {_CONVERT}", True)
                else:
                    keep.append(d)
            dirs[:] = keep
            vms = any(f.lower().endswith(".vms") for f in files)
            for f in sorted(files):
                path = here / f
                ext = path.suffix.lower()
                if output and _matches(f, OUTPUT_FILES):
                    outputs += 1
                elif f.startswith("."):
                    skip(path, "hidden file")
                elif matched is not None and path not in matched:
                    not_matching += 1
                elif ext in _DICOM:
                    dicom_files.setdefault(here, set()).add(path)
                elif vms and ext in (".jpg", ".jpeg", ".opt"):
                    continue  # a Hamamatsu VMS slide's image files: part of that slide
                elif matched is not None or ext in SLIDE_EXTENSIONS:
                    per_dir.setdefault(here, []).append(path)
                elif ext in OTHER_FORMATS:
                    skip(path, f"{OTHER_FORMATS[ext]}: {_CONVERT}")
                elif _is_tiff(path):
                    per_dir.setdefault(here, []).append(path)  # a TIFF by its content (.qptiff, .btf)
                else:
                    skip(path, "not a slide image")
            if outputs:
                skip(here, f"slide-clip's own output folder: {outputs} of its outputs", True)
        if not_matching:
            scan.skipped.append(Skipped(p, f"not matching --pattern {pattern!r}", False, p, not_matching,
                                        f"{not_matching} file{'s' * (not_matching != 1)}"))
        for d in sorted(set(per_dir) | set(dicom_files)):
            others = per_dir.get(d, [])
            series = {}
            if d in dicom_files:
                series = {k: v for k, v in ((k, [f for f in v if f in dicom_files[d]])
                                            for k, v in dicom_series(d).items()) if v}
            slides = list(others)
            if len(series) == 1 and not others:
                slides.append(d)
            else:
                slides += [max(files, key=lambda f: (f.stat().st_size, f.name)) for files in series.values()]
            found.extend(sorted(slides))
    seen: set[str] = set()
    for f in found:
        key = str(f) if is_url(f) else os.path.abspath(f)
        if key not in seen:
            seen.add(key)
            scan.slides.append(f)
    return scan


def _scan_url(url: str, pattern: str | None, out_dir, scan: Scan) -> list[str]:
    """The slides below a folder URL (a prefix of objects, listed through fsspec), by the local
    rules: slide extensions (a file of another extension by its TIFF signature), hidden entries,
    stores and slide-clip's output folders skipped, other formats named. A folder of DICOM files
    and no other slide is one slide (its URL, ending in ``/``); its series are not told apart
    (the files are not read to list). A URL that is an object is a slide given by name."""
    from slide_clip.output import OUTPUT_FILES, OUTPUT_FOLDERS
    from slide_clip.storage.failures import remote_errors
    from slide_clip.storage.filesystems import filesystem
    from slide_clip.storage.urls import join

    fs, root = filesystem(url)
    root = root.rstrip("/")
    with remote_errors(url, "list"):
        fs.invalidate_cache(root)  # a fresh listing: slides are added by other processes
        if not fs.isdir(root):
            return [url]
        keys = sorted(fs.find(root))
    base = url.rstrip("/")
    out = str(out_dir).rstrip("/") if out_dir is not None else None
    key_of = {k[len(root) + 1:]: k for k in keys if k.startswith(root + "/")}  # relative name -> object key
    rels = list(key_of)
    # folders holding slide-clip's outputs: a status/*.json or a <slide>.zarr/zarr.json in them
    output_dirs = {r.rsplit("/", 2)[0] if r.count("/") >= 2 else "" for r in rels
                   if (r.endswith(".json") and r.rsplit("/", 2)[-2:-1] == ["status"])
                   or (r.endswith(".zarr/zarr.json") and r.count("/") >= 1)}
    rel_set = set(rels)
    skipped_folders: set[str] = set()
    slides: list[str] = []
    dicom_dirs: dict[str, list[str]] = {}
    not_matching = 0

    def skip_folder(rel: str, reason: str) -> None:
        if rel not in skipped_folders:
            skipped_folders.add(rel)
            scan.skipped.append(Skipped(join(base, rel), reason, True, base))

    for rel in rels:
        parts = rel.split("/")
        full = join(base, rel)
        where = "/".join(parts[:-1])
        if out is not None and (full == out or full.startswith(out + "/")):
            skip_folder(rel[: len(out) - len(base) - 1] if out != base else rel, "the output folder (--out)")
            continue
        owner = next((i for i in range(len(parts)) if "/".join(parts[:i]) in output_dirs
                      and (_matches(parts[i], OUTPUT_FOLDERS) if i < len(parts) - 1
                           else _matches(parts[i], OUTPUT_FILES))), None)
        if owner is not None:
            skip_folder("/".join(parts[:owner]) or ".", "slide-clip's own output folder")
            continue
        hidden = next((i for i, x in enumerate(parts) if x.startswith(".")), None)
        if hidden is not None:
            if hidden == len(parts) - 1:
                scan.skipped.append(Skipped(full, "hidden file", False, base))
            else:
                skip_folder("/".join(parts[: hidden + 1]), "hidden folder")
            continue
        store = next((i for i, x in enumerate(parts[:-1]) if x.lower().endswith(".zarr")), None)
        if store is not None:
            skip_folder("/".join(parts[: store + 1]), "a Zarr folder (a slide-clip store is an output, never an input)")
            continue
        name = parts[-1]
        ext = os.path.splitext(name)[1].lower()
        if any("/".join([*parts[:i], parts[i] + ".mrxs"]) in rel_set for i in range(len(parts) - 1)):
            continue  # a MIRAX slide's data folder: part of that slide
        if pattern and not fnmatch.fnmatchcase(name, pattern):
            not_matching += 1
        elif ext in _DICOM:
            dicom_dirs.setdefault(where, []).append(full)
        elif pattern or ext in SLIDE_EXTENSIONS:
            slides.append(full)
        elif ext in OTHER_FORMATS:
            scan.skipped.append(Skipped(full, f"{OTHER_FORMATS[ext]}: {_CONVERT}", False, base))
        else:
            with remote_errors(full):
                head = fs.cat_file(key_of[rel], start=0, end=4)
            if head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
                slides.append(full)
            else:
                scan.skipped.append(Skipped(full, "not a slide image", False, base))
    if not_matching:
        scan.skipped.append(Skipped(base, f"not matching --pattern {pattern!r}", False, base, not_matching,
                                    f"{not_matching} file{'s' * (not_matching != 1)}"))
    slide_dirs = {s.rsplit("/", 1)[0] for s in slides}
    for where, files in sorted(dicom_dirs.items()):
        folder = join(base, where) if where else base
        if folder in slide_dirs:  # beside other slides: each file is given (OpenSlide finds its series)
            slides.extend(files)
        else:
            slides.append(folder + "/")
    return sorted(slides)


def find_slides(inputs: list[str | Path], pattern: str | None = None, out_dir: str | Path | None = None) -> list[Path]:
    """The slides of :func:`scan_slides` (what it skipped is dropped: report it where a user sees it)."""
    return scan_slides(inputs, pattern, out_dir).slides


#: Skipped entries named in the one-line notice; the rest are counted (and listed in the file).
SHOWN_SKIPPED = 8

#: Beside the stores: every file or folder the last scan skipped (columns ``path,reason``).
SKIPPED_FILE = "skipped-files.csv"


def skipped_line(skipped: list[Skipped], full_list: str | Path | None = None, limit: int = SHOWN_SKIPPED) -> str | None:
    """One line naming what a scan skipped, with the reasons; None when nothing was skipped.

    ``skipped 3 files in /data/slides: a.vsi (Olympus/Evident VSI: not a slide format ...),
    .DS_Store (hidden file), notes.txt (not a slide image)``; past ``limit`` entries, the
    count of the rest and ``full_list`` (where all of them are written).
    """
    if not skipped:
        return None
    from slide_clip.errors import shown_path

    roots = {s.root for s in skipped if s.root is not None}
    where = f" in {shown_path(next(iter(roots)))}" if len(roots) == 1 else ""
    n_folders = sum(s.folder for s in skipped)
    n_files = sum(s.files for s in skipped if not s.folder)
    counts = " and ".join(x for x in (f"{n_files} file{'s' * (n_files != 1)}" if n_files else "",
                                      f"{n_folders} folder{'s' * (n_folders != 1)}" if n_folders else "") if x)
    named = [f"{s.shown if len(roots) == 1 else shown_path(s.path)} ({s.reason})" for s in skipped[:limit]]
    rest = len(skipped) - len(named)
    tail = ""
    if rest:
        tail = f", and {rest} more" + (f" (all listed in {shown_path(full_list)})" if full_list else "")
    return f"skipped {counts}{where}: {', '.join(named)}{tail}"


def write_skipped(out_dir: str | Path, skipped: list[Skipped]) -> Path | None:
    """Write ``out/skipped-files.csv`` (absolute path, reason) for this run's scan, or remove
    an earlier run's when nothing was skipped; returns the file written."""
    import csv

    from slide_clip.errors import shown_path
    from slide_clip.output import output_errors

    from slide_clip.storage import objects
    from slide_clip.storage.filesystems import upath

    path = upath(out_dir) / SKIPPED_FILE
    with output_errors(path):
        if not skipped:
            objects.remove(path)
            return None
        with objects.replace_file(path) as tmp, open(tmp, "w", newline="") as f:  # whole, or the old list
            w = csv.writer(f)
            w.writerow(["path", "reason"])
            w.writerows([shown_path(s.path) + ("/" if s.folder else ""),
                         s.reason if s.label is None else f"{s.label} {s.reason}"] for s in skipped)
    return path


def record_skipped(out_dir: str | Path, skipped: list[Skipped]) -> tuple[str | None, Path | None]:
    """Write ``out/skipped-files.csv`` and return (the one-line notice, the file written).

    A disk that cannot take the list (full, read-only) does not stop the run: the slides
    meet that disk with their own errors; the notice says the list was not written.
    """
    from slide_clip.errors import OutputError

    try:
        written = write_skipped(out_dir, skipped)
    except OutputError as e:
        line = skipped_line(skipped)
        return (f"{line} (the full list was not written: {e})" if line else None), None
    return skipped_line(skipped, written), written

