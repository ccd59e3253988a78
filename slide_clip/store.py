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

A store may live at a URL (``s3://bucket/out/<slide_id>.zarr``): the same layout through zarr's
``FsspecStore``; :attr:`SlideStore.path` is then a :class:`upath.UPath`. Object stores have no
rename: a replaced score set or embedding group is written under a temporary name and made
current by one write of its parent group's ``zarr.json`` naming it (:data:`CURRENT`), and every
write into a remote store needs the store's claim (:mod:`slide_clip.storage.claims`).
"""

from __future__ import annotations

import fcntl
import json
import os
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
from slide_clip.atomic import clean_leftovers, is_temporary, swap_in, temporary_name
from slide_clip.errors import StoreBusyError, StoreError
from slide_clip.faults import kill_point
from slide_clip.storage.filesystems import remove_tree, upath
from slide_clip.storage.urls import is_url

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

#: Attribute of a parent group (``scores/<model>``, ``embeddings``) mapping a child's name to the
#: temporary name it is stored under: how a replacement is made current on object storage,
#: where nothing can be renamed (see docs/FORMAT.md, "Replacing a set atomically").
CURRENT = "current"

_DAMAGED = "Re-embed the slide with --overwrite, or restore the store from a copy."
_DAMAGED_SCORES = "Score the slide again (`slide-clip zeroshot`, `fewshot` or `cluster`), or restore the store from a copy."


def _reason(exc: BaseException) -> str:
    """An exception as a short phrase for a one-line error."""
    text = " ".join(str(exc).split())[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

#: Every chunk is written, even one equal to the fill value, so a missing chunk file always
#: means damage (see :meth:`SlideStore.array`).
_WRITE_ALL = {"write_empty_chunks": True}


def store_path(out_dir, slide_name: str):
    """The store of ``slide_name`` in ``out_dir``: a Path, or a :class:`upath.UPath` for a URL."""
    return upath(out_dir) / f"{slide_name}{STORE_SUFFIX}"


def _check_bucket(p) -> None:
    """A remote store whose bucket is missing (or refused) as one line: zarr would only see no zarr.json."""
    from slide_clip.errors import StorageError
    from slide_clip.storage.failures import remote_errors
    from slide_clip.storage.filesystems import filesystem

    fs, path = filesystem(str(p))
    try:
        fs.info(path.split("/", 1)[0])
    except FileNotFoundError:
        raise StorageError("cannot read: the bucket does not exist", path=str(p),
                           hint="Check the bucket's name and the endpoint (storage.endpoint_url).") from None
    except Exception as e:  # noqa: BLE001 - credentials, network: one line; anything else as it is
        with remote_errors(str(p)):
            raise e


def _not_storage(exc: BaseException, path) -> None:
    """Raise the one-line :class:`~slide_clip.errors.StorageError` if ``exc`` is a storage service's
    failure (a cut connection, throttling, refused credentials): never reported as damage."""
    if is_url(path):
        from slide_clip.storage.failures import storage_error

        err = storage_error(exc, str(path))
        if err is not None:
            raise err from None


def _io(path, action: str = "write"):
    """Storage failures inside the block as one line about the store (a remote store; nothing locally)."""
    import contextlib

    if not is_url(path):
        return contextlib.nullcontext()
    from slide_clip.storage.failures import remote_errors

    return remote_errors(str(path), action)


def _zarr_target(path):
    """What zarr opens for a store at ``path``: its local path, or an ``FsspecStore`` for a URL."""
    if not is_url(path):
        return str(path)
    from zarr.storage import FsspecStore

    from slide_clip.storage.filesystems import protocol_of
    from slide_clip.storage.options import fsspec_options

    url = str(path)
    return FsspecStore.from_url(url, storage_options=fsspec_options(protocol_of(url)))


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
    interleaving rows. The holder deletes the lock file when it lets go, so finished stores
    have none beside them (a file left by a killed writer means nothing: it is locked again).
    Deleting it races with a waiter that opened the old file: a lock taken on a file that no
    longer is the one at the path (``fstat`` and ``stat`` name different inodes) is let go
    and taken again on the file now there.
    """
    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _take_flock(fd, lock, path, deadline)
            if _same_file(fd, lock):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder deleted the file while we waited on it: take the new one
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                      "since": _now()}).encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only its note is missing
        yield
    finally:
        try:
            lock.unlink()  # while still held: a waiter on this file finds it gone and retries
        except OSError:
            try:
                os.ftruncate(fd, 0)  # a read-only folder: at least an empty note
            except OSError:
                pass
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open ``fd`` is the file ``path`` names now (not one deleted or replaced)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _take_flock(fd: int, lock: Path, path, deadline: float) -> None:
    """``flock`` ``fd`` exclusively, trying until ``deadline``; then :class:`StoreBusyError`."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _lock_holder(lock)
                if holder == _UNKNOWN_HOLDER and time.monotonic() < deadline + _NOTE_GRACE_S:
                    # an empty note: the holder is between taking the lock and writing its
                    # note, or between deleting it and letting go: look again shortly
                    time.sleep(0.02)
                    if not _same_file(fd, lock):
                        return  # deleted by its holder: the caller opens the new one
                    continue
                raise StoreBusyError(
                    f"is being written by another process ({holder}; lock {lock.name})", path=path,
                    hint="Wait for it to finish, or write to another --out. If that process is gone "
                         "(killed on another machine of a shared file system), delete the .lock file "
                         "and run again.") from None
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            if not _same_file(fd, lock):
                return  # let go and deleted while we waited: the caller opens the new one


class SlideStore:
    """Read and write one slide's store."""

    def __init__(self, path, group: zarr.Group):
        self.path = upath(path)
        self.group = group
        self.remote = is_url(path)

    def _writing(self) -> None:
        """Before a write into a remote store: this process must hold its live claim."""
        if self.remote:
            from slide_clip.storage.claims import check_claimed

            check_claimed(str(self.path))

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, path) -> "SlideStore":
        """Open an existing store for reading and appending (a local path or a URL)."""
        from slide_clip.storage.failures import remote_errors

        p = upath(path)
        with remote_errors(str(p)):
            if not (p / "zarr.json").is_file():
                if is_url(p):
                    _check_bucket(p)
                raise StoreError("is not a slide-clip store (no zarr.json)", path=p,
                                 hint="Run `slide-clip embed` on the slide first.")
        try:
            g = zarr.open_group(_zarr_target(p), mode="r+", zarr_format=3)
        except Exception as e:  # noqa: BLE001
            raise StoreError(f"cannot be opened as Zarr v3 ({e})", path=p) from None
        if "slide_clip" not in g.attrs:
            raise StoreError("is a Zarr store but not a slide-clip store", path=p)
        return cls(p, g)

    @classmethod
    def create(cls, path, slide: dict, tiling: dict) -> "SlideStore":
        """Create (replacing anything there) a store with its slide and tiling attributes."""
        p = upath(path)
        if is_url(p):
            from slide_clip.storage.claims import check_claimed

            check_claimed(str(p))
        if p.exists():
            if is_url(p):
                remove_tree(p)
            else:
                import shutil

                shutil.rmtree(p)  # a failure here (permissions) is the caller's OutputError
        # One write of zarr.json with every attribute (Zarr writes it atomically): a store is
        # either absent or a complete slide-clip store, never "not a slide-clip store".
        g = zarr.open_group(_zarr_target(p), mode="w", zarr_format=3, attributes={
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
        with _io(self.path):
            self._write_tissue(mask, thumbnail, attrs)

    def _write_tissue(self, mask, thumbnail, attrs: dict) -> None:
        self._writing()
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
        with _io(self.path):
            self._write_tiles(coords, grid, tissue_fraction, geometry)

    def _write_tiles(self, coords, grid, tissue_fraction, geometry: dict) -> None:
        self._writing()
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

    def array(self, key: str, shape: tuple | None = None, hint: str = _DAMAGED, whole: bool = True) -> zarr.Array:
        """The array at ``key``, checked to be whole: every chunk file present (unless ``whole``
        is False: an array still being written), and of ``shape`` (None entries match any
        length) when given.

        Raises :class:`StoreError` naming the store and the array when it is missing, its
        shape is not the one the store records (an edited ``zarr.json``), or a chunk file is
        lost (Zarr would silently read the fill value instead).
        """
        arr = self._present(key, hint)
        if shape is not None and (len(arr.shape) != len(shape)
                                  or any(w is not None and int(w) != h for w, h in zip(shape, arr.shape))):
            want = "(" + ", ".join("any" if w is None else str(int(w)) for w in shape) + ")"
            raise StoreError(f"is damaged: {key} has shape {tuple(arr.shape)}, the store records {want}",
                             path=self.path, hint=hint)
        if not whole:
            return arr
        try:
            lost = arr.nchunks - arr.nchunks_initialized if arr.nchunks else 0
        except Exception as e:  # noqa: BLE001 - an unreadable chunk grid: damage
            _not_storage(e, self.path)
            raise StoreError(f"is damaged: the chunks of {key} cannot be listed ({_reason(e)})", path=self.path,
                             hint=hint) from None
        if lost:
            raise StoreError(f"is damaged: {lost} of {arr.nchunks} chunk files of {key} are missing",
                             path=self.path, hint=hint)
        return arr

    def get(self, key: str, selection=Ellipsis, hint: str = _DAMAGED, arr: zarr.Array | None = None) -> np.ndarray:
        """``selection`` of array ``key`` (checked with :meth:`array` unless ``arr`` is given);
        a chunk that cannot be decoded (a truncated or corrupt file) is a :class:`StoreError`."""
        arr = self.array(key, hint=hint) if arr is None else arr
        try:
            if isinstance(selection, tuple) and any(isinstance(s, np.ndarray) for s in selection):
                return arr.get_orthogonal_selection(selection)
            return arr[selection]
        except Exception as e:  # noqa: BLE001 - Blosc, a wrong chunk size...: the file is damaged
            _not_storage(e, self.path)
            raise StoreError(f"is damaged: a chunk file of {key} cannot be read ({_reason(e)}): it is truncated "
                             "or corrupt", path=self.path, hint=hint) from None

    def read(self, key: str, finite: bool = True, shape: tuple | None = None, hint: str = _DAMAGED) -> np.ndarray:
        """All of array ``key``, checked (see :meth:`array`); ``finite`` also refuses NaN/inf values."""
        data = self.get(key, hint=hint, arr=self.array(key, shape, hint))
        if finite and data.dtype.kind == "f" and not np.isfinite(data).all():
            raise StoreError(f"is damaged: {key} holds missing (NaN) values", path=self.path, hint=hint)
        return data

    def check_tiles(self) -> int:
        """Check the tile arrays against the tile count the store records; returns that count.

        Every tile array has one row per tile, the mask is the thumbnail's size: an array
        whose shape was edited, or whose chunk files are lost, is a :class:`StoreError`.
        """
        n = self.group.attrs.get("n_tiles")
        n = int(n) if n is not None else None
        self.array("tiles/coords", (n, 2))
        n = self.n_tiles if n is None else n
        self.array("tiles/grid", (n, 2))
        self.array("tiles/tissue_fraction", (n,))
        thumb = self.array("tissue/thumbnail", (None, None, 3))
        self.array("tissue/mask", tuple(thumb.shape[:2]))
        return n

    def _n_recorded(self):
        n = self.group.attrs.get("n_tiles")
        return int(n) if n is not None else None

    def coords(self) -> np.ndarray:
        """(n, 2) int64 level-0 x, y of each tile's top-left corner (checked)."""
        return self.read("tiles/coords", shape=(self._n_recorded(), 2))

    def grid(self) -> np.ndarray:
        """(n, 2) int32 grid row, col of each tile (checked)."""
        return self.read("tiles/grid", shape=(self._n_recorded(), 2))

    def tissue_fraction(self) -> np.ndarray:
        """(n,) float32 tissue fraction of each tile (checked)."""
        return self.read("tiles/tissue_fraction", shape=(self._n_recorded(),))

    def mask(self) -> np.ndarray:
        """(h, w) bool tissue mask, thumbnail pixels (checked)."""
        return self.read("tissue/mask")

    def thumbnail(self) -> np.ndarray:
        """(h, w, 3) uint8 thumbnail (checked)."""
        return self.read("tissue/thumbnail")

    # ----------------------------------------------------------------- current versions
    def _current(self, parent: str) -> dict:
        """name -> stored name, for the children of ``parent`` made current by a pointer (:data:`CURRENT`)."""
        try:
            cur = self.group[parent].attrs.get(CURRENT) if parent in self.group else None
        except KeyError:
            return {}
        return {str(k): str(v) for k, v in cur.items()} if isinstance(cur, dict) else {}

    def _key(self, parent: str, name: str) -> str:
        """The key of ``parent``'s child ``name`` as stored: its pointer's target, else ``name``."""
        return f"{parent}/{self._current(parent).get(name, name)}"

    def _emb_key(self, model: str) -> str:
        return self._key("embeddings", model_key(model))

    def _score_key(self, model: str, set_name: str) -> str:
        return self._key(f"scores/{model_key(model)}", model_key(set_name))

    def _names(self, parent: str) -> list[str]:
        """The current children of ``parent``: plain names and pointers' names (never a write in progress)."""
        if parent not in self.group:
            return []
        stored = set(self.group[parent].group_keys())
        names = {k for k in stored if not is_temporary(k)}
        names |= {n for n, real in self._current(parent).items() if real in stored}
        return sorted(names)

    def _children(self, parent: str) -> list[str]:
        """Every name stored in ``parent``'s folder (also those without a readable ``zarr.json``)."""
        folder = self.path / parent
        try:
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        except FileNotFoundError:
            return []

    def _swap(self, parent: str, tmp: str, name: str, after_swap=None) -> None:
        """Make the complete group ``parent/tmp`` the current ``parent/name``; delete the old version.

        Local: :func:`slide_clip.atomic.swap_in` (a rename). Object storage: one write of
        ``parent``'s ``zarr.json`` whose :data:`CURRENT` names ``tmp`` (a single PUT: readers see
        the old pointer or the new one), then the old version is deleted.
        """
        cur = self._current(parent)
        if self.remote:
            self._writing()
            old = cur.get(name) or (name if name in self._children(parent) else None)
            self.group.require_group(parent).attrs.update({CURRENT: {**cur, name: tmp}})
            if after_swap is not None:
                after_swap()
            if old is not None and old != tmp:
                remove_tree(self.path / parent / old)
            return
        swap_in(self.path / parent / tmp, self.path / parent / name, after_swap=after_swap)
        if name in cur:  # a store copied from object storage: its pointer named the old version
            old = cur.pop(name)
            self.group[parent].attrs.update({CURRENT: cur})
            remove_tree(self.path / parent / old)

    def _clean(self, parent: str) -> None:
        """Delete what crashed writes left in ``parent`` (never a version a pointer names)."""
        keep = set(self._current(parent).values())
        if not self.remote:
            clean_leftovers(self.path / parent, keep=keep)
            return
        for child in self._children(parent):
            if is_temporary(child) and child not in keep:
                remove_tree(self.path / parent / child)

    # ----------------------------------------------------------------- embeddings
    def models(self) -> list[str]:
        """The model keys with an embeddings group (a replacement being written is not one)."""
        return self._names("embeddings")

    def embedding_attrs(self, model: str) -> dict:
        key = self._emb_key(model)
        if key not in self.group:
            raise StoreError(f"has no embeddings for model {model!r}", path=self.path,
                             hint=f"Models in it: {', '.join(self.models()) or 'none'}.")
        return dict(self.group[key].attrs)

    def is_complete(self, model: str) -> bool:
        key = self._emb_key(model)
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
            key = f"{self._emb_key(model)}/features"
            rows = np.asarray(self.get(key, slice(0, int(attrs.get("rows_written", 0))), arr=arr), dtype=np.float32)
            self._check_rows(model, 0, rows)
            return _unit_rows(rows) if unit and not is_normalised(attrs) else rows
        if arr.shape[0] == 0:
            return np.zeros(arr.shape, np.float32)
        return np.concatenate([b for _, b in self.iter_embeddings(model, unit=unit)], axis=0)

    def _present(self, key: str, hint: str = _DAMAGED) -> zarr.Array:
        """The array at ``key``; a missing one (or one whose zarr.json cannot be read) is a damaged store."""
        try:
            arr = self.group[key]
        except KeyError:
            arr = None
        except Exception as e:  # noqa: BLE001 - an unreadable zarr.json
            raise StoreError(f"is damaged: the metadata of {key} (zarr.json) cannot be read ({_reason(e)})",
                             path=self.path, hint=hint) from None
        if not isinstance(arr, zarr.Array):
            raise StoreError(f"is damaged: the array {key} is missing", path=self.path, hint=hint)
        return arr

    def _complete_features(self, model: str) -> zarr.Array:
        """The features array of a complete group; a partial one is a :class:`StoreError`."""
        attrs = self.embedding_attrs(model)
        arr = self._features(model)
        if attrs.get("status") != STATUS_COMPLETE:
            raise StoreError(
                f"embeddings for {model!r} are partial ({attrs.get('rows_written', 0)} of "
                f"{arr.shape[0]} tiles)", path=self.path, hint="Run `slide-clip embed` again to resume it.")
        return arr

    def check_embeddings(self, model: str) -> None:
        """Check a model's features array has the shape its group records (tiles, embed_dim)."""
        self._features(model)

    def _features(self, model: str) -> zarr.Array:
        """The model's features array, checked to be (tiles, embed_dim) as the group records."""
        attrs = self.embedding_attrs(model)
        n = attrs.get("n_tiles", self._n_recorded())
        d = attrs.get("embed_dim")
        # rows not yet written have no chunk files: lost chunks show as NaN rows (_check_rows)
        return self.array(f"{self._emb_key(model)}/features",
                          (None if n is None else int(n), None if d is None else int(d)), whole=False)

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
        arr = self._complete_features(model)
        step = int(rows or arr.chunks[0])
        scale = unit and not is_normalised(self.embedding_attrs(model))
        key = f"{self._emb_key(model)}/features"
        for start in range(0, arr.shape[0], step):
            block = np.asarray(self.get(key, slice(start, start + step), arr=arr), dtype=np.float32)
            self._check_rows(model, start, block)
            yield start, _unit_rows(block) if scale else block

    def embedding_rows(self, model: str, rows, *, unit: bool = False) -> np.ndarray:
        """Some rows of a complete model's embeddings, float32 ``(len(rows), d)``, checked like
        :meth:`iter_embeddings` (partial group, lost or unreadable chunks, NaN); ``unit=True``
        L2-normalises the rows of a group stored unnormalised."""
        arr = self._complete_features(model)
        rows = np.asarray(rows, dtype=np.int64)
        if not rows.size:
            return np.zeros((0, arr.shape[1]), np.float32)
        key = f"{self._emb_key(model)}/features"
        out = np.asarray(self.get(key, (rows, slice(None)), arr=arr), np.float32)
        if not np.isfinite(out).all():
            raise StoreError(f"is damaged: embeddings for {model!r} hold missing values (a chunk file is lost "
                             "or unreadable)", path=self.path, hint=_DAMAGED)
        return _unit_rows(out) if unit and not is_normalised(self.embedding_attrs(model)) else out

    def drop_embeddings(self, model: str) -> None:
        """Delete a model's embeddings (to re-encode from scratch)."""
        self._writing()
        key = self._emb_key(model)
        if key in self.group:
            del self.group[key]
        cur = self._current("embeddings")
        if cur.pop(model_key(model), None) is not None:
            self.group["embeddings"].attrs.update({CURRENT: cur})

    def begin_embeddings(self, provenance: dict, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                         replace: bool = False) -> "EmbeddingWriter":
        """Start or resume writing a model's embeddings.

        A model's first embeddings (or a group never finished) are written in place. A
        complete group of other weights (a different ``weights_sha256``), or any complete
        group with ``replace`` (a forced re-encode), is replaced by writing the new group
        beside it under a temporary name (see :mod:`slide_clip.atomic`) and swapping it in
        when its last row is written: until then readers see the old, complete group, a
        crash keeps it, and a rerun resumes the replacement where it stopped.
        """
        with _io(self.path):
            return self._begin_embeddings(provenance, chunk_rows, replace)

    def _begin_embeddings(self, provenance: dict, chunk_rows: int, replace: bool) -> "EmbeddingWriter":
        self._writing()
        n = self.n_tiles
        mk = model_key(provenance["name"])
        key = self._emb_key(mk)
        d = int(provenance["embed_dim"])

        def same(a: dict) -> bool:
            return a.get("weights_sha256") == provenance["weights_sha256"] and a.get("embed_dim") == d

        pending = self._pending("embeddings", mk)
        old = dict(self.group[key].attrs) if key in self.group else None
        if old is not None and not replace and same(old):
            self._drop(pending)  # a replacement left by a crash is not wanted any more
            return EmbeddingWriter(self.group[key], n, guard=self._writing, where=self.path)
        if old is None or old.get("status") != STATUS_COMPLETE:
            self._drop(pending)
            if old is not None:
                del self.group[key]
            return EmbeddingWriter(self._new_embeddings(key, provenance, n, chunk_rows), n, guard=self._writing, where=self.path)

        def swap(name):
            return lambda: self._swap("embeddings", name, mk)

        for name, a in pending:
            if same(a):  # resume the replacement a killed run began
                self._drop([p for p in pending if p[0] != name])
                w = EmbeddingWriter(self.group[f"embeddings/{name}"], n, swap=swap(name), guard=self._writing, where=self.path)
                if w.complete:  # killed between its last row and the swap
                    w.swap_in()
                    return EmbeddingWriter(self.group[self._emb_key(mk)], n, guard=self._writing, where=self.path)
                return w
        self._drop(pending)
        name = temporary_name(mk)
        grp = self._new_embeddings(f"embeddings/{name}", provenance, n, chunk_rows)
        return EmbeddingWriter(grp, n, swap=swap(name), guard=self._writing, where=self.path)

    def _new_embeddings(self, key: str, provenance: dict, n: int, chunk_rows: int) -> zarr.Group:
        grp = self.group.require_group(key)
        d = int(provenance["embed_dim"])
        rows = max(1, min(n, chunk_rows))
        grp.create_array("features", shape=(n, d), chunks=(rows, d), dtype="float32",
                         fill_value=np.nan, compressors=_COMPRESSORS, config=_WRITE_ALL)
        grp.attrs.update({**provenance, "status": STATUS_PARTIAL, "rows_written": 0, "n_tiles": n,
                          "started": _now()})
        return grp

    # ----------------------------------------------------------------- replacing groups
    def _pending(self, parent: str, target: str) -> list[tuple[str, dict]]:
        """(name, attributes) of the temporary groups in ``parent`` that would replace ``target``."""
        from slide_clip.atomic import parse_temporary

        live = set(self._current(parent).values())
        out = []
        for name in self._children(parent):
            parsed = parse_temporary(name)
            if parsed is not None and parsed[0] == "new" and parsed[1] == target and name not in live:
                try:
                    out.append((name, dict(self.group[f"{parent}/{name}"].attrs)))
                except Exception:  # noqa: BLE001 - half written: only good for deleting
                    out.append((name, {}))
        return out

    def _drop(self, pending: list[tuple[str, dict]]) -> None:
        for name, _ in pending:
            remove_tree(self.path / "embeddings" / name)

    # ----------------------------------------------------------------- scores
    def write_scores(self, model: str, set_name: str, logits, probs, classifier, attrs: dict,
                     grid=None) -> str:
        """Write (replacing) a score set: tile logits and probabilities, the classifier used and
        (optionally) the (classes, rows, cols) probability grid of the heatmaps.

        The new set is written beside the old one under a temporary name and swapped in
        when complete (:func:`slide_clip.atomic.swap_in`): a reader sees the old set or the
        new one, never a part of one; a crash or a full disk keeps the old set. Leftovers of
        an earlier crash are removed first. Returns the set's ``write_id`` (a fresh random
        id, recorded in its attributes, that summaries and heatmaps name). Call it holding
        the store's lock.
        """
        with _io(self.path):
            return self._write_scores(model, set_name, logits, probs, classifier, attrs, grid)

    def _write_scores(self, model: str, set_name: str, logits, probs, classifier, attrs: dict, grid) -> str:
        import uuid

        self._writing()
        mk, sk = model_key(model), model_key(set_name)
        parent = f"scores/{mk}"
        self._clean(parent)
        tmp = temporary_name(sk)
        try:
            grp = self.group.require_group(f"scores/{mk}/{tmp}")
            n, c = np.asarray(probs).shape
            rows = max(1, min(n, 65536))
            grp.create_array("logits", data=np.asarray(logits, np.float32), chunks=(rows, c),
                             compressors=_COMPRESSORS, config=_WRITE_ALL)
            grp.create_array("probs", data=np.asarray(probs, np.float32), chunks=(rows, c),
                             compressors=_COMPRESSORS, config=_WRITE_ALL)
            grp.create_array("classifier", data=np.asarray(classifier, np.float32), compressors=_COMPRESSORS,
                             config=_WRITE_ALL)
            if grid is not None:
                grp.create_array("grid", data=np.asarray(grid, np.float32), compressors=_COMPRESSORS,
                                 config=_WRITE_ALL)
            write_id = uuid.uuid4().hex
            # written last: a set without these attributes is never swapped in
            grp.attrs.update({**attrs, "set": set_name, "model": model, "created": _now(), "write_id": write_id,
                              "status": STATUS_COMPLETE})
        except BaseException:
            remove_tree(self.path / parent / tmp)  # a full disk: the old set stays as it was
            raise
        kill_point("scores-written")
        self._swap(parent, tmp, sk, after_swap=lambda: kill_point("scores-swapped"))
        return write_id

    def score_sets(self, model: str | None = None) -> list[tuple[str, str]]:
        """(model key, set key) of every score set, or of one model's (sets being written are not listed)."""
        if "scores" not in self.group:
            return []
        out = []
        for mk in sorted(self.group["scores"].group_keys()):
            if model is not None and mk != model_key(model):
                continue
            out.extend((mk, sk) for sk in self._names(f"scores/{mk}"))
        return out

    def _score_sets_hint(self, model: str) -> str:
        """What to do about a missing score set: the sets it has, named as ``--set`` takes them."""
        own = [sk for _, sk in self.score_sets(model)]
        others = {}
        for mk, sk in self.score_sets():
            if mk != model_key(model):
                others.setdefault(mk, []).append(sk)
        text = (f"Its score sets for this model (give one with --set): {', '.join(own)}." if own
                else "It has no score sets for this model: run `slide-clip zeroshot` or `fewshot` first.")
        if others:
            names = {}
            for mk in others:
                try:
                    names[mk] = self.embedding_attrs(mk).get("name", mk)
                except StoreError:
                    names[mk] = mk
            text += " Other models' sets (choose the model with --model): " + "; ".join(
                f"{', '.join(sets)} (--model {names[mk]})" for mk, sets in others.items()) + "."
        return text

    def score_attrs(self, model: str, set_name: str) -> dict:
        """A score set's attributes, checked to be a complete set (not its arrays: see :meth:`scores`)."""
        mk, sk = model_key(model), model_key(set_name)
        try:
            key = self._score_key(model, set_name)
            present = key in self.group
        except Exception:  # noqa: BLE001 - an unreadable zarr.json on the way
            key, present = f"scores/{mk}/{sk}", False
        if not present:
            if (self.path / key).exists():
                raise StoreError(f"is damaged: the score set {mk}/{sk} has no readable zarr.json", path=self.path,
                                 hint=_DAMAGED_SCORES)
            raise StoreError(f"has no score set {set_name!r} for model {model!r}", path=self.path,
                             hint=self._score_sets_hint(model))
        attrs = dict(self.group[key].attrs)
        if attrs.get("status") != STATUS_COMPLETE or not isinstance(attrs.get("classes"), list):
            raise StoreError(f"is damaged: the score set {mk}/{sk} is incomplete (no classes or status recorded; "
                             "left by an interrupted write of an older version)", path=self.path,
                             hint=_DAMAGED_SCORES)
        return attrs

    def scores(self, model: str, set_name: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """(probs, logits, attrs) of a complete score set, every array checked (shape, chunks, values)."""
        attrs = self.score_attrs(model, set_name)
        key = self._score_key(model, set_name)
        shape = (self._n_recorded(), len(attrs["classes"]))
        return (self.read(f"{key}/probs", shape=shape, hint=_DAMAGED_SCORES),
                self.read(f"{key}/logits", shape=shape, hint=_DAMAGED_SCORES), attrs)


class EmbeddingWriter:
    """Appends rows of embeddings in tile order and records progress.

    Rows are buffered and written a whole chunk at a time (or after ``flush_seconds``), then
    ``rows_written`` is advanced. The last write marks the group ``complete``.
    """

    def __init__(self, group: zarr.Group, n_tiles: int, flush_seconds: float = 60.0,
                 swap=None, guard=None, where=None):
        self.group = group
        self.swap = swap  # a callable putting a complete replacement in place of the old group
        self.guard = guard  # called before each write (a remote store: its claim must still be held)
        self.url = str(where) if where is not None else ""  # the store (its storage failures named by it)
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
        with _io(self.url):
            self._flush()

    def _flush(self) -> None:
        if self.guard is not None:
            self.guard()
        if self._buffered:
            data = np.concatenate(self._buf, axis=0)
            start = self.rows_written
            self.array[start:start + data.shape[0]] = data
            self.rows_written = start + data.shape[0]
            self._buf, self._buffered = [], 0
            self.group.attrs.update({"rows_written": self.rows_written, "updated": _now()})
            kill_point("rows-written")
        self._last_flush = time.monotonic()
        if self.rows_written == self.n and not self.complete:
            self.group.attrs.update({"status": STATUS_COMPLETE, "finished": _now()})
            self.swap_in()

    def swap_in(self) -> None:
        """Put a complete replacement group in place of the old one (nothing for a group written in place)."""
        if self.swap is not None:
            self.swap()
            self.swap = None


def _unit_rows(block: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return (block / np.where(norms > 0, norms, 1)).astype(np.float32)
