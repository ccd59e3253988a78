"""Running the viewer: uvicorn on a socket bound here, loopback unless the user says otherwise."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from slide_clip.errors import ConfigError
from slide_clip.storage.urls import absolute

#: Default port; 0 asks the system for a free one.
DEFAULT_PORT = 8765

REMOTE_WARNING = ("warning: the viewer is reachable from other machines at {url}: anyone who can reach this "
                  "address sees every slide of {out} and can write label sets and score sets. There is no login.")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (one line when the address is taken or not ours)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e})",
                          hint="Choose another --port (0 picks a free one).") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def serve(out: str | Path, cfg, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, model: str | None = None,
          allow_remote: bool = False, echo=print) -> None:
    """Serve the viewer of output folder ``out`` until interrupted; prints its address first.

    A host that is not a loopback address needs ``allow_remote`` and prints a warning.
    """
    import uvicorn

    from slide_clip.viewer.app import create_app

    remote = not is_loopback(host)
    if remote and not allow_remote:
        raise ConfigError(f"--host {host} would serve the slides to other machines",
                          hint="Add --allow-remote to do it on purpose, or leave --host at 127.0.0.1.")
    app = create_app(out, cfg, model=model, allowed_hosts=["*"] if remote else None)
    sock = bind(host, port)
    url = url_of(sock, host)
    if remote:
        echo(REMOTE_WARNING.format(url=url, out=absolute(out)))
    echo(f"slide-clip viewer of {absolute(out)}: {url}  (Ctrl-C stops it)")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
