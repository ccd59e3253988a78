"""Prefect global concurrency limits that hold a machine's (or a GPU's) device for one shard at a time."""

import contextlib
import os
import socket

from slide_clip.errors import ConfigError

_ensured: set[str] = set()

#: Seconds a held slot outlives its holder (Prefect renews the lease while the holder lives).
LEASE_SECONDS = 60


def limit_name(template: str) -> str:
    """The concurrency limit's name here: ``{host}`` is the machine's name, ``{gpu}`` the
    process's ``CUDA_VISIBLE_DEVICES`` (``all`` if unset), for one worker per GPU."""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip().replace(",", "+") or "all"
    try:
        return template.format(host=socket.gethostname(), gpu=gpu)
    except (KeyError, IndexError, ValueError):
        raise ConfigError(f"encoder limit name {template!r} may only use the fields {{host}} and {{gpu}}") from None


def ensure_limit(name: str, slots: int = 1) -> None:
    """Create the global concurrency limit ``name`` with ``slots`` unless it exists.

    Prefect treats a limit that does not exist as no limit at all, so a worker on a new
    machine would otherwise run encoders side by side on one GPU.
    """
    if name in _ensured:
        return
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        except ObjectAlreadyExists:
            pass
    _ensured.add(name)


@contextlib.contextmanager
def hold_limit(template: str | None):
    """Hold one slot of the limit named by ``template`` (nothing when None) for the block.

    Yields the ``[start, end]`` list of the window in which the slot was held (end appended
    on leaving), epoch seconds.
    """
    import time

    window: list[float] = []
    if not template:
        yield window
        return
    from prefect.concurrency.sync import concurrency

    name = limit_name(template)
    ensure_limit(name)
    # a short lease, renewed while the shard runs: a shard run killed while holding the slot
    # (kill -9, a lost worker) frees it within a minute instead of Prefect's default five
    with concurrency(name, occupy=1, lease_duration=LEASE_SECONDS):
        window.append(time.time())
        try:
            yield window
        finally:
            window.append(time.time())
