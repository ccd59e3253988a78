"""Whether the Hugging Face hub can be reached, found out in about a second, before any download.

Without a network the hub client retries every request for about 50 s before it gives up
(``huggingface_hub``'s backoff; open_clip and transformers call it). So before weights are
fetched from the hub, :func:`check_hub` decides once per process (remembered for a minute):

- ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) is honoured as it is: offline;
- else one TCP connection to the hub endpoint (``HF_ENDPOINT``, or the HTTPS proxy when one is
  set) is tried with a short timeout (name look-up included, in a thread), so a machine
  without network knows in about :data:`PROBE_SECONDS`.

Offline, the hub client is put in offline mode for the rest of the process (files already in
the local cache still load, without a request), and weights that are not in the cache fail at
once with the line that names ``--checkpoint``. Nothing here imports torch or open_clip.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from slide_clip.errors import WeightsError

#: Seconds the reachability probe waits for a TCP connection (name look-up included).
PROBE_SECONDS = 2.0
#: Seconds a probe's answer is remembered.
_REMEMBER_S = 60.0
_DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "on", "yes", "true"}

_last: tuple[float, bool, str] | None = None
_lock = threading.Lock()


def offline_by_setting() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for offline mode."""
    return any((os.environ.get(v) or "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _target() -> tuple[str, int]:
    """(host, port) a download would connect to first: the HTTPS proxy if set, else the endpoint."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy if proxy else (os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT))
    host = url.hostname or "huggingface.co"
    return host, url.port or (443 if url.scheme == "https" or not proxy else 80)


def _connects(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """Whether a TCP connection to (host, port) opens within ``timeout`` s, and why not."""
    answer: list[tuple[bool, str]] = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answer.append((True, ""))
        except OSError as e:
            answer.append((False, f"{host}:{port}: {e.strerror or e}"))

    t = threading.Thread(target=probe, name="hub-probe", daemon=True)  # getaddrinfo has no timeout
    t.start()
    t.join(timeout)
    return answer[0] if answer else (False, f"{host}:{port}: no answer within {timeout:g} s")


def hub_reachable(timeout: float = PROBE_SECONDS) -> tuple[bool, str]:
    """(reachable, why not) for the hub, by the setting or one quick probe (remembered a minute)."""
    global _last
    if offline_by_setting():
        return False, "HF_HUB_OFFLINE is set"
    with _lock:
        now = time.monotonic()
        if _last is not None and now - _last[0] < _REMEMBER_S:
            return _last[1], _last[2]
        ok, why = _connects(*_target(), timeout)
        _last = (time.monotonic(), ok, why)
        return ok, why


def go_offline() -> None:
    """Put the hub client in offline mode for this process (and the processes it starts):
    cached files load without a request; anything else fails at once instead of retrying."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True  # read at every request
    except ImportError:  # pragma: no cover - a dependency of open_clip
        pass


def repo_cached(repo: str) -> bool:
    """Whether the local Hugging Face cache holds any downloaded file of ``repo`` (a model)."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name
    except ImportError:  # pragma: no cover
        return False
    snaps = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "snapshots"
    try:
        return any(f.is_file() for f in snaps.rglob("*"))
    except OSError:
        return False


def hub_repos(spec) -> list[str]:
    """The hub repositories ``spec``'s weights or architecture would be fetched from (none for
    random weights and local files). open_clip's ``pretrained:`` tags are fetched by open_clip
    from places of its own: listed only when the registry names their ``hub_id``."""
    repos = []
    if spec.weights_kind == "hf-hub":
        repos.append(spec.weights[len("hf-hub:"):])
    elif spec.weights_kind == "pretrained" and spec.hub_id:
        repos.append(spec.hub_id)
    if spec.weights_kind != "file" and spec.arch.startswith("hf-hub:"):
        repos.append(spec.arch[len("hf-hub:"):])
    return list(dict.fromkeys(repos))


def offline_error(spec, repo: str, why: str) -> WeightsError:
    """The one line for weights that are on the hub when the hub cannot be reached."""
    gated = " (gated: accept its licence on the hub first)" if spec.gated else ""
    return WeightsError(
        f"model {spec.name!r}: its weights are on the Hugging Face hub ({repo}){gated}, which cannot be reached "
        f"from here ({why}), and they are not in the local cache",
        hint=(f"Download them on a machine with network access and give the file with --checkpoint FILE "
              f"(see `slide-clip models`), or try the pipeline with --model random:{spec.name} (random weights: "
              "not a trained model)."))


def check_hub(spec) -> None:
    """Before fetching ``spec``'s weights: offline (by setting or probe), go offline for the
    process and fail at once if they are not in the local cache. A no-op for local weights."""
    repos = hub_repos(spec)
    if not repos and spec.weights_kind != "pretrained":
        return
    ok, why = hub_reachable()
    if ok:
        return
    go_offline()  # open_clip's own downloads then fail at once too, or load from its cache
    for repo in repos:
        if not repo_cached(repo):
            raise offline_error(spec, repo, why)
