"""The shard deployment and the work pools it runs on: process, Kubernetes (GPU jobs), Docker.

``slide-clip deploy --pool NAME [--pool-type process|kubernetes|docker]`` registers the shard
flow as the deployment ``process-shard/<name>`` of a work pool, creating the pool if it is
missing. The deployment names the flow by its module (``slide_clip_flows.process_shard``), so
any worker with slide-clip installed runs it, wherever the package lives: a process worker on
a GPU machine, a Kubernetes job or a Docker container started from an image with slide-clip.

For Kubernetes and Docker pools, the base job template is the worker type's own (from
``prefect-kubernetes`` / ``prefect-docker``) with GPUs asked for: ``nvidia.com/gpu`` in the job
container's resource limits (a ``gpus`` variable, default 1), or an NVIDIA device request for
the container. Scale-out is Prefect's: no scheduler of slide-clip's own.
"""

from __future__ import annotations

import copy

from slide_clip.errors import ConfigError
from slide_clip_tasks import ENCODER_LIMIT

POOL_TYPES = ("process", "kubernetes", "docker")
_EXTRAS = {"kubernetes": ("prefect_kubernetes.worker", "KubernetesWorker", "prefect-kubernetes"),
           "docker": ("prefect_docker.worker", "DockerWorker", "prefect-docker")}


def _worker_class(pool_type: str):
    import importlib

    module, cls, package = _EXTRAS[pool_type]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        raise ConfigError(f"a {pool_type} work pool needs the package {package}",
                          hint=f"pip install 'slide-clip[{pool_type}]' (or pip install {package}).") from None


def gpu_job_template(pool_type: str, gpus: int = 1, image: str | None = None) -> dict:
    """The worker type's default base job template, asking for ``gpus`` NVIDIA GPUs per shard run.

    Kubernetes: a ``gpus`` variable (integer, default ``gpus``) put in the job container's
    ``resources.limits["nvidia.com/gpu"]``. Docker: ``container_create_kwargs`` defaults to an
    NVIDIA device request for ``gpus`` GPUs. ``image`` becomes the template's default image.
    A shard run in such a job encodes on ``cuda`` (``SLIDE_CLIP_DEVICE``).
    """
    if pool_type not in _EXTRAS:
        raise ConfigError(f"--pool-type {pool_type!r}: a GPU job template is made for kubernetes or docker pools")
    if gpus < 0:
        raise ConfigError(f"--gpus {gpus}: give 0 or more")
    t = copy.deepcopy(_worker_class(pool_type).get_default_base_job_template())
    props = t["variables"]["properties"]
    env_default = {"SLIDE_CLIP_DEVICE": "cuda" if gpus else "cpu"}
    props["env"]["default"] = {**(props["env"].get("default") or {}), **env_default}
    if image:
        props["image"]["default"] = image
    if pool_type == "kubernetes":
        props["gpus"] = {"title": "GPUs", "description": "NVIDIA GPUs per shard run (nvidia.com/gpu)",
                         "type": "integer", "minimum": 0, "default": gpus}
        container = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
        container.setdefault("resources", {}).setdefault("limits", {})["nvidia.com/gpu"] = "{{ gpus }}"
    else:
        props["container_create_kwargs"]["default"] = (
            {"device_requests": [{"driver": "nvidia", "count": gpus, "capabilities": [["gpu"]]}]} if gpus else None)
    return t


def ensure_pool(pool: str, pool_type: str = "process", *, gpus: int = 1, image: str | None = None) -> bool:
    """Create the work pool ``pool`` (with the GPU job template for kubernetes/docker) unless it
    exists; returns whether it was created. An existing pool of another type is an error."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    if pool_type not in POOL_TYPES:
        raise ConfigError(f"--pool-type {pool_type!r}: choose from {', '.join(POOL_TYPES)}")
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            template = gpu_job_template(pool_type, gpus, image) if pool_type != "process" else None
            kwargs = {"base_job_template": template} if template else {}
            client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type, **kwargs))
            return True
    if existing.type != pool_type:
        raise ConfigError(f"work pool {pool!r} exists with type {existing.type!r}, not {pool_type!r}",
                          hint="Give another --pool, or the pool's own --pool-type.")
    return False


def register_shard_deployment(pool: str, *, name: str = "process-shard", encoder_limit: str | None = ENCODER_LIMIT,
                              image: str | None = None) -> str:
    """Register the shard flow on ``pool`` by its module path; returns ``process-shard/<name>``."""
    from prefect.deployments.runner import EntrypointType

    from slide_clip_flows.process_shard import process_shard

    dep = process_shard.to_deployment(name=name, parameters={"encoder_limit": encoder_limit},
                                      entrypoint_type=EntrypointType.MODULE_PATH,
                                      job_variables={"image": image} if image else None)
    dep.apply(work_pool_name=pool)
    return f"process-shard/{name}"
