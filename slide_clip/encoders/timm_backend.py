"""The timm backend: vision-only tile encoders (UNI, UNI2-h, Virchow2, H-optimus, Prov-GigaPath).

A registry entry names a timm architecture and the keyword arguments its model card passes
to ``timm.create_model`` (``model_kwargs``; layer classes by name, e.g. ``mlp_layer:
SwiGLUPacked``, ``act_layer: SiLU``), its preprocessing constants, and how a tile's embedding
is pooled from the output tokens:

``cls``
    the model's own head with ``num_classes=0`` (the class token after the final norm);
``cls+mean``
    the class token concatenated with the mean of the patch tokens (register tokens left
    out), as Virchow2's card says.

Embeddings are L2-normalised like every backend's. These models have no text encoder: zero-
shot scoring and text search are refused (:func:`slide_clip.encoders.base.vision_only_error`).
"""

from __future__ import annotations

import torch

from slide_clip.encoders.arch_configs import input_size_or_none
from slide_clip.encoders.base import Encoder
from slide_clip.encoders.spec import ModelSpec
from slide_clip.encoders.weights import hub_error, local_weights, on_device, seeded
from slide_clip.errors import ConfigError

#: ImageNet constants, the default of most pathology ViTs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _layer(name: str):
    import timm.layers

    if hasattr(torch.nn, name):
        return getattr(torch.nn, name)
    if hasattr(timm.layers, name):
        return getattr(timm.layers, name)
    raise ConfigError(f"unknown layer {name!r} in model_kwargs (a torch.nn or timm.layers class name)")


def timm_kwargs(spec: ModelSpec) -> dict:
    """``model_kwargs`` with layer names turned into classes, and ``num_classes=0``."""
    kw = dict(spec.model_kwargs)
    for key in ("mlp_layer", "act_layer", "norm_layer"):
        if isinstance(kw.get(key), str):
            kw[key] = _layer(kw[key])
    kw["num_classes"] = 0
    return kw


def preprocess_cfg(spec: ModelSpec) -> dict:
    """The preprocessing constants (JSON-able): size, resize_size, mean, std, interpolation."""
    size = input_size_or_none(spec) or 224
    return {
        "size": size,
        "resize_size": int(spec.resize_size or size),  # as arch_configs.model_resize_size
        "mean": list(spec.image_mean or IMAGENET_MEAN),
        "std": list(spec.image_std or IMAGENET_STD),
        "interpolation": spec.image_interpolation or "bicubic",
        "resize_mode": "shortest",
    }


def make_transform(cfg: dict):
    """PIL image -> normalised tensor: resize the shorter side, centre-crop, normalise."""
    from torchvision import transforms as T

    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
              "nearest": T.InterpolationMode.NEAREST}[cfg["interpolation"]]
    return T.Compose([
        T.Resize(cfg["resize_size"], interpolation=interp),
        T.CenterCrop(cfg["size"]),
        T.ToTensor(),
        T.Normalize(cfg["mean"], cfg["std"]),
    ])


def create(spec: ModelSpec) -> torch.nn.Module:
    """The architecture with seeded random weights (seed 0 unless ``spec.seed``)."""
    import timm

    if spec.arch not in timm.list_models():
        raise ConfigError(f"model {spec.name!r}: timm has no architecture {spec.arch!r}",
                          hint="See timm.list_models().")
    with seeded(spec.seed or 0):
        return timm.create_model(spec.arch, pretrained=False, **timm_kwargs(spec))


def pooled(model, pooling: str):
    """pixels -> features: the model's own pooled output, or class token + mean patch token."""
    if pooling == "cls":
        return model

    def cls_and_mean(x):
        tokens = model.forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(dim=1)], dim=-1)

    return cls_and_mean


def load(spec: ModelSpec, dev: torch.device, precision: str) -> Encoder:
    """Build a timm encoder for ``spec``: random (seeded), a local file, or the hub."""
    built = local_weights(spec, create)
    if built is not None:
        model, ckpt_sha = built
    elif spec.weights_kind == "hf-hub":
        import timm

        ckpt_sha = None
        try:
            model = timm.create_model(spec.weights, pretrained=True, **timm_kwargs(spec))
        except Exception as e:  # noqa: BLE001 - offline, gated, missing: one line
            raise hub_error(spec, e) from None
    else:
        raise ConfigError(f"model {spec.name!r}: timm models take hf-hub:ORG/NAME or a file as weights")
    model, weights_sha = on_device(model, dev)
    cfg = preprocess_cfg(spec)
    dim = int(model.num_features) * (2 if spec.pooling == "cls+mean" else 1)
    return Encoder(
        spec=spec, model=model, preprocess=make_transform(cfg), device=dev, precision=precision,
        weights_sha256=weights_sha, checkpoint_sha256=ckpt_sha, embed_dim=dim,
        image_size=(cfg["size"], cfg["size"]), preprocess_cfg=cfg,
        arch_cfg={"timm_arch": spec.arch, "model_kwargs": dict(spec.model_kwargs), "pooling": spec.pooling},
        image_fn=pooled(model, spec.pooling),
    )
