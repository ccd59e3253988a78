"""The per-slide Zarr v3 store: the one place its layout is written (see docs/FORMAT.md).

::

    <slide_id>.zarr/                     group; attrs: slide_clip, slide, tiling, versions, status
      tiles/coords          (n, 2) int64    level-0 x, y of each tile's top-left corner
      tiles/grid            (n, 2) int32    grid row, col
      tiles/tissue_fraction (n,)   float32
      tissue/mask           (h, w) bool     thumbnail pixels
      tissue/thumbnail      (h, w, 3) uint8
      embeddings/<model>/               group; attrs: model provenance, status, rows_written
        features            (n, d) float32  L2-normalised, rows in tile order
      scores/<model>/<set>/             group; attrs: kind, classes, prompt_hash, logit_scale, ...
        logits              (n, c) float32  logit_scale x cosine similarity
        probs               (n, c) float32  softmax over classes
        grid                (c, rows, cols) float32  per-class probability per grid cell, NaN off tissue
        classifier          (c, d) float32  the class embeddings used (L2-normalised rows)

A store is ``created``, then ``tissue`` once its mask is written, then ``tiled`` once its
tile arrays are written; an embedding group is ``partial``
until its last row is written, then ``complete``. ``rows_written`` only grows after the
rows it counts are on disk, so a rerun resumes exactly there.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from slide_clip.config import TISSUE_ALGORITHM
from slide_clip.encoders.outputs import is_normalised
from slide_clip.errors import StoreBusyError, StoreError

FORMAT_VERSION = 1
STORE_SUFFIX = ".zarr"

STATUS_CREATED = "created"
STATUS_TISSUE = "tissue"
STATUS_TILED = "tiled"
STATUS_PARTIAL = "partial"
STATUS_COMPLETE = "complete"

#: Rows of embeddings per chunk: thousands of tiles, a few MB for a 512-d float32 model.
DEFAULT_CHUNK_ROWS = 2048

_COMPRESSORS = (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),)

_DAMAGED = "Re-embed the slide with --overwrite, or restore the store from a copy."

#: Every chunk is written, even one equal to the fill value, so a missing chunk file always
#: means damage (see :meth:`SlideStore.array`).
_WRITE_ALL = {"write_empty_chunks": True}


def store_path(out_dir: str | Path, slide_name: str) -> Path:
    return Path(out_dir) / f"{slide_name}{STORE_SUFFIX}"


def model_key(model_name: str) -> str:
    """The group name of a model (or a score set): its name with path-unsafe characters replaced."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("slide-clip", "openslide-python", "openslide-bin", "open_clip_torch", "torch", "zarr",
                "scikit-image", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    try:
        import openslide

        out["openslide"] = openslide.__library_version__
    except Exception:  # noqa: BLE001
        pass
    return out


def _lock_holder(lock: Path) -> str:
    """Who holds a lock, as recorded in it: 'pid 123 on host h since T' (or 'unknown')."""
    try:
        info = json.loads(lock.read_text() or "{}")
        return f"pid {info['pid']} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return _UNKNOWN_HOLDER


_UNKNOWN_HOLDER = "an unknown process"
#: Seconds a busy lock with an empty note is tried again (the holder is taking or releasing it).
_NOTE_GRACE_S = 1.0


@contextmanager
def store_lock(path: str | Path, wait: float = 0.0):
    """Hold an exclusive lock on a store while writing (``<store>.lock`` beside it).

    The lock is an OS file lock (``flock``): a killed writer's lock is released by the
    kernel, so it cannot outlive its process on this machine. The lock file records the
    holder's host, pid and start time, so a conflict says who holds it. ``wait`` seconds
    are spent retrying before a second writer gets a :class:`StoreError` instead of
    interleaving rows. The lock file itself stays (an empty lock file means nothing).
    """
    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _lock_holder(lock)
                    if holder == _UNKNOWN_HOLDER and time.monotonic() < deadline + _NOTE_GRACE_S:
                        # an empty note: the holder is between taking the lock and writing its
                        # note, or between clearing it and letting go: look again shortly
                        time.sleep(0.02)
                        continue
                    raise StoreBusyError(
                        f"is being written by another process ({holder}; lock {lock.name})", path=path,
                        hint="Wait for it to finish, or write to another --out. If that process is gone "
                             "(killed on another machine of a shared file system), delete the .lock file "
                             "and run again.") from None
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                      "since": _now()}).encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only its note is missing
        try:
            yield
        finally:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
    finally:
        os.close(fd)


class SlideStore:
    """Read and write one slide's store."""

    def __init__(self, path: str | Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path) -> "SlideStore":
        """Open an existing store for reading and appending."""
        p = Path(path)
        if not (p / "zarr.json").is_file():
            raise StoreError("is not a slide-clip store (no zarr.json)", path=p,
                             hint="Run `slide-clip embed` on the slide first.")
        try:
            g = zarr.open_group(str(p), mode="r+", zarr_format=3)
        except Exception as e:  # noqa: BLE001
            raise StoreError(f"cannot be opened as Zarr v3 ({e})", path=p) from None
        if "slide_clip" not in g.attrs:
            raise StoreError("is a Zarr store but not a slide-clip store", path=p)
        return cls(p, g)

    @classmethod
    def create(cls, path: str | Path, slide: dict, tiling: dict) -> "SlideStore":
        """Create (replacing anything there) a store with its slide and tiling attributes."""
        p = Path(path)
        if p.exists():
            shutil.rmtree(p)
        # One write of zarr.json with every attribute (Zarr writes it atomically): a store is
        # either absent or a complete slide-clip store, never "not a slide-clip store".
        g = zarr.open_group(str(p), mode="w", zarr_format=3, attributes={
            "slide_clip": {"format_version": FORMAT_VERSION, "created": _now()},
            "slide": slide,
            "tiling": tiling,
            "versions": package_versions(),
            "status": STATUS_CREATED,
        })
        return cls(p, g)

    # ----------------------------------------------------------------- attributes
    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def slide(self) -> dict:
        return dict(self.group.attrs["slide"])

    @property
    def tiling(self) -> dict:
        return dict(self.group.attrs["tiling"])

    @property
    def tissue_algorithm(self):
        """The tissue algorithm that made the mask: ``tiling.tissue_algorithm``, 1 where absent
        (stores made before it was recorded)."""
        return self.tiling.get("tissue_algorithm", 1)

    def check_tissue_algorithm(self) -> None:
        """Raise :class:`StoreError` unless this slide-clip's tissue algorithm made the mask.

        Masks of two algorithms keep different tiles of the same slide; a cohort never mixes
        them, and a store is never reused, tiled, encoded or read under another algorithm.
        """
        found = self.tissue_algorithm
        if found == TISSUE_ALGORITHM:
            return
        if found == 1:
            why = "tissue algorithm 1 (before slide-clip recorded it), which can leave out pale tissue beside dense tissue"
        elif isinstance(found, int) and not isinstance(found, bool) and found > TISSUE_ALGORITHM:
            why = f"tissue algorithm {found}, from a newer slide-clip"
        else:
            why = f"tissue algorithm {found!r}, unknown to this slide-clip"
        raise StoreError(f"its tissue mask was made by {why}; this slide-clip finds tissue with algorithm "
                         f"{TISSUE_ALGORITHM}, and never mixes the two", path=self.path,
                         hint="Re-embed the slide with `slide-clip embed --overwrite` (new mask, tiles and "
                              "embeddings), or use another --out.")

    @property
    def status(self) -> str:
        return str(self.group.attrs.get("status", "unknown"))

    @property
    def n_tiles(self) -> int:
        return int(self.array("tiles/coords").shape[0])

    # ----------------------------------------------------------------- tiles
    def write_tissue(self, mask, thumbnail, attrs: dict) -> None:
        """Write the thumbnail and tissue mask (thumbnail pixels), then mark the store ``tissue``."""
        g = self.group
        if "tissue" in g:
            del g["tissue"]
        g.create_array("tissue/mask", data=np.asarray(mask, dtype=bool), compressors=_COMPRESSORS,
                       config=_WRITE_ALL)
        g.create_array("tissue/thumbnail", data=np.asarray(thumbnail, dtype=np.uint8),
                       chunks=(min(1024, thumbnail.shape[0]), min(1024, thumbnail.shape[1]), 3),
                       compressors=_COMPRESSORS, config=_WRITE_ALL)
        g["tissue"].attrs.update(attrs)
        g.attrs.update({"status": STATUS_TISSUE})

    def write_tiles(self, coords, grid, tissue_fraction, geometry: dict) -> None:
        """Write the tile grid and its geometry (merged into ``tiling``), then mark the store ``tiled``."""
        n = int(coords.shape[0])
        rows = max(1, min(n, 65536))
        g = self.group
        if "tiles" in g:
            del g["tiles"]
        g.create_array("tiles/coords", data=np.asarray(coords, dtype=np.int64), chunks=(rows, 2),
                       compressors=_COMPRESSORS, config=_WRITE_ALL)
        g.create_array("tiles/grid", data=np.asarray(grid, dtype=np.int32), chunks=(rows, 2),
                       compressors=_COMPRESSORS, config=_WRITE_ALL)
        g.create_array("tiles/tissue_fraction", data=np.asarray(tissue_fraction, dtype=np.float32),
                       chunks=(rows,), compressors=_COMPRESSORS, config=_WRITE_ALL)
        g.attrs.update({"tiling": {**self.tiling, **geometry}, "status": STATUS_TILED, "n_tiles": n})

    def array(self, key: str) -> zarr.Array:
        """The array at ``key``, checked to be whole: every chunk file present.

        Raises :class:`StoreError` naming the store and the array when it is missing or a
        chunk file is lost (Zarr would silently read the fill value instead).
        """
        arr = self._present(key)
        if arr.nchunks and arr.nchunks_initialized < arr.nchunks:
            lost = arr.nchunks - arr.nchunks_initialized
            raise StoreError(f"is damaged: {lost} of {arr.nchunks} chunk files of {key} are missing",
                             path=self.path, hint=_DAMAGED)
        return arr

    def read(self, key: str, finite: bool = True) -> np.ndarray:
        """All of array ``key``, checked (see :meth:`array`); ``finite`` also refuses NaN/inf values."""
        data = self.array(key)[...]
        if finite and data.dtype.kind == "f" and not np.isfinite(data).all():
            raise StoreError(f"is damaged: {key} holds missing (NaN) values", path=self.path, hint=_DAMAGED)
        return data

    def coords(self) -> np.ndarray:
        """(n, 2) int64 level-0 x, y of each tile's top-left corner (checked)."""
        return self.read("tiles/coords")

    def grid(self) -> np.ndarray:
        """(n, 2) int32 grid row, col of each tile (checked)."""
        return self.read("tiles/grid")

    def tissue_fraction(self) -> np.ndarray:
        """(n,) float32 tissue fraction of each tile (checked)."""
        return self.read("tiles/tissue_fraction")

    def mask(self) -> np.ndarray:
        """(h, w) bool tissue mask, thumbnail pixels (checked)."""
        return self.read("tissue/mask")

    def thumbnail(self) -> np.ndarray:
        """(h, w, 3) uint8 thumbnail (checked)."""
        return self.read("tissue/thumbnail")

    # ----------------------------------------------------------------- embeddings
    def models(self) -> list[str]:
        if "embeddings" not in self.group:
            return []
        return sorted(self.group["embeddings"].group_keys())

    def embedding_attrs(self, model: str) -> dict:
        key = f"embeddings/{model_key(model)}"
        if key not in self.group:
            raise StoreError(f"has no embeddings for model {model!r}", path=self.path,
                             hint=f"Models in it: {', '.join(self.models()) or 'none'}.")
        return dict(self.group[key].attrs)

    def is_complete(self, model: str) -> bool:
        key = f"embeddings/{model_key(model)}"
        return key in self.group and self.group[key].attrs.get("status") == STATUS_COMPLETE

    def embeddings(self, model: str, allow_partial: bool = False, *, unit: bool = False) -> np.ndarray:
        """The model's (n, d) embeddings; raises on a partial store unless ``allow_partial``.

        With ``allow_partial`` only the rows written so far are returned. Every row read is
        checked: a lost chunk (NaN rows) or a missing array is a :class:`StoreError`.
        ``unit=True`` returns L2-normalised rows whatever the group holds (cosines; a group of
        pre-projection features is stored unnormalised).
        """
        attrs = self.embedding_attrs(model)
        arr = self._features(model)
        if attrs.get("status") != STATUS_COMPLETE:
            if not allow_partial:
                raise StoreError(
                    f"embeddings for {model!r} are partial ({attrs.get('rows_written', 0)} of "
                    f"{arr.shape[0]} tiles)", path=self.path,
                    hint="Run `slide-clip embed` again to resume it.",
                )
            rows = np.asarray(arr[: int(attrs.get("rows_written", 0))], dtype=np.float32)
            self._check_rows(model, 0, rows)
            return _unit_rows(rows) if unit and not is_normalised(attrs) else rows
        if arr.shape[0] == 0:
            return np.zeros(arr.shape, np.float32)
        return np.concatenate([b for _, b in self.iter_embeddings(model, unit=unit)], axis=0)

    def _present(self, key: str) -> zarr.Array:
        """The array at ``key``; a missing one is a damaged store."""
        try:
            arr = self.group[key]
        except KeyError:
            arr = None
        if not isinstance(arr, zarr.Array):
            raise StoreError(f"is damaged: the array {key} is missing", path=self.path, hint=_DAMAGED)
        return arr

    def _features(self, model: str) -> zarr.Array:
        return self._present(f"embeddings/{model_key(model)}/features")

    def _check_rows(self, model: str, start: int, block: np.ndarray) -> None:
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise StoreError(
                f"is damaged: embeddings for {model!r} hold missing values from row {bad} "
                "(a chunk file is lost or unreadable)", path=self.path, hint=_DAMAGED)

    def iter_embeddings(self, model: str, rows: int | None = None, *, unit: bool = False):
        """Yield ``(start, block)`` over a complete model's embeddings, ``rows`` at a time.

        ``block`` is a float32 ``(k, d)`` slice of rows ``start:start + k`` in tile order. Memory
        stays at one block (default: one Zarr chunk). A partial group, or a block with
        non-finite values (a lost chunk file reads as the NaN fill value), raises
        :class:`StoreError` naming the store: a damaged store is never a result. ``unit=True``
        L2-normalises the rows of a group stored unnormalised (``normalised: false``).
        """
        attrs = self.embedding_attrs(model)
        arr = self._features(model)
        if attrs.get("status") != STATUS_COMPLETE:
            raise StoreError(
                f"embeddings for {model!r} are partial ({attrs.get('rows_written', 0)} of "
                f"{arr.shape[0]} tiles)", path=self.path, hint="Run `slide-clip embed` again to resume it.")
        step = int(rows or arr.chunks[0])
        scale = unit and not is_normalised(attrs)
        for start in range(0, arr.shape[0], step):
            block = np.asarray(arr[start:start + step], dtype=np.float32)
            self._check_rows(model, start, block)
            yield start, _unit_rows(block) if scale else block

    def drop_embeddings(self, model: str) -> None:
        """Delete a model's embeddings (to re-encode from scratch)."""
        key = f"embeddings/{model_key(model)}"
        if key in self.group:
            del self.group[key]

    def begin_embeddings(self, provenance: dict, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> "EmbeddingWriter":
        """Start or resume writing a model's embeddings.

        A new group is created if none exists or if the existing one was written by other
        weights (a different ``weights_sha256``), in which case it is replaced.
        """
        n = self.n_tiles
        key = f"embeddings/{model_key(provenance['name'])}"
        d = int(provenance["embed_dim"])
        if key in self.group:
            old = dict(self.group[key].attrs)
            if old.get("weights_sha256") == provenance["weights_sha256"] and old.get("embed_dim") == d:
                return EmbeddingWriter(self.group[key], n)
            del self.group[key]
        grp = self.group.require_group(key)
        rows = max(1, min(n, chunk_rows))
        grp.create_array("features", shape=(n, d), chunks=(rows, d), dtype="float32",
                         fill_value=np.nan, compressors=_COMPRESSORS, config=_WRITE_ALL)
        grp.attrs.update({**provenance, "status": STATUS_PARTIAL, "rows_written": 0, "n_tiles": n,
                          "started": _now()})
        return EmbeddingWriter(grp, n)


    # ----------------------------------------------------------------- scores
    def write_scores(self, model: str, set_name: str, logits, probs, classifier, attrs: dict,
                     grid=None) -> None:
        """Write (replacing) a score set: tile logits and probabilities, the classifier used and
        (optionally) the (classes, rows, cols) probability grid of the heatmaps."""
        key = f"scores/{model_key(model)}/{model_key(set_name)}"
        if key in self.group:
            del self.group[key]
        grp = self.group.require_group(key)
        n, c = np.asarray(probs).shape
        rows = max(1, min(n, 65536))
        grp.create_array("logits", data=np.asarray(logits, np.float32), chunks=(rows, c), compressors=_COMPRESSORS,
                         config=_WRITE_ALL)
        grp.create_array("probs", data=np.asarray(probs, np.float32), chunks=(rows, c), compressors=_COMPRESSORS,
                         config=_WRITE_ALL)
        grp.create_array("classifier", data=np.asarray(classifier, np.float32), compressors=_COMPRESSORS,
                         config=_WRITE_ALL)
        if grid is not None:
            grp.create_array("grid", data=np.asarray(grid, np.float32), compressors=_COMPRESSORS, config=_WRITE_ALL)
        grp.attrs.update({**attrs, "set": set_name, "model": model, "created": _now(), "status": STATUS_COMPLETE})

    def score_sets(self, model: str | None = None) -> list[tuple[str, str]]:
        """(model key, set key) of every score set, or of one model's."""
        if "scores" not in self.group:
            return []
        out = []
        for mk in sorted(self.group["scores"].group_keys()):
            if model is not None and mk != model_key(model):
                continue
            for sk in sorted(self.group[f"scores/{mk}"].group_keys()):
                out.append((mk, sk))
        return out

    def scores(self, model: str, set_name: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """(probs, logits, attrs) of a score set."""
        key = f"scores/{model_key(model)}/{model_key(set_name)}"
        if key not in self.group:
            have = ", ".join(f"{m}/{s}" for m, s in self.score_sets()) or "none"
            raise StoreError(f"has no scores {set_name!r} for model {model!r}", path=self.path,
                             hint=f"Run `slide-clip zeroshot` or `fewshot` first (score sets in it: {have}).")
        return (self.read(f"{key}/probs"), self.read(f"{key}/logits"), dict(self.group[key].attrs))


class EmbeddingWriter:
    """Appends rows of embeddings in tile order and records progress.

    Rows are buffered and written a whole chunk at a time (or after ``flush_seconds``), then
    ``rows_written`` is advanced. The last write marks the group ``complete``.
    """

    def __init__(self, group: zarr.Group, n_tiles: int, flush_seconds: float = 60.0):
        self.group = group
        self.array = group["features"]
        self.n = n_tiles
        self.rows_written = int(group.attrs.get("rows_written", 0))
        self.chunk_rows = int(self.array.chunks[0])
        self.flush_seconds = flush_seconds
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self._last_flush = time.monotonic()

    @property
    def complete(self) -> bool:
        return self.group.attrs.get("status") == STATUS_COMPLETE

    @property
    def next_row(self) -> int:
        """The first row not yet handed to :meth:`append`."""
        return self.rows_written + self._buffered

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float32)
        if self.next_row + rows.shape[0] > self.n:
            raise ValueError("more embedding rows than tiles")
        self._buf.append(rows)
        self._buffered += rows.shape[0]
        end = self.next_row
        at_chunk_end = end % self.chunk_rows == 0 or end == self.n
        if at_chunk_end or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._buffered:
            data = np.concatenate(self._buf, axis=0)
            start = self.rows_written
            self.array[start:start + data.shape[0]] = data
            self.rows_written = start + data.shape[0]
            self._buf, self._buffered = [], 0
            self.group.attrs.update({"rows_written": self.rows_written, "updated": _now()})
        self._last_flush = time.monotonic()
        if self.rows_written == self.n and not self.complete:
            self.group.attrs.update({"status": STATUS_COMPLETE, "finished": _now()})


def _unit_rows(block: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return (block / np.where(norms > 0, norms, 1)).astype(np.float32)
