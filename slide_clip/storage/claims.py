"""Who writes a store on object storage: a claim object, written conditionally, renewed, expiring.

A local store is written under an OS file lock (``store_lock``, ``flock``), which means nothing
on S3. There, a store at ``<url>`` belongs to the run that holds ``<url>.claim``:

- **Taking it**: the claim is written with ``If-None-Match: *`` (a conditional PUT: the service
  writes it only if no object of that name exists), so of two runs exactly one succeeds.
- **Holding it**: the holder rewrites it every ``ttl / 3`` seconds with ``If-Match: <its ETag>``
  (it fails if anyone else has written it since). The claim records holder token, host, pid,
  start and the ``ttl_s`` it is renewed within.
- **Expiry**: a claim not rewritten for ``ttl_s`` seconds, by the service's own clock (its
  ``Last-Modified`` against the ``Date`` of the response: no two machines' clocks are
  compared), is expired; another run takes it with ``If-Match: <the expired claim's ETag>``
  (of several such runs one wins). A killed run's slides are thus taken again after ``ttl_s``.
- **Never two writers**: the holder writes only while less than ``ttl_s - margin`` has passed
  since its last successful renewal *began* (:func:`check_claimed`, called before every write
  of a remote store: rows, attributes, a pointer): it stops before anyone may take the claim.
  A renewal refused (``412``: the claim was taken) marks it lost at once.
- **Release**: at the end the holder deletes the claim if it still holds it.

Conditional writes are S3's (AWS S3, MinIO, Ceph RGW, moto). :func:`claim` has
``store_lock``'s interface (``with claim(url, wait=...)``), so a caller can use either
(:func:`slide_clip.storage.owner.store_owner` picks).
"""

from __future__ import annotations

import email.utils
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

from slide_clip.errors import StorageError, StoreBusyError, StoreError
from slide_clip.storage.failures import remote_errors
from slide_clip.storage.filesystems import filesystem, protocol_of

CLAIM_SUFFIX = ".claim"

_held: dict[str, "Claim"] = {}
_held_lock = threading.Lock()


def claim_url(store_url: str) -> str:
    return f"{str(store_url).rstrip('/')}{CLAIM_SUFFIX}"


def _norm(url) -> str:
    return str(url).rstrip("/")


def _margin(ttl: float) -> float:
    return max(2.0, ttl / 5)


class _S3Claims:
    """Conditional PUT, HEAD and DELETE of one claim object through s3fs's client."""

    def __init__(self, url: str):
        self.url = url
        if protocol_of(url) not in ("s3", "s3a"):
            raise StorageError("cannot be claimed: ownership on object storage needs S3's conditional writes "
                               "(AWS S3, MinIO, Ceph)", path=url,
                               hint="Write the stores to an s3:// URL or a local folder.")
        self.fs, path = filesystem(url)
        self.bucket, _, self.key = path.partition("/")

    def _call(self, method: str, **kw):
        return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kw)

    def create(self, body: bytes) -> str | None:
        """Write the claim if none exists: its ETag, or None if one exists."""
        try:
            return self._call("put_object", Body=body, IfNoneMatch="*")["ETag"]
        except (FileExistsError, OSError) as e:
            if _precondition(e):
                return None
            raise

    def replace(self, body: bytes, etag: str) -> str | None:
        """Rewrite the claim if its ETag is still ``etag``: the new ETag, or None if it changed."""
        try:
            return self._call("put_object", Body=body, IfMatch=etag)["ETag"]
        except (FileExistsError, FileNotFoundError, OSError) as e:
            if _precondition(e) or isinstance(e, FileNotFoundError):
                return None
            raise

    def read(self) -> tuple[dict, str, float] | None:
        """(content, ETag, age in seconds by the service's clock), or None if there is no claim."""
        try:
            r = self._call("get_object")
        except FileNotFoundError:
            return None
        data = _read_body(self.fs, r["Body"])
        headers = r.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        now = email.utils.parsedate_to_datetime(headers["date"]) if "date" in headers else datetime.now(timezone.utc)
        age = (now - r["LastModified"]).total_seconds()
        try:
            content = json.loads(data)
        except ValueError:
            content = {}
        return content, r["ETag"], age

    def delete(self) -> None:
        try:
            self._call("delete_object")
        except FileNotFoundError:
            pass


def _read_body(fs, body) -> bytes:
    from fsspec.asyn import sync

    async def read():
        return await body.read()

    return sync(fs.loop, read)


def _precondition(e: BaseException) -> bool:
    seen = e
    while seen is not None:
        if isinstance(seen, FileExistsError) or "PreconditionFailed" in str(seen) or "412" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Claim:
    """A held claim on a remote store (see the module): renewed in a background thread until released."""

    def __init__(self, store_url: str, ttl: float):
        self.store_url = _norm(store_url)
        self.url = claim_url(store_url)
        self.ttl = float(ttl)
        self.token = uuid.uuid4().hex
        self.since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.etag: str | None = None
        self.renewed_at = 0.0  # time.monotonic() at which the last successful write began
        self.lost: str | None = None
        self.took_over: dict | None = None
        self._api = _S3Claims(self.url)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def body(self) -> bytes:
        return json.dumps({"holder": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "since": self.since, "renewed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "ttl_s": self.ttl, "store": self.store_url}).encode()

    @property
    def valid(self) -> bool:
        return self.lost is None and time.monotonic() - self.renewed_at < self.ttl - _margin(self.ttl)

    def renew(self) -> bool:
        """Rewrite the claim (only if it is still ours); False, and :attr:`lost` set, if it was taken."""
        began = time.monotonic()
        try:
            etag = self._api.replace(self.body(), self.etag)
        except Exception:  # noqa: BLE001 - a network failure: try again; validity runs out on its own
            return self.valid
        if etag is None:
            self.lost = "another run took the claim (it had expired)"
            return False
        self.etag, self.renewed_at = etag, began
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            if not self.renew() and self.lost:
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name=f"claim {self.store_url}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost is None:
            try:
                found = self._api.read()
                if found is not None and found[0].get("holder") == self.token:
                    self._api.delete()
            except Exception:  # noqa: BLE001 - it expires on its own
                pass

    def check(self) -> None:
        """Raise :class:`StoreBusyError` unless the claim is still held (see :func:`check_claimed`)."""
        if self.lost is not None or not self.valid:
            why = self.lost or (f"it was not renewed for {time.monotonic() - self.renewed_at:.0f} s "
                                f"(expiry {self.ttl:.0f} s)")
            raise StoreBusyError(f"is no longer this run's to write: {why}", path=self.store_url,
                                 hint="Nothing more is written by this run; the run that holds the claim now "
                                      "finishes the slide (run again to check).")


def _holder(content: dict) -> str:
    try:
        return f"pid {content['pid']} on host {content['host']} since {content['since']}"
    except (KeyError, TypeError):
        return "an unknown run"


def acquire(store_url: str, wait: float = 0.0, ttl: float | None = None) -> Claim:
    """Take the claim of ``store_url`` (waiting up to ``wait`` seconds for a live one to end or expire)."""
    from slide_clip.storage.options import current

    c = Claim(store_url, ttl if ttl is not None else current().claim_ttl_s)
    deadline = time.monotonic() + wait
    with remote_errors(c.url, "write"):
        while True:
            began = time.monotonic()
            etag = c._api.create(c.body())
            if etag is not None:
                c.etag, c.renewed_at = etag, began
                return c
            found = c._api.read()
            if found is not None:
                content, their_etag, age = found
                their_ttl = float(content.get("ttl_s") or c.ttl) if isinstance(content, dict) else c.ttl
                if age > their_ttl:  # expired: take it over, unless another run does first
                    began = time.monotonic()
                    etag = c._api.replace(c.body(), their_etag)
                    if etag is not None:
                        c.etag, c.renewed_at, c.took_over = etag, began, content
                        return c
                    continue
                if time.monotonic() >= deadline:
                    raise StoreBusyError(
                        f"is being written by another run ({_holder(content)}; claim {c.url.rsplit('/', 1)[-1]}, "
                        f"renewed {age:.0f} s ago, expires {their_ttl:.0f} s after its last renewal)",
                        path=store_url, hint="Wait for it to finish, or write to another --out. A run that was "
                                             "killed loses its claim when it expires.")
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


@contextmanager
def claim(store_url, wait: float = 0.0, ttl: float | None = None):
    """Hold the claim of the remote store ``store_url`` for the block (``store_lock``'s interface).

    Yields the :class:`Claim`. Another run holding a live claim is a :class:`StoreBusyError`
    after ``wait`` seconds; one whose claim expired is taken over.
    """
    c = acquire(str(store_url), wait, ttl)
    key = _norm(store_url)
    with _held_lock:
        _held[key] = c
    c.start()
    try:
        yield c
    finally:
        with _held_lock:
            if _held.get(key) is c:
                del _held[key]
        c.release()


def held(store_url) -> Claim | None:
    """This process's claim on ``store_url``, if it holds one."""
    with _held_lock:
        return _held.get(_norm(store_url))


def check_claimed(store_url) -> None:
    """Before a write into a remote store: this process must hold its claim, still valid.

    A write without the claim is a :class:`StoreError` (a bug of the caller: every writer
    claims first); a claim lost or run out is a :class:`StoreBusyError`.
    """
    c = held(store_url)
    if c is None:
        raise StoreError("is at a URL and this process does not hold its claim: refusing to write",
                         path=str(store_url), hint="Writers of remote stores hold `claim(store)` "
                                                   "(slide_clip.storage.owner.store_owner) while they write.")
    c.check()


