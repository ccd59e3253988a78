"""Architecture configs read without building a model, and without importing torch.

Tiling needs the model's input side (the tile size defaults to it) before the model exists.
Importing torch and open_clip takes seconds (4-5 s on a 2-core machine, with torchvision
and transformers, which open_clip imports); a command builds the model in a background
thread meanwhile (:class:`slide_clip.pipeline.EncoderCache`), so asking for the input size
must not import them too, or tissue detection would wait on that import (Python's import
lock) instead of running beside it.

Only the timm backend's architecture defaults still come from timm itself (importing it).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from slide_clip.encoders.spec import ModelSpec
from slide_clip.errors import ConfigError

_OPEN_CLIP_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def hub_repo(arch: str) -> str | None:
    """The repository of an ``hf-hub:`` architecture name, else None."""
    return arch[len("hf-hub:"):] if arch.startswith("hf-hub:") else None


def cached_hub_config(repo: str) -> dict | None:
    """``open_clip_config.json`` of a hub repository if it is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        p = try_to_load_from_cache(repo, "open_clip_config.json")
    except Exception:  # noqa: BLE001 - no cache, bad repo id: not available
        return None
    if isinstance(p, str) and Path(p).is_file():
        try:
            return json.loads(Path(p).read_text())
        except (OSError, ValueError):
            return None
    return None


def _packaged_open_clip_config(arch: str) -> dict | None:
    """open_clip's own config of a built-in architecture, read from its package folder
    (what ``open_clip.get_model_config`` returns for it) without importing open_clip."""
    try:
        found = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for root in found.submodule_search_locations:
        p = Path(root) / "model_configs" / f"{arch}.json"
        if p.is_file():
            try:
                cfg = json.loads(p.read_text())
            except (OSError, ValueError):
                return None
            # open_clip registers only configs that have all three (open_clip.factory)
            return cfg if all(k in cfg for k in _OPEN_CLIP_KEYS) else None
    return None


def _packaged_open_clip_archs() -> list[str]:
    """Names of open_clip's built-in architectures (its config files), without importing it."""
    try:
        found = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return []
    roots = found.submodule_search_locations if found is not None else None
    return sorted({f.stem for r in roots or () for f in (Path(r) / "model_configs").glob("*.json")})


def check_open_clip_arch(name: str, arch: str) -> None:
    """Refuse an open_clip architecture name that exists nowhere (a typo in ``random:ARCH``).

    Known: an ``hf-hub:`` name (its config is on the hub), one of open_clip's own configs, or
    one registered in this process (``open_clip.add_model_config``). The error names the
    closest architectures and where the full lists are.
    """
    import difflib

    import sys

    if hub_repo(arch) or _packaged_open_clip_config(arch) is not None:
        return
    known = _packaged_open_clip_archs()
    if "open_clip" in sys.modules:  # registered at run time (add_model_config): only open_clip knows it
        known = sys.modules["open_clip"].list_models()
    if arch in known:
        return
    close = difflib.get_close_matches(arch, known, n=3, cutoff=0.5)
    raise ConfigError(
        f"model {name!r}: unknown architecture {arch!r} (not in the model registry nor among open_clip's "
        f"{len(known)} architectures)" + (f"; did you mean {', '.join(close)}?" if close else ""),
        hint="`slide-clip models` lists the registry's names (each also works as random:NAME); "
             "open_clip.list_models() lists the architectures.")


def open_clip_full_config(spec: ModelSpec) -> dict | None:
    """``{"model_cfg": ..., "preprocess_cfg": ...}`` for an open_clip ``spec``, without building
    anything; None when the architecture config is only on the hub and not cached here."""
    if spec.arch_cfg is not None:
        cfg = spec.arch_cfg
        return {"model_cfg": cfg["model_cfg"], "preprocess_cfg": cfg.get("preprocess_cfg", {})} \
            if "model_cfg" in cfg else {"model_cfg": cfg, "preprocess_cfg": {}}
    repo = hub_repo(spec.arch)
    if repo:
        cfg = cached_hub_config(repo)
        return None if cfg is None or "model_cfg" not in cfg else \
            {"model_cfg": cfg["model_cfg"], "preprocess_cfg": cfg.get("preprocess_cfg", {})}
    mc = _packaged_open_clip_config(spec.arch)
    if mc is None:  # an architecture registered some other way: ask open_clip (imports it)
        import open_clip

        mc = open_clip.get_model_config(spec.arch)
    return None if mc is None else {"model_cfg": mc, "preprocess_cfg": {}}


def conch_arch_cfg(spec: ModelSpec) -> dict:
    """The conch backend's architecture config (the registry entry's ``arch_config`` JSON)."""
    cfg = spec.arch_cfg
    if not isinstance(cfg, dict) or not set(_OPEN_CLIP_KEYS) <= set(cfg):
        raise ConfigError(f"model {spec.name!r}: the conch backend needs an 'arch_config' JSON with embed_dim, "
                          "vision_cfg and text_cfg", path=spec.arch_config,
                          hint="Use the one shipped in configs/archs/conch_ViT-B-16.json.")
    return cfg


def _side(size) -> int:
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def input_size_or_none(spec: ModelSpec) -> int | None:
    """The model's input side in px from its config, or None if unknown here (a hub config not cached)."""
    if spec.input_size:
        return int(spec.input_size)
    if spec.backend == "timm":
        size = spec.model_kwargs.get("img_size")
        if size:
            return _side(size)
        import timm

        try:
            cfg = timm.get_pretrained_cfg(spec.arch)
        except Exception:  # noqa: BLE001 - unknown architecture
            cfg = None
        return int(cfg.input_size[-1]) if cfg is not None else None
    if spec.backend == "transformers":
        return int(spec.arch_cfg["image_size"]) if spec.arch_cfg and "image_size" in spec.arch_cfg else None
    if spec.backend == "conch":
        return _side(conch_arch_cfg(spec)["vision_cfg"].get("image_size", 448))
    cfg = open_clip_full_config(spec)
    if cfg is None:
        return None
    return _side(cfg["model_cfg"].get("vision_cfg", {}).get("image_size", 224))


def model_input_size(spec: ModelSpec) -> int:
    """The model's input side in px, read from its config without building the model."""
    size = input_size_or_none(spec)
    if size is None:
        raise ConfigError(
            f"model {spec.name!r}: its input size is not known offline (architecture config on the hub)",
            hint="Give --tile-size, or 'input_size' (px) in the model's registry entry.")
    return int(size)


def model_resize_size(spec: ModelSpec) -> int:
    """px a tile's side is resized to before the centre crop to the input size: the entry's
    ``resize_size`` (timm, transformers and conch backends), else the input size (open_clip's
    eval transform resizes the shorter side to the input size, so a square tile is not cropped)."""
    size = model_input_size(spec)
    return int(spec.resize_size or size) if spec.backend != "open_clip" else size


def model_tile_size(spec: ModelSpec) -> int:
    """The tile side cut for this model by default: the entry's ``tile_size``, else its input size."""
    return int(spec.tile_size or model_input_size(spec))
