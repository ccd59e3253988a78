"""Image encoders: a registry of named models, their backends and loading.

A registry (``configs/models.yaml``, plus any user file) maps a name to a backend, an
architecture, a weights source and preprocessing, in the spirit of open_clip's own
``create_model_and_transforms`` factory (:mod:`slide_clip.encoders.spec`).

Backends, behind one :class:`Encoder` interface:

- ``open_clip`` (:mod:`slide_clip.encoders.openclip`): vision-language models; embeddings
  are ``encode_image`` outputs in the joint image-text space, L2-normalised; zero-shot capable.
- ``timm`` (:mod:`slide_clip.encoders.timm_backend`): vision-only tile encoders (UNI,
  Virchow2, H-optimus, ...); L2-normalised features; zero-shot and text search are refused.

Random weights are only used on an explicit ``random:NAME`` request; they are seeded (seed 0
unless ``random:NAME@seed=N``), identical in every process, and recorded as such
(``random_weights`` and ``seed`` in the store), so nobody mistakes them for a trained model.
"""

from slide_clip.encoders.spec import (
    DEFAULT_REGISTRY,
    RANDOM_PREFIX,
    ModelSpec,
    describe_weights,
    load_registry,
    parse_random,
    random_name,
    resolve_model,
    spec_from_provenance,
)

# The names below are loaded on first use (all but model_input_size import torch), so that resolving a model
# name (the registry, its input size and µm/px) does not put torch's import on a command's
# way to its first tile: the model is built in a background thread meanwhile.
_LAZY = {
    "Encoder": "base", "pick_device": "base", "pick_precision": "base", "vision_only_error": "base",
    "load_encoder": "loading", "model_input_size": "arch_configs", "resolve_stored_model": "loading",
    "file_sha256": "weights", "read_state_dict": "weights", "seeded": "weights", "state_dict_sha256": "weights",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"slide_clip.encoders.{module}"), name)


__all__ = [
    "DEFAULT_REGISTRY",
    "RANDOM_PREFIX",
    "Encoder",
    "ModelSpec",
    "describe_weights",
    "file_sha256",
    "load_encoder",
    "load_registry",
    "model_input_size",
    "parse_random",
    "pick_device",
    "pick_precision",
    "random_name",
    "read_state_dict",
    "resolve_model",
    "resolve_stored_model",
    "seeded",
    "spec_from_provenance",
    "state_dict_sha256",
    "vision_only_error",
]
