"""Byte ranges of a remote file, and a sparse local mirror of the ranges read.

:class:`RemoteFile` reads byte ranges of one object (one ranged GET each; contiguous ranges
read together are merged into one request), and counts the bytes it received.

:class:`SparseMirror` is a local file of the object's size in which only the ranges fetched so
far hold data (the rest are holes: no disk used). It serves two readers:

- tifffile parses the TIFF header and directories through :meth:`SparseMirror.file` (a
  file object whose reads fetch the missing :data:`BLOCK` -aligned blocks first);
- OpenSlide opens the mirror's path as if it were the slide: its reads of the header, the
  directories and tag values find the bytes fetched for tifffile (all of them are filled
  first, see :mod:`.remote_tiff`), and every pixel read goes through a handle that fills the
  file tiles it needs before OpenSlide reads them. OpenSlide thus decodes exactly the bytes
  of the remote file, and never a hole.
"""

from __future__ import annotations

import bisect
import io
import os
import tempfile
import threading

from slide_clip.errors import StorageError
from slide_clip.storage.failures import remote_errors
from slide_clip.storage.filesystems import filesystem

#: Granularity of header reads, bytes: a TIFF's tag values lie near each other; one GET of a
#: block serves many of tifffile's small reads.
BLOCK = 64 * 1024


def merge_ranges(ranges, gap: int = 0) -> list[tuple[int, int]]:
    """``(start, end)`` ranges sorted and merged where they overlap or lie at most ``gap`` apart."""
    out: list[list[int]] = []
    for s, e in sorted((int(s), int(e)) for s, e in ranges if e > s):
        if out and s <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


class RemoteFile:
    """One remote object read by byte range: :attr:`size`, :attr:`etag`, :meth:`pread`, :meth:`pread_many`.

    :attr:`bytes_read` and :attr:`requests` count what was received (for benchmarks and tests).
    """

    def __init__(self, url: str, info: dict | None = None):
        self.url = str(url)
        self.fs, self.path = filesystem(self.url)
        if info is None:
            with remote_errors(self.url):
                info = self.fs.info(self.path)
        if info.get("type") == "directory":
            raise IsADirectoryError(self.url)
        self.size = int(info["size"])
        self.etag = str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or "")
        self.bytes_read = 0
        self.requests = 0
        self._lock = threading.Lock()

    def _count(self, n: int, k: int = 1) -> None:
        with self._lock:
            self.bytes_read += n
            self.requests += k

    def pread(self, size: int, offset: int) -> bytes:
        """``size`` bytes at ``offset`` (``os.pread``'s argument order); a short read is a StorageError."""
        return self.pread_many([(offset, offset + size)])[0]

    def pread_many(self, ranges) -> list[bytes]:
        """The bytes of each ``(start, end)`` range, fetched concurrently, contiguous ranges in one request."""
        ranges = [(int(s), int(e)) for s, e in ranges]
        if not ranges:
            return []
        merged = merge_ranges(ranges)
        with remote_errors(self.url):
            if len(merged) == 1:
                blobs = [self.fs.cat_file(self.path, start=merged[0][0], end=merged[0][1])]
            else:
                blobs = self.fs.cat_ranges([self.path] * len(merged), [s for s, _ in merged], [e for _, e in merged],
                                           on_error="raise")
        for (s, e), b in zip(merged, blobs):
            if isinstance(b, BaseException):
                with remote_errors(self.url):
                    raise b
            if len(b) != e - s:
                raise StorageError(f"returned {len(b)} bytes for the range {s}-{e} ({e - s} bytes asked): the object "
                                   "changed or is truncated", path=self.url, hint="Copy the slide to the bucket again.")
        self._count(sum(len(b) for b in blobs), len(merged))
        starts = [s for s, _ in merged]
        out = []
        for s, e in ranges:
            k = bisect.bisect_right(starts, s) - 1
            out.append(bytes(memoryview(blobs[k])[s - merged[k][0]: e - merged[k][0]]))
        return out


class SparseMirror:
    """A local sparse file of ``remote``'s size holding the byte ranges fetched so far (see the module)."""

    def __init__(self, remote: RemoteFile, folder: str | None = None, suffix: str = ""):
        self.remote = remote
        fd, self.path = tempfile.mkstemp(prefix=".slide-clip-mirror-", suffix=suffix, dir=folder)
        self._fd = fd
        os.ftruncate(fd, remote.size)
        self._have: list[tuple[int, int]] = []  # merged, sorted
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.remote.size

    def covered(self, start: int, end: int) -> bool:
        """Whether bytes ``start:end`` are all in the mirror."""
        if end <= start:
            return True
        k = bisect.bisect_right(self._have, (start, float("inf"))) - 1
        return k >= 0 and self._have[k][0] <= start and self._have[k][1] >= end

    def missing(self, ranges) -> list[tuple[int, int]]:
        """The parts of ``ranges`` not in the mirror yet."""
        out = []
        for s, e in merge_ranges(ranges):
            s, e = max(0, s), min(self.size, e)
            pos = s
            for hs, he in self._have:
                if he <= pos:
                    continue
                if hs >= e:
                    break
                if hs > pos:
                    out.append((pos, hs))
                pos = max(pos, he)
                if pos >= e:
                    break
            if pos < e:
                out.append((pos, e))
        return out

    def ensure(self, ranges) -> int:
        """Fetch the parts of ``ranges`` the mirror lacks into it; returns the bytes fetched."""
        with self._lock:
            need = self.missing(ranges)
            if not need:
                return 0
            blobs = self.remote.pread_many(need)
            for (s, _), b in zip(need, blobs):
                os.pwrite(self._fd, b, s)
            self._have = merge_ranges(self._have + need)
            return sum(len(b) for b in blobs)

    def read(self, offset: int, size: int) -> bytes:
        """Bytes ``offset:offset + size`` (clipped to the file), fetching missing :data:`BLOCK` s first."""
        end = min(self.size, offset + size)
        if end <= offset:
            return b""
        if not self.covered(offset, end):
            self.ensure([(offset // BLOCK * BLOCK, min(self.size, -(-end // BLOCK) * BLOCK))])
        return os.pread(self._fd, end - offset, offset)

    def file(self) -> io.BufferedReader:
        """A read-only file object over the remote bytes (for tifffile)."""
        return io.BufferedReader(_MirrorRaw(self), buffer_size=BLOCK)

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass


class _MirrorRaw(io.RawIOBase):
    def __init__(self, mirror: SparseMirror):
        self._m = mirror
        self._pos = 0
        self.name = mirror.remote.url

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._m.size}[whence]
        self._pos = max(0, base + int(offset))
        return self._pos

    def readinto(self, b) -> int:
        data = self._m.read(self._pos, len(b))
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)
