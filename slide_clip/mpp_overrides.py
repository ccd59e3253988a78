"""Resolution overrides: ``--mpp`` for every slide, ``--mpp-csv`` per slide.

An override replaces a slide's own metadata, so a wrong one silently gives wrong tiles:
every value must be a finite positive number in the range of a scan, checked before any
slide is read, and every row of a ``--mpp-csv`` must name exactly one slide of the run.

A row's ``slide`` matches a slide when it is the slide's path (as given, or the same file:
a relative path is taken from the working folder or from the CSV's folder), its file name
(``x.svs``), its name without the extension (``x``) or the id the run assigned to it
(``a__x``; see :mod:`slide_clip.slide_ids`). Errors, each naming the CSV and its line:

* a row that matches no slide of the run (a typo), unless it is the path of an existing
  file (a CSV of a larger cohort may list slides this run does not process by path);
* a row that matches several slides (``x.svs`` when ``a/x.svs`` and ``b/x.svs`` are both in
  the run): give the path or the assigned id;
* two rows that give one slide different values. Rows that give it the same value (the same
  line twice, or its path and its name) are accepted: they do not disagree.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from slide_clip.errors import ConfigError


def check_mpp_value(value: float | None, what: str = "--mpp") -> float | None:
    """``value`` if it is a possible scan resolution (finite, positive, within ``MPP_RANGE``)."""
    from slide_clip.slide import MPP_RANGE

    if value is None:
        return None
    lo, hi = MPP_RANGE
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{what} {value:g}: must be a finite positive number of µm per level-0 pixel"
                          if isinstance(value, (int, float)) else f"{what} {value!r}: must be a number",
                          hint="A slide scan is typically 0.1-1 µm/px (0.25 at 40x, 0.5 at 20x).")
    if not lo <= value <= hi:
        raise ConfigError(f"{what} {value:g}: outside {lo:g}-{hi:g} µm per level-0 pixel, impossible for a "
                          "slide scan", hint="A slide scan is typically 0.1-1 µm/px (0.25 at 40x, 0.5 at 20x).")
    return float(value)


@dataclass(frozen=True)
class MppRow:
    line: int  # in the CSV, 1-based (the header is line 1)
    slide: str
    mpp: float


@dataclass(frozen=True)
class MppTable:
    """The rows of an ``--mpp-csv`` file (see the module text), checked but not yet matched."""

    path: str
    rows: tuple[MppRow, ...]

    def match(self, slides: list[tuple[str | Path, str | None]]) -> dict[str, float]:
        """``{slide path as given: mpp}`` for the run's ``(path, assigned id)`` pairs.

        Raises :class:`ConfigError` for a row matching no slide or several, and for a slide
        given two different values (see the module text).
        """
        from slide_clip.slide import slide_id

        keys: dict[str, set[int]] = {}  # a name by which a row may call a slide -> slides so called
        resolved: dict[str, int] = {}
        for k, (path, assigned) in enumerate(slides):
            p = Path(path)
            for key in {str(path), p.name, slide_id(p), assigned}:
                if key:
                    keys.setdefault(key, set()).add(k)
            resolved[_abs(p)] = k
        base = Path(self.path).parent
        found: dict[int, list[MppRow]] = {}
        for row in self.rows:
            hits = set(keys.get(row.slide, ()))
            for p in _as_paths(row.slide, base):
                if p in resolved:
                    hits.add(resolved[p])
            if not hits:
                if any(Path(p).exists() for p in _as_paths(row.slide, base)):
                    continue  # a slide of the cohort that this run does not process
                raise ConfigError(
                    f"line {row.line}: {row.slide!r} matches no slide of this run",
                    path=self.path,
                    hint="Fix the name (a slide's path, file name, name without extension, or its id such as "
                         "a__x for a/x.svs), or delete the row.")
            if len(hits) > 1:
                names = ", ".join(sorted(str(slides[k][1] or slides[k][0]) for k in hits))
                raise ConfigError(f"line {row.line}: {row.slide!r} matches {len(hits)} slides ({names})",
                                  path=self.path, hint="Name each slide by its path or its id.")
            found.setdefault(hits.pop(), []).append(row)
        out = {}
        for k, rows in found.items():
            values = {r.mpp for r in rows}
            if len(values) > 1:
                a, b = rows[0], next(r for r in rows if r.mpp != rows[0].mpp)
                raise ConfigError(
                    f"lines {a.line} and {b.line} give the slide {slides[k][0]} two resolutions "
                    f"({a.mpp:g} and {b.mpp:g} µm/px)", path=self.path, hint="Keep the right one and delete the other.")
            out[str(slides[k][0])] = rows[0].mpp
        return out


def _abs(p: str | Path) -> str:
    return str(Path(p).expanduser().resolve())


def _as_paths(text: str, base: Path) -> list[str]:
    """The files a row's ``slide`` may name: from the working folder, or from the CSV's folder."""
    p = Path(text).expanduser()
    return [_abs(p)] if p.is_absolute() else [_abs(p), _abs(base / p)]


def read_mpp_csv(path: str | Path) -> MppTable:
    """Read an ``--mpp-csv`` file: columns ``slide`` and ``mpp`` (µm per level-0 pixel).

    Each value is checked here (:func:`check_mpp_value`); rows are matched to slides by
    :meth:`MppTable.match`, once the run's slides and their ids are known.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError("mpp CSV not found", path=p)
    rows = []
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"slide", "mpp"} <= set(reader.fieldnames):
                raise ConfigError(
                    "mpp CSV needs the columns 'slide' and 'mpp'", path=p, hint="Add a header row: slide,mpp")
            for row in reader:
                i = reader.line_num
                key = (row["slide"] or "").strip()
                if not key:
                    raise ConfigError(f"line {i}: empty slide", path=p)
                text = (row["mpp"] or "").strip()
                try:
                    mpp = float(text)
                except ValueError:
                    raise ConfigError(f"line {i}: mpp {text!r} is not a number", path=p) from None
                try:
                    check_mpp_value(mpp, f"line {i}: mpp")
                except ConfigError as e:
                    raise ConfigError(e.problem, path=p, hint=e.hint) from None
                rows.append(MppRow(i, key, mpp))
    except UnicodeDecodeError:
        raise ConfigError("mpp CSV is not UTF-8 text", path=p, hint="Save it as UTF-8.") from None
    return MppTable(str(p), tuple(rows))
