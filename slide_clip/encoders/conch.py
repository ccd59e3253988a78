"""The CONCH backend: MahmoodLab's vision-language pathology model (a CoCa), zero-shot capable.

CONCH's architecture is assembled here from well-kept parts, with the parameter names of
CONCH's own checkpoints, so its ``pytorch_model.bin`` loads strictly:

image
    a timm ``VisionTransformer`` trunk (``visual.trunk``: ViT-B/16 at 448 px, class token,
    final norm, no head; all output tokens are used), then an attentional pooler with one
    query (open_clip's ``AttentionalPooler``, ``visual.attn_pool_contrast``), a LayerNorm
    (``visual.ln_contrast``) and a square projection (``visual.proj_contrast``): the image
    embedding in the joint image-text space (CONCH's ``encode_image(proj_contrast=True)``);
text
    open_clip's ``TextTransformer`` with a class embedding appended after the tokens
    (``text.cls_emb``, pooled from that last position through ``text.ln_final`` and
    ``text.text_projection``). CONCH tokenises to 128 ids and drops the last before
    appending the class token, so the tower is built for 127 text positions (128 in all).
    The attention mask is CONCH's own (:func:`conch_text_mask`): causal, with the padding
    mask in the class token's row only. open_clip's ``TextTransformer`` (any
    ``correct_cls_mask``) puts the padding mask in every row, which differs from CONCH as
    soon as a ``<pad>`` id stands before the end of the text (a prompt with the literal text
    ``<pad>``: cosine down to 0.968), so the tower runs its own ``forward``.

Two outputs of the image tower (the registry's ``output``):

``joint`` (entry ``conch``)
    the embedding in the joint image-text space, L2-normalised (CONCH's
    ``encode_image(proj_contrast=True, normalize=True)``): zero-shot, text and image search;
``pre-projection`` (entry ``conch-features``)
    the attentional pooler's output after ``ln_contrast``, before the projection, not
    normalised (CONCH's ``encode_image(proj_contrast=False, normalize=False)``): the 512-d
    features CONCH's README and TRIDENT use for linear probes and multiple-instance learning.

The captioning parts (the 256-query caption pooler and the multimodal text decoder) do not
take part in embeddings or zero-shot scoring; their keys are dropped from the checkpoint
(:data:`UNUSED_PREFIXES`) and everything else must fit.

Tokenizer: CONCH's own byte-level BPE (``conch_byte_level_bpe_uncased.json``), run exactly as
CONCH runs it (transformers' ``PreTrainedTokenizerFast``, ``<start_of_text>``,
``<end_of_text>``, ``<pad>``; at most 127 ids, padded, then one ``<pad>`` more). It is not
shipped with slide-clip: it is looked for at the registry entry's ``tokenizer`` path, beside
the weights file, and in an installed ``conch`` package (:func:`find_tokenizer`).

Equality with CONCH's own implementation on random weights is tested
(``tests/test_conch.py``): at full size against CONCH's code as the ``conch-fork`` package
ships it (a dev dependency), and on a scaled-down model against recorded reference outputs
(``tests/assets/make_conch_reference.py``); ``benchmarks/verify_conch.py`` runs the full-size
comparison on real tiles.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from slide_clip.encoders.arch_configs import conch_arch_cfg as _cfg
from slide_clip.encoders.arch_configs import model_input_size, model_resize_size
from slide_clip.encoders.base import Encoder
from slide_clip.encoders.outputs import PRE_PROJECTION
from slide_clip.encoders.spec import ModelSpec
from slide_clip.encoders.weights import file_sha256, hub_error, local_weights, on_device, seeded
from slide_clip.errors import ConfigError

#: Checkpoint keys of CONCH's captioning parts, not used for embeddings or zero-shot scoring.
UNUSED_PREFIXES = ("text_decoder.", "visual.attn_pool_caption.", "visual.ln_caption.")
TOKENIZER_FILE = "conch_byte_level_bpe_uncased.json"
HUB_WEIGHTS_FILE = "pytorch_model.bin"


class ConchVisual(nn.Module):
    """CONCH's image tower up to the joint-space embedding (no captioning pooler)."""

    def __init__(self, embed_dim: int, vision_cfg: dict):
        super().__init__()
        from open_clip.transformer import AttentionalPooler
        from timm.models.vision_transformer import VisionTransformer

        width = int(vision_cfg.get("width", 768))
        size = int(vision_cfg.get("image_size", 448))
        self.trunk = VisionTransformer(
            img_size=size, patch_size=int(vision_cfg.get("patch_size", 16)), embed_dim=width,
            depth=int(vision_cfg.get("layers", 12)), num_heads=int(vision_cfg.get("heads", 12)),
            mlp_ratio=float(vision_cfg.get("mlp_ratio", 4.0)), num_classes=0, dynamic_img_size=True)
        # CONCH's factory never passes its config's attn_pooler_heads on: its poolers always have
        # 8 heads, which is also what the shipped config says
        self.attn_pool_contrast = AttentionalPooler(
            d_model=embed_dim, context_dim=width, n_head=int(vision_cfg.get("attn_pooler_heads", 8)),
            n_queries=int(vision_cfg.get("n_queries_contrast", 1)))
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.proj_contrast = nn.Parameter(width ** -0.5 * torch.randn(embed_dim, embed_dim))
        self.image_size = (size, size)
        self.output_dim = embed_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-projection features (CONCH's ``forward_no_head``): pooled, normalised by
        ``ln_contrast``, not projected."""
        tokens = self.trunk.forward_features(x)  # every token after the final norm, class token first
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])  # the (single) contrastive query

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x) @ self.proj_contrast


def conch_text_mask(text: torch.Tensor, pad_id: int, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """CONCH's additive attention mask for ``(n, L)`` ids followed by the class token:
    ``(n * heads, L + 1, L + 1)``.

    Causal everywhere; the class token's row (the last) also masks padding, shifted by one
    position as CONCH's ``build_cls_mask`` does (key 0 is always kept, key ``j + 1`` is
    masked where id ``j`` is ``<pad>``). Other rows see every earlier position, padding or
    not.
    """
    n, length = text.shape
    size = length + 1
    mask = torch.full((size, size), float("-inf"), dtype=dtype, device=text.device).triu_(1)
    mask = mask.expand(n, size, size).clone()
    keep = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=text.device), text != pad_id], dim=1)
    mask[:, -1, :] = torch.zeros(n, size, dtype=dtype, device=text.device).masked_fill_(~keep, float("-inf"))
    return mask.repeat_interleave(heads, dim=0)


def _text_tower(cfg: dict, embed_dim: int, context_length: int):
    """open_clip's ``TextTransformer`` (CONCH's parameter names and shapes) whose forward pass
    uses CONCH's attention mask (:func:`conch_text_mask`)."""
    from open_clip.transformer import TextTransformer

    class ConchText(TextTransformer):
        def forward(self, text: torch.Tensor) -> torch.Tensor:
            dtype = self.transformer.get_cast_dtype()
            n, length = text.shape
            x = self.token_embedding(text).to(dtype)
            x = torch.cat([x, self.cls_emb.to(dtype).view(1, 1, -1).expand(n, 1, -1)], dim=1)
            x = x + self.positional_embedding[:length + 1].to(dtype)
            x = self.transformer(x, attn_mask=conch_text_mask(text, self.pad_id, self.heads, x.dtype))
            return self.ln_final(x[:, -1]) @ self.text_projection  # the class token, projected

    return ConchText(
        context_length=context_length, vocab_size=int(cfg.get("vocab_size", 32007)),
        width=int(cfg.get("width", 768)), heads=int(cfg.get("heads", 12)), layers=int(cfg.get("layers", 12)),
        output_dim=embed_dim, embed_cls=True, pad_id=int(cfg.get("pad_id", 0)))


class Conch(nn.Module):
    """CONCH for embeddings and zero-shot scoring: ``encode_image``, ``encode_text``, ``logit_scale``."""

    def __init__(self, cfg: dict):
        super().__init__()
        embed_dim = int(cfg["embed_dim"])
        t = cfg["text_cfg"]
        if not t.get("embed_cls", True):
            raise ConfigError("the conch backend builds CONCH's text tower, which appends a class token "
                              "(text_cfg.embed_cls must be true)")
        self.context_length = int(t.get("context_length", 128))
        self.visual = ConchVisual(embed_dim, cfg["vision_cfg"])
        self.text = _text_tower(t, embed_dim, self.context_length - 1)
        self.logit_scale = nn.Parameter(torch.ones([]) * torch.log(torch.tensor(1 / 0.07)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image embeddings in the joint space (not normalised; the Encoder normalises)."""
        return self.visual(x)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings of ``(n, context_length)`` ids; the last id makes room for the class token."""
        if tokens.shape[-1] != self.context_length:
            raise ValueError(f"CONCH takes {self.context_length} token ids per text, got {tokens.shape[-1]}")
        return self.text(tokens[:, :-1])


def create(spec: ModelSpec) -> Conch:
    """The architecture with seeded random weights (seed 0 unless ``spec.seed``)."""
    cfg = _cfg(spec)
    with seeded(spec.seed or 0):
        return Conch(cfg)


def adapt(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CONCH checkpoint without its captioning parts (the rest is loaded strictly)."""
    return {k: v for k, v in state.items() if not k.startswith(UNUSED_PREFIXES)}


def preprocess_cfg(spec: ModelSpec) -> dict:
    """CONCH's image transform: Resize(448, bicubic) of the shorter side, CentreCrop(448), RGB,
    ToTensor, Normalize with OpenAI CLIP's mean and std (the registry entry's values)."""
    if not (spec.image_mean and spec.image_std):
        raise ConfigError(f"model {spec.name!r}: the conch backend needs image_mean and image_std in its entry")
    size = model_input_size(spec)
    return {"size": size, "resize_size": model_resize_size(spec), "mean": list(spec.image_mean),
            "std": list(spec.image_std), "interpolation": spec.image_interpolation or "bicubic",
            "resize_mode": "shortest"}


def _hub_weights(spec: ModelSpec) -> str:
    """The hub repository's ``pytorch_model.bin`` (downloaded, or from the local cache)."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(spec.weights[len("hf-hub:"):], HUB_WEIGHTS_FILE)
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: one line
        raise hub_error(spec, e) from None


def load(spec: ModelSpec, dev: torch.device, precision: str) -> Encoder:
    """Build CONCH for ``spec``: random (seeded), a local file, or the hub's ``pytorch_model.bin``."""
    from slide_clip.encoders.timm_backend import make_transform

    local = replace(spec, weights=_hub_weights(spec)) if spec.weights_kind == "hf-hub" else spec
    built = local_weights(local, create, adapt=lambda model, state: adapt(state))
    if built is None:
        raise ConfigError(f"model {spec.name!r}: CONCH takes hf-hub:ORG/NAME or a file as weights")
    model, weights_sha = on_device(built[0], dev)
    ckpt_sha = built[1]
    cfg = preprocess_cfg(spec)
    features = spec.output == PRE_PROJECTION  # CONCH's encode_image(proj_contrast=False, normalize=False)
    return Encoder(
        spec=spec, model=model, preprocess=make_transform(cfg), device=dev, precision=precision,
        weights_sha256=weights_sha, checkpoint_sha256=ckpt_sha, embed_dim=model.visual.output_dim,
        image_size=(cfg["size"], cfg["size"]), preprocess_cfg=cfg, arch_cfg=_cfg(spec),
        image_fn=model.visual.features if features else None,
    )


def find_tokenizer(spec: ModelSpec) -> Path | None:
    """CONCH's tokenizer file: the entry's ``tokenizer``, a file of that name beside the weights,
    or the one in an installed ``conch`` package (in that order); None if none is found.

    A ``tokenizer`` the entry names is the only one taken: if it is missing, that is an error,
    never another file found elsewhere."""
    candidates: list[Path] = []
    if spec.tokenizer:
        if not Path(spec.tokenizer).is_file():
            raise ConfigError(f"model {spec.name!r}: the tokenizer file its entry names is not there",
                              path=spec.tokenizer, hint=f"Give the path of CONCH's {TOKENIZER_FILE}.")
        return Path(spec.tokenizer)
    if spec.weights_kind == "file":
        candidates.append(Path(spec.weights).parent / TOKENIZER_FILE)
    try:
        found = importlib.util.find_spec("conch")
    except (ImportError, ValueError):
        found = None
    if found is not None and found.submodule_search_locations:
        for loc in found.submodule_search_locations:
            candidates.append(Path(loc) / "open_clip_custom" / "tokenizers" / TOKENIZER_FILE)
    return next((p for p in candidates if p.is_file()), None)


class ConchTokenizer:
    """Texts -> ``(n, context_length)`` ids, as CONCH's own ``tokenize`` makes them.

    CONCH runs its tokenizer file through transformers' ``PreTrainedTokenizerFast`` (at most
    ``context_length - 1`` ids with ``<start_of_text>`` and ``<end_of_text>``, padded with
    ``<pad>``), then appends one ``<pad>`` to make room for the class token. The file itself
    is run here with the ``tokenizers`` library, exactly as written: transformers 4.49-4.57
    override the file's ``add_prefix_space`` and tokenise a text's first word differently
    from the transformers CONCH was released with (tests compare with ids made by CONCH's
    code under transformers 4.40).
    """

    def __init__(self, path: Path, context_length: int):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.context_length = int(context_length)
        self.sha256 = file_sha256(self.path)
        tok = Tokenizer.from_file(str(self.path))
        self.pad_id = tok.token_to_id("<pad>")
        if self.pad_id is None or tok.token_to_id("<start_of_text>") is None or tok.token_to_id("<end_of_text>") is None:
            raise ValueError("not CONCH's tokenizer: <pad>, <start_of_text> or <end_of_text> is missing")
        tok.enable_truncation(max_length=self.context_length - 1)
        tok.enable_padding(pad_id=self.pad_id, pad_token="<pad>", length=self.context_length - 1)
        self._tok = tok

    def __call__(self, texts: list[str]) -> torch.Tensor:
        ids = [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=True)]
        out = torch.tensor(ids, dtype=torch.long)
        return torch.nn.functional.pad(out, (0, 1), value=self.pad_id)  # room for the class token


def tokenizer_for(spec: ModelSpec) -> ConchTokenizer:
    path = find_tokenizer(spec)
    if path is None:
        raise ConfigError(
            f"model {spec.name!r}: CONCH's tokenizer ({TOKENIZER_FILE}) was not found, and zero-shot scoring "
            "and text search need it",
            hint=("Install CONCH's package (pip install git+https://github.com/mahmoodlab/CONCH), put the file "
                  "beside the checkpoint, or give 'tokenizer: FILE' in a registry YAML passed with --models."))
    if spec.tokenizer_sha256 and file_sha256(path) != spec.tokenizer_sha256:
        raise ConfigError(f"model {spec.name!r}: the tokenizer file is not CONCH's (sha256 {file_sha256(path)[:12]}..., "
                          f"expected {spec.tokenizer_sha256[:12]}...)", path=path,
                          hint=f"Give CONCH's own {TOKENIZER_FILE}; another tokenizer would score silently wrong.")
    try:
        return ConchTokenizer(path, int(_cfg(spec)["text_cfg"].get("context_length", 128)))
    except Exception as e:  # noqa: BLE001 - not a tokenizers JSON
        raise ConfigError(f"model {spec.name!r}: cannot read the tokenizer file ({type(e).__name__})", path=path,
                          hint=f"Give CONCH's {TOKENIZER_FILE}.") from None
