"""Storage options: the ``storage:`` config section and ``--storage-options``, applied process-wide.

A URL alone must be enough to reach an object wherever it is opened: in a loader's reader
process, in a Prefect task, in a notebook. So the options are set once per process with
:func:`configure` (the command line does it from the config and ``--storage-options``) and
also exported in ``SLIDE_CLIP_STORAGE_OPTIONS`` (JSON), which child processes inherit and read.

``--storage-options`` takes a JSON object (``'{"endpoint_url": "http://minio:9000"}'``) or a
list of ``key=value`` (``endpoint_url=http://minio:9000,anonymous=true``); values that read as
JSON (``true``, ``3``, ``{...}``) are taken as such. The keys ``endpoint_url`` (or
``endpoint``), ``profile``, ``anonymous`` (or ``anon``), ``region`` are the config's fields;
every other key is passed to the file system as it is (s3fs, gcsfs, adlfs options). Secrets
belong in the service's own credential chain (environment, ``~/.aws/credentials``), not here.
"""

from __future__ import annotations

import json
import os
from typing import Any

from slide_clip.errors import ConfigError

ENV = "SLIDE_CLIP_STORAGE_OPTIONS"

_ALIASES = {"endpoint": "endpoint_url", "endpoint-url": "endpoint_url", "anon": "anonymous", "region_name": "region",
            "cache-dir": "cache_dir", "cache-max-gb": "cache_max_gb", "claim-ttl-s": "claim_ttl_s"}
_FIELDS = ("endpoint_url", "profile", "anonymous", "region", "cache_dir", "cache_max_gb", "claim_ttl_s")


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options`` as a dict of :class:`~slide_clip.config.StorageConfig` fields (other keys
    under ``options``). A value that is neither JSON nor ``key=value`` pairs is a :class:`ConfigError`."""
    if text is None or not str(text).strip():
        return {}
    text = str(text).strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"--storage-options {text!r}: not valid JSON ({e})",
                              hint='Give a JSON object (\'{"endpoint_url": "http://host:9000"}\') or '
                                   "key=value pairs separated by commas.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--storage-options {text!r}: a JSON object is needed")
    else:
        raw = {}
        for item in (p.strip() for p in text.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--storage-options: {item!r} is not key=value",
                                  hint="Give key=value pairs separated by commas (endpoint_url=http://host:9000,"
                                       "anonymous=true), or a JSON object.")
            try:
                raw[key.strip()] = json.loads(value)
            except ValueError:
                raw[key.strip()] = value.strip()
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in raw.items():
        k = _ALIASES.get(key, key)
        if k in _FIELDS:
            out[k] = value
        elif k == "options" and isinstance(value, dict):
            extra.update(value)
        else:
            extra[key] = value
    if extra:
        out["options"] = extra
    return out


def merged(config=None, override: str | dict | None = None):
    """The :class:`~slide_clip.config.StorageConfig` of ``config`` (a PipelineConfig, a StorageConfig,
    or None: the process's) with ``override`` (``--storage-options`` text or a parsed dict) on top."""
    from pydantic import ValidationError

    from slide_clip.config import StorageConfig

    base = getattr(config, "storage", config)
    if base is None:
        base = current()
    data = base.model_dump()
    extra = parse_storage_options(override) if isinstance(override, str) or override is None else dict(override)
    options = {**data.get("options", {}), **extra.pop("options", {})}
    data.update(extra)
    data["options"] = options
    try:
        return StorageConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"invalid storage option {where}: {err['msg']}") from None


_current = None


def configure(storage) -> None:
    """Use ``storage`` (a :class:`~slide_clip.config.StorageConfig`) for every URL this process and
    its children open from now on."""
    global _current
    _current = storage
    os.environ[ENV] = json.dumps(storage.model_dump())


def apply(config) -> None:
    """Use the ``storage`` section of ``config`` (a :class:`~slide_clip.config.PipelineConfig`)
    for this process, unless it is the default section (then the process's settings stay:
    those the command line, a parent process or an earlier :func:`configure` gave).

    Library entry points that take a config call this (the executor, scoring), so a config
    with a ``storage:`` section reaches its URLs from a notebook too. The command line puts
    ``--storage-options`` into the config's section first (:func:`merged`), so this keeps them.
    """
    from slide_clip.config import StorageConfig

    st = getattr(config, "storage", None)
    if st is None or st == StorageConfig() or st == current():
        return
    configure(st)


def reload() -> None:
    """Forget the settings of this process: the next use reads ``SLIDE_CLIP_STORAGE_OPTIONS``
    again (a reader process given its owner's environment)."""
    global _current
    _current = None


def current():
    """The process's storage settings: those given to :func:`configure`, else inherited through
    ``SLIDE_CLIP_STORAGE_OPTIONS``, else the defaults."""
    global _current
    from slide_clip.config import StorageConfig

    if _current is None:
        text = os.environ.get(ENV)
        _current = StorageConfig.model_validate(json.loads(text)) if text else StorageConfig()
    return _current


def fsspec_options(protocol: str, storage=None) -> dict[str, Any]:
    """The keyword arguments of the fsspec file system for ``protocol`` from ``storage``'s settings."""
    st = storage or current()
    out: dict[str, Any] = {}
    if protocol not in ("http", "https"):
        # fsspec would keep a folder's listing for the life of the process and answer later
        # exists/info/open calls from it: a long-lived process (the cohort flow, a worker, the
        # viewer) would then miss an object another process wrote since (a slide's status
        # read as absent). Every call asks the service.
        out["use_listings_cache"] = False
    if protocol in ("s3", "s3a"):
        if st.endpoint_url:
            out["endpoint_url"] = st.endpoint_url
        if st.profile:
            out["profile"] = st.profile
        if st.anonymous:
            out["anon"] = True
        if st.region:
            out.setdefault("client_kwargs", {})["region_name"] = st.region
    elif protocol in ("gs", "gcs"):
        if st.endpoint_url:
            out["endpoint_url"] = st.endpoint_url
        if st.anonymous:
            out["token"] = "anon"
        if st.profile:
            out["project"] = st.profile
    elif protocol in ("az", "abfs", "abfss"):
        if st.anonymous:
            out["anon"] = True
        if st.endpoint_url:
            out["account_host"] = st.endpoint_url.split("://", 1)[-1]
    options = dict(st.options)
    if "client_kwargs" in options and "client_kwargs" in out:
        out["client_kwargs"] = {**out["client_kwargs"], **options.pop("client_kwargs")}
    out.update(options)
    return out
