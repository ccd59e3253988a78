"""CLIP image encoders: a registry of named models and their loading.

A registry (``configs/models.yaml``, plus any user file) maps a name to an open_clip
architecture, a weights source and preprocessing, in the spirit of open_clip's own
``create_model_and_transforms`` factory. Every weights source ends in open_clip's loader:
a hub id, a pretrained tag, or a checkpoint file on disk.

Randomly initialised weights are only used on an explicit ``random:ARCH`` request and are
recorded as such (``random_weights`` in the store), so nobody mistakes them for a trained
model.

Embeddings are ``encode_image`` outputs in the joint image-text space, L2-normalised.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from slide_clip.errors import ConfigError, WeightsError
from slide_clip.resources import config_file

#: The registry shipped with the project.
DEFAULT_REGISTRY = config_file("models.yaml")

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry, resolved."""

    name: str
    arch: str
    weights: str | None  # "hf-hub:...", "pretrained:TAG", a file path, or None (random)
    arch_config: str | None = None
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    image_interpolation: str | None = None
    description: str = ""

    @property
    def random_weights(self) -> bool:
        return self.weights is None

    @property
    def weights_kind(self) -> str:
        if self.weights is None:
            return "random"
        if self.weights.startswith("hf-hub:"):
            return "hf-hub"
        if self.weights.startswith("pretrained:"):
            return "pretrained"
        return "file"


def _resolve_rel(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    if value.startswith(("hf-hub:", "pretrained:")):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def load_registry(*paths: str | Path) -> dict[str, ModelSpec]:
    """Read the default registry and any further registry files (later files win)."""
    specs: dict[str, ModelSpec] = {}
    for path in (DEFAULT_REGISTRY, *paths):
        p = Path(path)
        if not p.is_file():
            raise ConfigError("model registry not found", path=p)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"model registry is not valid YAML ({e.__class__.__name__})", path=p) from None
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, dict):
            raise ConfigError("model registry needs a top-level 'models:' mapping", path=p)
        for name, entry in models.items():
            if not isinstance(entry, dict) or "arch" not in entry:
                raise ConfigError(f"model {name!r} needs an 'arch'", path=p)
            unknown = set(entry) - {"arch", "weights", "checkpoint", "arch_config", "image_mean",
                                    "image_std", "image_interpolation", "description"}
            if unknown:
                raise ConfigError(f"model {name!r} has unknown fields {sorted(unknown)}", path=p)
            weights = entry.get("checkpoint") or entry.get("weights")
            if weights is None:
                raise ConfigError(
                    f"model {name!r} has no 'weights' or 'checkpoint'", path=p,
                    hint="Random weights are only available as --model random:ARCH.",
                )
            specs[str(name)] = ModelSpec(
                name=str(name),
                arch=str(entry["arch"]),
                weights=_resolve_rel(str(weights), p.parent),
                arch_config=_resolve_rel(entry.get("arch_config"), p.parent),
                image_mean=tuple(entry["image_mean"]) if entry.get("image_mean") else None,
                image_std=tuple(entry["image_std"]) if entry.get("image_std") else None,
                image_interpolation=entry.get("image_interpolation"),
                description=str(entry.get("description", "")),
            )
    return specs


def resolve_model(name: str, registry_files=(), checkpoint: str | Path | None = None) -> ModelSpec:
    """Turn a model name into a :class:`ModelSpec`.

    ``name`` is a registry name, ``random:ARCH`` (random weights, explicitly), or a bare
    open_clip architecture together with ``checkpoint`` (a local file). ``checkpoint``
    also replaces the weights source of a registry entry.
    """
    registry = load_registry(*registry_files)
    ckpt = str(Path(checkpoint).expanduser().resolve()) if checkpoint else None
    if name.startswith(RANDOM_PREFIX):
        if ckpt:
            raise ConfigError(f"model {name!r} asks for random weights, but a checkpoint was given")
        return ModelSpec(name=name, arch=name[len(RANDOM_PREFIX):], weights=None)
    if name in registry:
        spec = registry[name]
        if ckpt:
            spec = ModelSpec(**{**spec.__dict__, "weights": ckpt})
        return spec
    if ckpt:
        return ModelSpec(name=name, arch=name, weights=ckpt)
    raise ConfigError(
        f"unknown model {name!r}",
        hint=(f"Known: {', '.join(sorted(registry))}. Or give an open_clip architecture with "
              "--checkpoint FILE, or add it to a registry YAML passed with --models."),
    )


def _register_arch(spec: ModelSpec) -> None:
    import open_clip

    if spec.arch_config is None:
        return
    p = Path(spec.arch_config)
    if not p.is_file():
        raise ConfigError(f"model {spec.name!r}: architecture config not found", path=p)
    try:
        name = p.stem
        json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {spec.name!r}: architecture config is not JSON ({e})", path=p) from None
    if name != spec.arch:
        raise ConfigError(
            f"model {spec.name!r}: arch {spec.arch!r} must match its config file's name {name!r}", path=p
        )
    open_clip.add_model_config(p)


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


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else is passed to torch."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}", hint="Use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but no CUDA GPU is available", hint="Use --device cpu or auto.")
    return dev


@dataclass
class Encoder:
    """A loaded CLIP model with its preprocessing and provenance."""

    spec: ModelSpec
    model: Any
    preprocess: Callable
    device: torch.device
    precision: str  # "fp32", "fp16" or "bf16" (autocast dtype on CUDA)
    weights_sha256: str
    checkpoint_sha256: str | None
    embed_dim: int
    image_size: tuple[int, int]
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def logit_scale(self) -> float:
        """The model's learned temperature, exp(logit_scale) (about 100 for CLIP)."""
        return float(self.model.logit_scale.detach().exp().item())

    def provenance(self) -> dict:
        """What the store records about this encoder."""
        return {
            "name": self.spec.name,
            "arch": self.spec.arch,
            "weights_source": self.spec.weights or "random",
            "weights_kind": self.spec.weights_kind,
            "random_weights": self.spec.random_weights,
            "weights_sha256": self.weights_sha256,
            "checkpoint_sha256": self.checkpoint_sha256,
            "embed_dim": self.embed_dim,
            "image_size": list(self.image_size),
            "precision": self.precision,
            "logit_scale": self.logit_scale,
        }

    def _autocast(self):
        if self.device.type == "cuda" and self.precision in ("fp16", "bf16"):
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """L2-normalised image embeddings (float32, (n, embed_dim)) of preprocessed pixels."""
        with torch.inference_mode():
            x = pixels.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                feats = self.model.encode_image(x)
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            import open_clip

            arch = self.spec.arch
            self._tokenizer = open_clip.get_tokenizer(arch)
        return self._tokenizer

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised text embeddings (float32, (n, embed_dim))."""
        with torch.inference_mode():
            tokens = self.tokenizer(texts).to(self.device)
            with self._autocast():
                feats = self.model.encode_text(tokens)
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy()


def _weights_error(spec: ModelSpec, err: Exception) -> WeightsError:
    where = {
        "hf-hub": f"the Hugging Face hub repository {spec.weights[len('hf-hub:'):]}",
        "pretrained": f"open_clip's download for pretrained tag {spec.weights[len('pretrained:'):]!r}",
        "file": f"the file {spec.weights}",
    }[spec.weights_kind]
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return WeightsError(
        f"model {spec.name!r} ({spec.arch}): cannot get weights from {where} ({reason})",
        hint=("Download the weights on a machine with network access and point at the file: "
              "--checkpoint FILE, or 'checkpoint: FILE' in a registry YAML passed with --models."),
    )


def load_encoder(
    spec: ModelSpec,
    device: str | torch.device = "auto",
    precision: str = "auto",
) -> Encoder:
    """Build the model, load its weights and preprocessing, and move it to ``device``.

    ``precision`` is ``auto`` (bf16 autocast on CUDA where supported, else fp16; fp32
    elsewhere), ``fp32``, ``fp16`` or ``bf16``. Weights stay fp32; autocast applies on CUDA.
    """
    import open_clip

    dev = device if isinstance(device, torch.device) else pick_device(device)
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"unknown precision {precision!r}", hint="Use auto, fp32, fp16 or bf16.")
    _register_arch(spec)
    arch_is_hub = spec.arch.startswith("hf-hub:")
    if not arch_is_hub and spec.arch not in open_clip.list_models():
        raise ConfigError(
            f"model {spec.name!r}: open_clip has no architecture {spec.arch!r}",
            hint="See open_clip.list_models(), or give an 'arch_config' JSON in the registry.",
        )
    # require_pretrained: open_clip would otherwise fall back to random weights when a hub
    # download fails after the config was found.
    kwargs: dict[str, Any] = {} if spec.random_weights else {"require_pretrained": True}
    if spec.image_mean:
        kwargs["image_mean"] = spec.image_mean
    if spec.image_std:
        kwargs["image_std"] = spec.image_std
    if spec.image_interpolation:
        kwargs["image_interpolation"] = spec.image_interpolation
    checkpoint_sha = None
    try:
        if spec.weights_kind == "random":
            model, _, preprocess = open_clip.create_model_and_transforms(spec.arch, pretrained=None, **kwargs)
        elif spec.weights_kind == "hf-hub":
            name = spec.arch if arch_is_hub and spec.arch == spec.weights else spec.weights
            model, _, preprocess = open_clip.create_model_and_transforms(name, **kwargs)
        elif spec.weights_kind == "pretrained":
            tag = spec.weights[len("pretrained:"):]
            model, _, preprocess = open_clip.create_model_and_transforms(spec.arch, pretrained=tag, **kwargs)
        else:
            f = Path(spec.weights)
            if not f.is_file():
                raise WeightsError(
                    f"model {spec.name!r}: checkpoint file not found", path=f,
                    hint="Check the path given with --checkpoint or in the registry.",
                )
            checkpoint_sha = file_sha256(f)
            model, _, preprocess = open_clip.create_model_and_transforms(spec.arch, pretrained=str(f), **kwargs)
    except WeightsError:
        raise
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - network, hub, format errors all end here
        raise _weights_error(spec, e) from None
    model.eval()
    weights_sha = state_dict_sha256(model)
    if dev.type == "cuda":
        model = model.to(dev, memory_format=torch.channels_last)
    else:
        model = model.to(dev)
    visual = model.visual
    size = getattr(visual, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    embed_dim = _embed_dim(model, size, dev)
    return Encoder(
        spec=spec,
        model=model,
        preprocess=preprocess,
        device=dev,
        precision=precision,
        weights_sha256=weights_sha,
        checkpoint_sha256=checkpoint_sha,
        embed_dim=embed_dim,
        image_size=size,
    )


def _embed_dim(model, size, dev) -> int:
    dim = getattr(model.visual, "output_dim", None)
    if isinstance(dim, int):
        return dim
    with torch.inference_mode():
        return int(model.encode_image(torch.zeros(1, 3, *size, device=dev)).shape[-1])
