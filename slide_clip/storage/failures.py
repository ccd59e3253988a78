"""A storage service's refusal, or a lost connection, as one line naming the URL.

s3fs, gcsfs and adlfs raise ``FileNotFoundError``, ``PermissionError``, ``OSError`` and the
HTTP stacks' own errors (botocore, aiohttp), several layers deep. :func:`storage_error` reads
the chain and says what happened in the user's terms: the bucket does not exist, the object
does not exist, the credentials are refused, the service throttled every retry, the
connection was cut. Throttling and cut connections are retried with backoff by the clients
first (botocore and s3fs, several attempts each); this is what is left after them.
"""

from __future__ import annotations

from contextlib import contextmanager

from slide_clip.errors import SlideClipError, StorageError

_CREDENTIALS = ("Check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, "
                "storage.profile) and that they may {action} this bucket.")
_AGAIN = "Run the same command again when the service is reachable: finished work is kept and partial stores resume."

_THROTTLED = ("SlowDown", "reduce your request rate", "Throttl", "TooManyRequests", "RequestLimitExceeded")
_CONNECTION = ("ConnectionClosedError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
               "ClientPayloadError", "ServerDisconnectedError", "ClientConnectorError", "ClientOSError",
               "ContentLengthError", "IncompleteRead", "ConnectionError", "ConnectionResetError",
               "ConnectionRefusedError", "BrokenPipeError", "TimeoutError", "ProtocolError")


def _chain(exc: BaseException):
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _code(e: BaseException) -> str | None:
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        return (response.get("Error") or {}).get("Code")
    return None


def storage_error(exc: BaseException, url, action: str = "read") -> StorageError | None:
    """A :class:`StorageError` about ``url`` for ``exc`` if it is a storage failure, else None.

    ``action``: what was being done (``read``, ``write``, ``list``), for the message.
    """
    if isinstance(exc, SlideClipError):
        return None
    chain = list(_chain(exc))
    names = {type(e).__name__ for e in chain}
    codes = {c for c in (_code(e) for e in chain) if c}
    text = " ".join(str(e) for e in chain)
    if codes & {"NoSuchBucket"} or "specified bucket does not exist" in text:
        return StorageError(f"cannot {action}: the bucket does not exist", path=url,
                            hint="Check the bucket's name and the endpoint (storage.endpoint_url), or create the bucket.")
    if "NoCredentialsError" in names or "Unable to locate credentials" in text:
        return StorageError(f"cannot {action}: no credentials were found", path=url,
                            hint="Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile (storage.profile), or "
                                 "storage.anonymous: true for a public bucket.")
    if any(t in text for t in _THROTTLED) or codes & {"503", "SlowDown"}:
        return StorageError(f"cannot {action}: the service throttled the requests (SlowDown) through every retry",
                            path=url, hint="Run again with fewer workers or shards at a time; finished work is kept.")
    if isinstance(exc, PermissionError) or codes & {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                                      "403", "AllAccessDisabled", "InvalidToken", "ExpiredToken"}:
        what = {"InvalidAccessKeyId": "the access key is unknown to the service",
                "SignatureDoesNotMatch": "the secret key does not match the access key",
                "ExpiredToken": "the session token has expired"}
        why = next((what[c] for c in codes if c in what), "access denied (403): the credentials are invalid or lack "
                                                           "permission")
        return StorageError(f"cannot {action}: {why}", path=url, hint=_CREDENTIALS.format(action=action))
    if isinstance(exc, FileNotFoundError) or codes & {"NoSuchKey", "404"}:
        return StorageError(f"cannot {action}: no such object", path=url, hint="Check the URL.")
    if names & set(_CONNECTION) or isinstance(exc, (ConnectionError, TimeoutError)):
        return StorageError(f"cannot {action}: the connection to the storage service was lost or refused "
                            f"({next(iter(sorted(names & set(_CONNECTION))), type(exc).__name__)})", path=url,
                            hint=_AGAIN)
    return None


@contextmanager
def remote_errors(url, action: str = "read"):
    """Re-raise storage failures inside the block as one-line :class:`StorageError` s about ``url``."""
    try:
        yield
    except SlideClipError:
        raise
    except Exception as exc:  # noqa: BLE001 - only storage failures are translated; others go on
        err = storage_error(exc, url, action)
        if err is None:
            raise
        raise err from None
