"""A bounded local cache of whole slides: the formats only OpenSlide reads, fetched from URLs.

OpenSlide reads local files only. Tiled TIFF/SVS slides are read by byte range
(:mod:`.remote_tiff`); every other format (MIRAX, NDPI, Philips, Ventana, DICOM folders...) is
staged: copied whole into this cache and opened there.

- **Bounded**: beyond ``max_bytes`` the least recently used slides are deleted (never one this
  process holds open, nor one used in the last :data:`MIN_AGE_S` seconds by any process).
- **Verified**: before a cached copy is used, the remote object's size and ETag (each file's,
  for a DICOM folder) are compared with those recorded when it was fetched; a changed slide
  is fetched again, never read stale. A copy is written under a temporary name and renamed
  into place when complete and of the right size.
- **Prefetch**: :meth:`SlideCache.prefetch` stages the next slides in background threads while
  the current one encodes (TRIDENT's ``--wsi_cache``); TIFF/SVS slides need no staging.

Layout: ``<cache>/<sha256(url)[:24]>/meta.json`` (``url``, ``files``: name -> size, etag) and
``<cache>/<key>/data/<name>`` (the file, or the folder of a DICOM series).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from slide_clip.errors import StorageError
from slide_clip.storage.failures import remote_errors
from slide_clip.storage.filesystems import filesystem
from slide_clip.storage.urls import url_name

#: An entry used this recently (by any process) is never evicted, seconds.
MIN_AGE_S = 60.0


def etag_of(info: dict) -> str:
    """The version tag of an fsspec info dict: ETag (S3, Azure), md5Hash (GCS), else LastModified."""
    return str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("LastModified") or "")


class SlideCache:
    """Whole local copies of remote slides, at most ``max_bytes`` in ``folder`` (see the module)."""

    def __init__(self, folder: str | Path, max_bytes: int):
        self.folder = Path(folder).expanduser()
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.misses = 0
        self.bytes_fetched = 0
        self.evicted = 0
        self._held: set[str] = set()
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ listing the remote side
    @staticmethod
    def remote_files(url: str) -> dict[str, dict]:
        """name -> fsspec info of the object at ``url``, or of each file directly in the folder ``url``
        (a folder's names end in ``/`` here never; a single object's dict has the key ``""``)."""
        fs, path = filesystem(url)
        with remote_errors(url):
            info = fs.info(path.rstrip("/"))
            if info.get("type") != "directory":
                return {"": info}
            files = {url_name(i["name"]): i for i in fs.ls(path.rstrip("/"), detail=True) if i.get("type") == "file"}
        if not files:
            raise StorageError("is an empty folder", path=url, hint="Give a slide, or a folder of one DICOM series.")
        return files

    def _key(self, url: str) -> str:
        return hashlib.sha256(str(url).rstrip("/").encode()).hexdigest()[:24]

    @property
    def hit_rate(self) -> float | None:
        n = self.hits + self.misses
        return self.hits / n if n else None

    # ------------------------------------------------------------------ staging
    def stage(self, url: str) -> Path:
        """The local path of a verified whole copy of ``url`` (a file, or a folder for a DICOM series)."""
        key = self._key(url)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            files = self.remote_files(url)
            entry = self.folder / key
            local = self._verified(entry, url, files)
            if local is not None:
                with self._lock:
                    self.hits += 1
                    self._held.add(key)
                return local
            with self._lock:
                self.misses += 1
            local = self._fetch(entry, url, files)
            with self._lock:
                self._held.add(key)
            self.evict()
            return local

    def release(self, url: str) -> None:
        """Let ``url``'s copy be evicted again (it is no longer open in this process)."""
        with self._lock:
            self._held.discard(self._key(url))

    @staticmethod
    def _data_path(entry: Path, url: str) -> Path:
        return entry / "data" / (url_name(url) or "slide")

    @staticmethod
    def _file(local: Path, name: str) -> Path:
        return local / name if name else local

    def _verified(self, entry: Path, url: str, files: dict) -> Path | None:
        try:
            meta = json.loads((entry / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        want = {n: {"size": int(i["size"]), "etag": etag_of(i)} for n, i in files.items()}
        local = self._data_path(entry, url)
        if meta.get("url") != str(url).rstrip("/") or meta.get("files") != want:
            return None
        for name, f in want.items():
            try:
                if self._file(local, name).stat().st_size != f["size"]:
                    return None
            except OSError:
                return None
        os.utime(entry / "meta.json")  # most recently used
        return local

    def _fetch(self, entry: Path, url: str, files: dict) -> Path:
        fs, path = filesystem(url)
        self.folder.mkdir(parents=True, exist_ok=True)
        part = self.folder / f".{entry.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            local = self._data_path(part, url)
            (local if "" not in files else local.parent).mkdir(parents=True, exist_ok=True)
            for name, info in files.items():
                target = self._file(local, name)
                with remote_errors(f"{str(url).rstrip('/')}/{name}" if name else url):
                    fs.get_file(info["name"], str(target))
                if target.stat().st_size != int(info["size"]):
                    raise StorageError(f"was fetched with {target.stat().st_size} bytes of {info['size']}",
                                       path=url, hint="Run again; the object may be changing.")
                with self._lock:
                    self.bytes_fetched += int(info["size"])
            (part / "meta.json").write_text(json.dumps({
                "url": str(url).rstrip("/"), "fetched": time.time(),
                "files": {n: {"size": int(i["size"]), "etag": etag_of(i)} for n, i in files.items()}}))
            shutil.rmtree(entry, ignore_errors=True)
            os.rename(part, entry)
        finally:
            shutil.rmtree(part, ignore_errors=True)
        return self._data_path(entry, url)

    # ------------------------------------------------------------------ eviction
    def entries(self) -> list[tuple[float, int, Path]]:
        """(last used, bytes, folder) of every cached slide, least recently used first."""
        out = []
        if not self.folder.is_dir():
            return out
        for e in self.folder.iterdir():
            meta = e / "meta.json"
            if e.name.startswith(".") or not meta.is_file():
                continue
            size = sum(f.stat().st_size for f in e.rglob("*") if f.is_file())
            out.append((meta.stat().st_mtime, size, e))
        return sorted(out)

    def evict(self) -> None:
        """Delete least recently used copies until the cache holds at most ``max_bytes``."""
        entries = self.entries()
        total = sum(s for _, s, _ in entries)
        now = time.time()
        for used, size, e in entries:
            if total <= self.max_bytes:
                break
            with self._lock:
                held = e.name in self._held
            if held or now - used < MIN_AGE_S:
                continue
            shutil.rmtree(e, ignore_errors=True)
            total -= size
            with self._lock:
                self.evicted += 1

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, urls, workers: int = 2) -> list[Future]:
        """Stage each of ``urls`` that needs staging, in background threads; returns their futures
        (a future's exception is the slide's own error, raised again when it is opened)."""
        from slide_clip.storage.remote_tiff import needs_staging

        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="slide-prefetch")
        out = []
        for url in urls:
            out.append(self._pool.submit(lambda u=url: self.stage(u) if needs_staging(u) else None))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


_default: SlideCache | None = None
_default_lock = threading.Lock()


def default_cache() -> SlideCache:
    """The process's cache, from the ``storage`` settings (``cache_dir``, ``cache_max_gb``)."""
    global _default
    from slide_clip.storage.options import current

    st = current()
    folder = Path(st.cache_dir or Path.home() / ".cache" / "slide-clip" / "slides").expanduser()
    with _default_lock:
        if _default is None or _default.folder != folder or _default.max_bytes != int(st.cache_max_gb * 2**30):
            _default = SlideCache(folder, int(st.cache_max_gb * 2**30))
        return _default


def prefetch(urls) -> list[Future]:
    """Stage the next slides (URLs; local paths are skipped) in the background: see :meth:`SlideCache.prefetch`."""
    from slide_clip.storage.urls import is_url

    return default_cache().prefetch([u for u in urls if is_url(u)])
