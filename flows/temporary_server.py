"""The temporary Prefect server of ``slide-clip run``: started for one run, gone with it.

Prefect starts a temporary ("ephemeral") server by itself when ``PREFECT_API_URL`` is unset,
but that server is a plain child process stopped by an ``atexit`` hook: a run killed with
SIGKILL (or by the out-of-memory killer) leaves it running for ever, and when it fails to
start the user gets a traceback. This module starts the same server (uvicorn serving
``prefect.server.api.server:create_app`` in ephemeral mode, the settings Prefect passes) in a
child that ends when its parent is gone:

- on Linux the child asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``);
- everywhere, a watchdog thread in the child checks once a second that its parent is still
  the process that started it, and stops the server otherwise.

A server that does not start within ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (if
set; else 90 s, wall-clock) or exits early raises
:class:`PrefectServerError`: one line saying what happened and what to do.

Run as ``python -m slide_clip_flows.temporary_server PORT PARENT_PID`` (the child side).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from slide_clip.errors import SlideClipError

#: How often the child's watchdog checks its parent, seconds.
WATCHDOG_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1


class PrefectServerError(SlideClipError):
    """The temporary Prefect server could not be started."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


#: Seconds to wait for the server when ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` is
#: not set. Prefect's own default (20) counts only its polling sleeps; this is wall-clock
#: time, and a busy 2-core machine was seen to need more than 20 s.
DEFAULT_STARTUP_TIMEOUT = 90.0


def _startup_timeout() -> float:
    """Prefect's startup timeout setting where the user set it, else :data:`DEFAULT_STARTUP_TIMEOUT`."""
    from prefect.settings import get_current_settings

    ephemeral = get_current_settings().server.ephemeral
    if "startup_timeout_seconds" in ephemeral.model_fields_set:
        return float(ephemeral.startup_timeout_seconds)
    return DEFAULT_STARTUP_TIMEOUT


def _server_env() -> dict[str, str]:
    """The environment Prefect gives its own temporary server (UI off, ephemeral services)."""
    from prefect.settings import get_current_settings

    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    return env


_RETRY_HINT = ("retry, or start a server with `prefect server start` and set "
               "PREFECT_API_URL=http://127.0.0.1:4200/api")


def start(timeout: float | None = None, on_start=None) -> tuple[subprocess.Popen, str, Path]:
    """Start the server; returns (process, API URL, log file). Raises PrefectServerError."""
    timeout = _startup_timeout() if timeout is None else timeout
    log = Path(tempfile.mkstemp(prefix="slide-clip-prefect-server-", suffix=".log")[1])
    for attempt in range(3):
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        with open(log, "wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "slide_clip_flows.temporary_server", str(port),
                                     str(os.getpid())], env=_server_env(), stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        if on_start:
            on_start(proc, url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _healthy(url):
                return proc, url, log
            time.sleep(0.2)
        if proc.poll() is None:  # still starting: too slow
            _stop(proc)
            raise PrefectServerError(
                f"the temporary Prefect server did not answer within {timeout:g} s "
                f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)",
                hint=f"The machine may be busy: {_RETRY_HINT}, or raise that timeout.")
        if proc.returncode == 3 and attempt < 2:  # uvicorn: the port was taken meanwhile
            continue
        break
    detail = _last_line(log)
    raise PrefectServerError(
        f"the temporary Prefect server exited at start (exit code {proc.returncode}"
        + (f": {detail}" if detail else "") + f"; full log {log})",
        hint=f"Check that PREFECT_HOME ({_prefect_home()}) is a writable folder, then {_RETRY_HINT}.")


def _prefect_home() -> str:
    from prefect.settings import get_current_settings

    return str(get_current_settings().home)


@contextlib.contextmanager
def temporary_server(echo=None):
    """Use the server at ``PREFECT_API_URL`` if set; else start a temporary one for the block.

    ``echo`` (a callable taking one line) is told where the temporary server is.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value():
        yield None
        return
    if echo:
        echo("Prefect: starting a temporary server (tens of seconds; set PREFECT_API_URL to use your own)")
    t0 = time.monotonic()
    proc, url, log = start()
    if echo:
        echo(f"Prefect: temporary server at {url} after {time.monotonic() - t0:.0f} s (ends with this run)")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        _drain_to_server()
        os.environ.pop("PREFECT_API_URL", None)
        _stop(proc)
        with contextlib.suppress(OSError):
            log.unlink()


def _drain_to_server(timeout: float = 10.0) -> None:
    """Send the logs and events still queued for the server before it stops (else Prefect
    prints "Error logging to API" at exit)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


# ----------------------------------------------------------------------------- child side
def _die_with_parent(parent: int) -> None:
    """Stop this process when ``parent`` is gone (kernel signal on Linux, watchdog everywhere)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request above
        os._exit(0)

    def watch():
        while os.getppid() == parent:
            time.sleep(WATCHDOG_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down cleanly on SIGTERM
        time.sleep(15)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    port, parent = (int(x) for x in (argv or sys.argv[1:]))
    _die_with_parent(parent)
    import uvicorn

    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=port,
                log_level="error", lifespan="on")


if __name__ == "__main__":
    main()
