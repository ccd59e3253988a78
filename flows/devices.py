"""Every device of this machine in one command: a work pool of this run, one worker per device.

``slide-clip run --devices cuda:0,cuda:1`` (or ``all``) scales out on one machine through the
same Prefect machinery as a cluster: a ``process`` work pool made for the run, the shard
deployment registered on it, and one ``prefect worker`` per device, each started with
``SLIDE_CLIP_DEVICE`` set to its device and ``--limit 1`` (one shard, one executor, at a
time). The cohort flow hands the shards to the pool; each worker takes the next shard when its
last one ends, so the pool's queue of scheduled shard runs is the shared queue. The pool, the
deployment and the workers are removed when the run ends, however it ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from slide_clip.errors import ConfigError

#: The environment variable a device's worker passes to its shard runs (read by the shard flow).
DEVICE_ENV = "SLIDE_CLIP_DEVICE"


def parse_devices(text: str) -> list[str]:
    """``cuda:0,cuda:1`` -> the list; ``all`` -> every CUDA device here (an error without one)."""
    if text.strip().lower() == "all":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise ConfigError("--devices all: this machine has no CUDA device",
                              hint="Name the devices (e.g. --devices cpu,cpu to try two CPU executors), "
                                   "or leave --devices out.")
        return [f"cuda:{i}" for i in range(n)]
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise ConfigError(f"--devices {text!r}: name at least one device (cuda:0,cuda:1 or all)")
    for d in devices:
        if not (d == "cpu" or d == "mps" or d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
            raise ConfigError(f"--devices: {d!r} is not a device (cpu, cuda, cuda:N or mps)")
    return devices


@contextlib.contextmanager
def device_workers(devices: list[str], *, echo=print, log_dir: str | Path | None = None):
    """A process work pool for this run with one worker per device; yields the deployment name
    (``process-shard/<pool>``) to hand the shards to. Needs ``PREFECT_API_URL`` (``run``'s
    temporary server, or a real one)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from slide_clip_flows.deployments import register_shard_deployment

    pool = f"slide-clip-devices-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        # no encoder limit: each worker is one device and takes one shard at a time (--limit 1);
        # the per-host limit would let one device work at a time
        name = register_shard_deployment(pool, name=pool, encoder_limit=None)
        prefect = str(Path(sys.executable).with_name("prefect"))
        for i, dev in enumerate(devices):
            env = {**os.environ, DEVICE_ENV: dev, "PREFECT_WORKER_QUERY_SECONDS": "1",
                   "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
            log = open(Path(log_dir) / f"worker-{i}.log", "w") if log_dir else subprocess.DEVNULL
            logs.append(log)
            procs.append(subprocess.Popen([prefect, "worker", "start", "--pool", pool, "--limit", "1",
                                           "--name", f"{pool}-{i}-{dev}"], env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        echo(f"{len(devices)} executors, one per device ({', '.join(devices)}), on work pool {pool}")
        yield name
    finally:
        for p in procs:
            _stop(p)
        for f in logs:
            if f is not subprocess.DEVNULL:
                f.close()
        with contextlib.suppress(Exception), get_client(sync_client=True) as client:
            client.delete_work_pool(pool)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
