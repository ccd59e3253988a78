"""The GPU job templates of kubernetes and docker work pools, rendered by the workers' own code,
and the --devices list (slide_clip_flows.deployments, slide_clip_flows.devices)."""

import asyncio

import pytest

from slide_clip.errors import ConfigError


def test_a_kubernetes_shard_job_asks_for_the_gpus_and_runs_on_cuda(prefect_harness):
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from slide_clip_flows.deployments import gpu_job_template

    t = gpu_job_template("kubernetes", gpus=2, image="registry.example/slide-clip:1")
    cfg = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(t, {"gpus": 4}))
    [container] = cfg.job_manifest["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4  # the run's value over the default
    assert container["image"] == "registry.example/slide-clip:1"
    assert cfg.env["SLIDE_CLIP_DEVICE"] == "cuda"
    default = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(t, {}))
    assert default.job_manifest["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] == 2


def test_a_docker_shard_container_asks_for_the_gpus(prefect_harness):
    from prefect_docker.worker import DockerWorkerJobConfiguration

    from slide_clip_flows.deployments import gpu_job_template

    t = gpu_job_template("docker", gpus=1, image="registry.example/slide-clip:1")
    cfg = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(t, {}))
    assert cfg.image == "registry.example/slide-clip:1" and cfg.env["SLIDE_CLIP_DEVICE"] == "cuda"
    [req] = cfg.container_create_kwargs["device_requests"]
    assert req == {"driver": "nvidia", "count": 1, "capabilities": [["gpu"]]}
    none = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(gpu_job_template("docker", gpus=0), {}))
    assert not none.container_create_kwargs and none.env["SLIDE_CLIP_DEVICE"] == "cpu"


def test_devices_are_named_or_all():
    import torch

    from slide_clip_flows.devices import parse_devices

    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_devices(" cuda:0, cuda:1 ") == ["cuda:0", "cuda:1"]
    with pytest.raises(ConfigError, match="'gpu7' is not a device"):
        parse_devices("cuda:0,gpu7")
    with pytest.raises(ConfigError, match="at least one device"):
        parse_devices(" , ")
    if torch.cuda.device_count() == 0:
        with pytest.raises(ConfigError, match="no CUDA device"):
            parse_devices("all")
    else:
        assert parse_devices("all") == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
