"""Weights: reading state dicts from disk, hashing them, and seeded random initialisation."""

from __future__ import annotations

import contextlib
import functools
import hashlib
from pathlib import Path

import torch

from slide_clip.errors import WeightsError

_CKPT_HINT = ("Give a state dict saved with torch.save (.pt/.pth/.bin) or a .safetensors file of "
              "this model's weights.")


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, shapes, float32 bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        t = v.detach().to("cpu")
        h.update(str(tuple(t.shape)).encode())
        if t.is_floating_point():
            t = t.float()
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) for the life of the process."""
    st = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | Path, model_name: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a state dict (CPU tensors).

    Accepts ``torch.save`` files (a state dict, or a dict holding one under ``state_dict``
    or ``model``) and ``.safetensors``; a ``module.`` prefix (DataParallel) is removed.
    Anything else is a :class:`WeightsError` naming the file, never a loader's traceback.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"model {model_name!r}: checkpoint file not found", path=p,
                           hint="Check the path given with --checkpoint or in the registry.")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip, safetensors header errors all mean the same
        reason = _what_it_is(p) or (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise WeightsError(f"model {model_name!r}: is not a PyTorch/open_clip checkpoint ({reason})", path=p,
                           hint=_CKPT_HINT) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"model {model_name!r}: is not a PyTorch/open_clip checkpoint (no state dict of tensors)",
                           path=p, hint=_CKPT_HINT)
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _what_it_is(p: Path) -> str | None:
    """A plain description of a file that is not a checkpoint, judged by its first bytes."""
    with open(p, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None  # a torch.save zip or pickle that failed for another reason: keep torch's
    if not head:
        return "the file is empty"
    try:
        head.decode("utf-8")
        return "it is a text file, not a torch.save or safetensors file"
    except UnicodeDecodeError:
        return "its bytes are neither a torch.save zip/pickle nor safetensors"


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], model_name: str, path) -> None:
    """``model.load_state_dict(state, strict=True)``; a mismatch names the file and the keys."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        missing = [k for k in model.state_dict() if k not in state]
        unexpected = [k for k in state if k not in model.state_dict()]
        detail = (f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                  f"(e.g. {unexpected[:2]})" if missing or unexpected
                  else str(e).strip().splitlines()[-1].strip()[:200])
        raise WeightsError(f"model {model_name!r}: checkpoint does not fit the architecture ({detail})", path=path,
                           hint="Give the checkpoint of this model, or the matching --model.") from None


def local_weights(spec, create, adapt=None) -> tuple[torch.nn.Module, str | None] | None:
    """The model for ``random:`` or file weights, and the checkpoint's sha256 (None for random).

    ``create(spec)`` builds the architecture with seeded random weights; a file's state dict
    (``adapt(model, state)`` first, if given) is then loaded strictly. None for other
    weights (the hub): the backend loads those its own way.
    """
    if spec.weights_kind == "random":
        return create(spec), None
    if spec.weights_kind != "file":
        return None
    state = read_state_dict(spec.weights, spec.name)
    ckpt_sha = file_sha256(spec.weights)
    model = create(spec)
    if adapt is not None:
        state = adapt(model, state)
    load_into(model, state, spec.name, spec.weights)
    return model, ckpt_sha


def hub_error(spec, err: Exception) -> WeightsError:
    """One line for hub weights that cannot be had here: the model, the hub repository, whether
    it is gated, and the ``--checkpoint`` way."""
    repo = spec.hub_id or (spec.weights or "")[len("hf-hub:"):]
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    gated = "is gated: accept its licence on the hub, download its weights" if spec.gated else \
        "could not be downloaded: download its weights"
    return WeightsError(
        f"model {spec.name!r} (Hugging Face hub {repo}) {gated} on a machine with network access, "
        f"then give the file with --checkpoint FILE ({reason})")


def on_device(model: torch.nn.Module, dev: torch.device) -> tuple[torch.nn.Module, str]:
    """The model in eval mode on ``dev`` (channels_last on CUDA), and its weights' sha256."""
    model.eval()
    sha = state_dict_sha256(model)
    return (model.to(dev, memory_format=torch.channels_last) if dev.type == "cuda" else model.to(dev)), sha


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with the CPU random generator seeded, restoring the caller's state after.

    Models are built on the CPU, so the CPU generator decides their random weights; global
    RNG state (CPU and CUDA) is the same after the block as before it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        yield
