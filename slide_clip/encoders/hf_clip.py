"""Hugging Face ``CLIPModel`` state dicts (PLIP and other transformers-format CLIPs) converted
into the matching open_clip architecture (``ViT-B-32-quickgelu`` for PLIP).

The mapping is exact (the same tensors, q/k/v stacked into one in-projection, projections
transposed); tests compare image and text embeddings of both implementations on random
weights.
"""

from __future__ import annotations

import re

import torch


def is_hf_clip(state: dict) -> bool:
    """Whether a state dict is in transformers' CLIPModel layout."""
    return any(k.startswith("vision_model.") for k in state) and any(k.startswith("text_model.") for k in state)


_LAYER = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_FLAT = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}


def hf_clip_to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a transformers ``CLIPModel`` state dict to open_clip's ``CLIP`` layout.

    Unknown keys are kept under their own names, so a strict load reports them.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k.endswith("position_ids"):
            continue  # a buffer transformers keeps, open_clip does not
        if k in _FLAT:
            out[_FLAT[k]] = v
            continue
        if k == "visual_projection.weight":
            out["visual.proj"] = v.t().contiguous()
            continue
        if k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()
            continue
        m = _LAYER.match(k)
        if not m:
            out[k] = v
            continue
        tower, i, rest = m.groups()
        prefix = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{i}."
        pm = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if pm:
            qkv.setdefault((prefix, pm[2]), {})[pm[1]] = v
            continue
        for src, dst in _PARTS.items():
            if rest.startswith(src + "."):
                out[prefix + dst + rest[len(src):]] = v
                break
        else:
            out[k] = v
    for (prefix, kind), parts in qkv.items():
        out[f"{prefix}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
