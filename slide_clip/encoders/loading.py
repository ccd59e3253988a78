"""Loading an encoder for a spec (any backend), and finding the model a store was made with."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from slide_clip.encoders.arch_configs import model_input_size  # noqa: F401 - re-exported
from slide_clip.encoders.base import Encoder, pick_device, pick_precision
from slide_clip.encoders.hub import check_hub
from slide_clip.encoders.spec import ModelSpec, resolve_model, spec_from_provenance
from slide_clip.encoders.weights import on_device
from slide_clip.errors import ConfigError, WeightsError


def load_encoder(
    spec: ModelSpec,
    device: str | torch.device = "auto",
    precision: str = "auto",
) -> Encoder:
    """Build the model, load its weights and preprocessing, and move it to ``device``.

    ``precision`` is ``auto`` (bf16 autocast on CUDA where supported, else fp16; fp32
    elsewhere), ``fp32``, ``fp16`` or ``bf16``. Weights stay fp32; autocast applies on CUDA.
    Random weights (``spec.weights is None``) are drawn with ``spec.seed`` on the CPU,
    without touching the caller's random state.
    """
    check_hub(spec)  # offline: at once, never after the hub client's minute of retries
    dev = device if isinstance(device, torch.device) else pick_device(device)
    precision = pick_precision(precision, dev)
    if spec.backend == "timm":
        from slide_clip.encoders import timm_backend

        return timm_backend.load(spec, dev, precision)
    if spec.backend == "transformers":
        from slide_clip.encoders import hf_backend

        return hf_backend.load(spec, dev, precision)
    if spec.backend == "conch":
        from slide_clip.encoders import conch

        return conch.load(spec, dev, precision)
    if spec.backend != "open_clip":
        raise ConfigError(f"model {spec.name!r}: unknown backend {spec.backend!r}")
    from slide_clip.encoders import openclip

    model, preprocess, pre_cfg, arch_cfg, ckpt_sha = openclip.build(spec)
    model, weights_sha = on_device(model, dev)
    size = openclip.image_size_of(model)
    return Encoder(
        spec=spec, model=model, preprocess=preprocess, device=dev, precision=precision,
        weights_sha256=weights_sha, checkpoint_sha256=ckpt_sha,
        embed_dim=openclip.embed_dim_of(model, size, dev), image_size=size,
        preprocess_cfg=pre_cfg, arch_cfg=arch_cfg,
        extra={"quick_gelu": openclip.uses_quick_gelu(model)},  # the activation built, read from the model
    )


def resolve_stored_model(name: str, attrs: dict, registry_files=(), checkpoint: str | Path | None = None,
                         where=None) -> ModelSpec:
    """The spec to rebuild the model a store's embeddings were made with.

    The store records the spec it was made with (architecture, its config, weights source,
    preprocessing, seed), so no ``--models`` registry is needed again. ``checkpoint``
    replaces the recorded weights (a moved file, or weights for a hub model offline). A
    recorded weights file that is gone falls back to the registry's entry of that name,
    else is refused with a line saying what to give.
    """
    spec = spec_from_provenance(attrs)
    if spec is None:  # a store written before specs were recorded
        return resolve_model(name, registry_files, checkpoint)
    recorded = attrs.get("arch_config")
    if spec.arch_cfg is None and isinstance(recorded, dict) and spec.backend == "open_clip":
        import open_clip

        if spec.arch.startswith("hf-hub:") or spec.arch not in open_clip.list_models():
            spec = replace(spec, arch_cfg=recorded)
    if checkpoint:
        if spec.random_weights:
            raise ConfigError(f"model {name!r} was made with random weights (seed {spec.seed}); "
                              "a checkpoint cannot give those", path=where, hint="Leave out --checkpoint.")
        return replace(spec, weights=str(Path(checkpoint).expanduser().resolve()))
    if spec.weights_kind == "file" and not Path(spec.weights).is_file():
        try:
            alt = resolve_model(name, registry_files)
        except ConfigError:
            alt = None
        if alt is not None and (alt.weights_kind != "file" or Path(alt.weights).is_file()):
            return alt
        raise WeightsError(
            f"model {name!r}: the weights file the embeddings were made with is gone ({spec.weights})",
            path=where, hint="Give that file with --checkpoint FILE.")
    return spec
