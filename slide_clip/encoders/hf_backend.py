"""The transformers backend: vision-only encoders in Hugging Face format (Phikon-v2, a DINOv2 ViT-L/16).

A registry entry names a transformers model class (``arch: Dinov2Model``) and its config as a
JSON file (``arch_config``, shipped in ``configs/archs/``), so the architecture is built
offline; the tile embedding is the class token of the last hidden state, as the card says.
"""

from __future__ import annotations

import torch

from slide_clip.encoders.base import Encoder
from slide_clip.encoders.spec import ModelSpec
from slide_clip.encoders.timm_backend import make_transform, preprocess_cfg
from slide_clip.encoders.weights import hub_error, local_weights, on_device, seeded
from slide_clip.errors import ConfigError

#: transformers classes this backend builds (vision models whose output has last_hidden_state).
CLASSES = ("Dinov2Model", "ViTModel")


def _config(spec: ModelSpec):
    import transformers

    if spec.arch not in CLASSES:
        raise ConfigError(f"model {spec.name!r}: the transformers backend builds {', '.join(CLASSES)}, "
                          f"not {spec.arch!r}")
    if spec.arch_cfg is None:
        raise ConfigError(f"model {spec.name!r}: a transformers model needs 'arch_config' (its config.json)")
    cfg_cls = getattr(transformers, spec.arch.replace("Model", "Config"))
    return getattr(transformers, spec.arch), cfg_cls(**{k: v for k, v in spec.arch_cfg.items() if k != "model_type"})


def create(spec: ModelSpec) -> torch.nn.Module:
    """The architecture with seeded random weights (seed 0 unless ``spec.seed``)."""
    model_cls, cfg = _config(spec)
    with seeded(spec.seed or 0):
        return model_cls(cfg, add_pooling_layer=False) if spec.arch == "ViTModel" else model_cls(cfg)


def _drop_unused_position_ids(model, state: dict) -> dict:
    """Checkpoints of other transformers versions may hold ``position_ids`` buffers this one lacks."""
    own = model.state_dict()
    return {k: v for k, v in state.items() if k in own or not k.endswith("position_ids")}


def load(spec: ModelSpec, dev: torch.device, precision: str) -> Encoder:
    built = local_weights(spec, create, _drop_unused_position_ids)
    if built is not None:
        model, ckpt_sha = built
    elif spec.weights_kind == "hf-hub":
        ckpt_sha = None
        model_cls, _ = _config(spec)
        repo = spec.weights[len("hf-hub:"):]
        try:
            model = model_cls.from_pretrained(repo)
        except Exception as e:  # noqa: BLE001 - offline, gated, missing: one line
            raise hub_error(spec, e) from None
    else:
        raise ConfigError(f"model {spec.name!r}: transformers models take hf-hub:ORG/NAME or a file as weights")
    model, weights_sha = on_device(model, dev)
    cfg = preprocess_cfg(spec)

    def cls_token(x):
        return model(pixel_values=x).last_hidden_state[:, 0]

    return Encoder(
        spec=spec, model=model, preprocess=make_transform(cfg), device=dev, precision=precision,
        weights_sha256=weights_sha, checkpoint_sha256=ckpt_sha, embed_dim=int(model.config.hidden_size),
        image_size=(cfg["size"], cfg["size"]), preprocess_cfg=cfg,
        arch_cfg={"transformers_class": spec.arch, "config": dict(spec.arch_cfg or {})}, image_fn=cls_token,
    )
