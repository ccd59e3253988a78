"""Installation checks: OpenSlide, torch and the device, open_clip and the model registry's
weights, Zarr, and the output folder. ``slide-clip doctor`` prints them.

Each check does the real thing on a small scale (writes and opens a synthetic slide, runs a
tensor on the device, writes a Zarr v3 array) rather than only importing a package.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True)
class Check:
    """One line of the report: ``status`` is ok, warn (works, with a caveat) or FAIL."""

    status: str
    name: str
    detail: str


def _guard(name: str, fn) -> list[Check]:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a check that breaks is a failed check
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return [Check(FAIL, name, text)]


def check_openslide(workdir: Path) -> list[Check]:
    import openslide

    from slide_clip.slide import slide_info
    from slide_clip.synthetic import Region, Scene, write_slide

    path = write_slide(workdir / "doctor.tif", Scene(1024, 768, (Region("ellipse", (100, 100, 900, 700)),)), 0.5,
                       levels=2)
    info = slide_info(path)
    if info.vendor != "generic-tiff" or info.mpp_x != 0.5:
        return [Check(FAIL, "openslide", f"a pyramidal TIFF opened as {info.vendor} with mpp {info.mpp_x}")]
    return [Check(OK, "openslide", f"library {openslide.__library_version__}, openslide-python "
                                    f"{openslide.__version__}; a pyramidal TIFF opens with its mpp")]


def check_device(device: str) -> list[Check]:
    import torch

    from slide_clip.encoders import pick_device

    dev = pick_device(device)
    x = torch.ones(64, 64, device=dev)
    if float((x @ x).sum()) != 64.0**3:
        return [Check(FAIL, "device", f"a matrix product on {dev} gave a wrong result")]
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "fp16 (no bf16)"
        return [Check(OK, "device", f"{dev} ({name}), autocast {bf16}; torch {torch.__version__}")]
    cuda = "built with CUDA but no GPU visible" if torch.backends.cuda.is_built() else "CPU-only build"
    status = OK if device != "auto" or dev.type != "cpu" else WARN
    detail = f"{dev} ({cuda}, {torch.get_num_threads()} threads); torch {torch.__version__}"
    if status == WARN:
        detail += ": encoding runs on the CPU, tens of tiles per second"
    return [Check(status, "device", detail)]


def _hub_cached(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(repo, f), str):
            return True
    return False


def check_models(registries=()) -> list[Check]:
    import open_clip

    from slide_clip.encoders import load_registry

    reg = load_registry(*registries)
    out = [Check(OK, "open_clip", f"open_clip_torch {open_clip.__version__}; {len(reg)} registry models")]
    for spec in reg.values():
        kind = spec.weights_kind
        if kind == "file":
            ok = Path(spec.weights).is_file()
            out.append(Check(OK if ok else WARN, f"model {spec.name}",
                             f"checkpoint {spec.weights}" + ("" if ok else " not found: give --checkpoint FILE")))
        elif kind == "hf-hub":
            repo = spec.weights[len("hf-hub:"):]
            cached = _hub_cached(repo)
            out.append(Check(OK if cached else WARN, f"model {spec.name}",
                             f"{repo} " + ("in the Hugging Face cache" if cached else
                                           "not cached: downloaded on first use (needs network), "
                                           "or give --checkpoint FILE")))
        else:
            out.append(Check(WARN, f"model {spec.name}", f"open_clip tag {spec.weights}: downloaded on first use "
                                                         "(needs network), or give --checkpoint FILE"))
    return out


def check_store(workdir: Path) -> list[Check]:
    import numpy as np
    import zarr

    g = zarr.open_group(str(workdir / "doctor.zarr"), mode="w", zarr_format=3)
    g.create_array("x", data=np.arange(10, dtype=np.float32))
    back = zarr.open_group(str(workdir / "doctor.zarr"), mode="r")
    if back.metadata.zarr_format != 3 or float(back["x"][9]) != 9.0:
        return [Check(FAIL, "zarr", f"a v3 array written in {workdir} read back wrong")]
    return [Check(OK, "zarr", f"zarr {zarr.__version__}: a v3 store written and read in {workdir}")]


def run_checks(out_dir: str | Path | None = None, device: str = "auto", registries=()) -> list[Check]:
    """Run every check; ``out_dir`` (created if missing) is where stores would be written."""
    def zarr_in(base: Path) -> list[Check]:  # a hidden folder, removed after: nothing is left in out_dir
        base.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".doctor-", dir=base) as d:
            return check_store(Path(d))

    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="slide-clip-doctor-") as tmp:
        checks += _guard("openslide", lambda: check_openslide(Path(tmp)))
        checks += _guard("device", lambda: check_device(device))
        checks += _guard("open_clip", lambda: check_models(registries))
        checks += _guard("zarr", lambda: zarr_in(Path(out_dir) if out_dir is not None else Path(tmp)))
    return checks
