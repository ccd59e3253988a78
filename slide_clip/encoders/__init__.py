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

from slide_clip.encoders.base import Encoder, pick_device, pick_precision, vision_only_error
from slide_clip.encoders.loading import load_encoder, model_input_size, resolve_stored_model
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
from slide_clip.encoders.weights import file_sha256, read_state_dict, seeded, state_dict_sha256

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
