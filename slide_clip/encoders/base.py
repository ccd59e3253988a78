"""The :class:`Encoder` interface every backend returns, and device/precision choice."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from slide_clip.encoders.outputs import JOINT, PRE_PROJECTION, spec_output, text_refusal
from slide_clip.encoders.spec import ModelSpec
from slide_clip.errors import ConfigError


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


def pick_precision(precision: str, dev: torch.device) -> str:
    """``auto``: bf16 autocast on CUDA where supported, else fp16; fp32 elsewhere."""
    if precision == "auto":
        if dev.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"unknown precision {precision!r}", hint="Use auto, fp32, fp16 or bf16.")
    return precision


def vision_only_error(spec: ModelSpec) -> ConfigError:
    return text_refusal(spec.name, {"vision_only": True})


def text_error(spec: ModelSpec) -> ConfigError:
    """Why ``spec``'s embeddings cannot be compared with text (vision-only, or pre-projection features)."""
    return text_refusal(spec.name, {"output": spec_output(spec)})


@dataclass
class Encoder:
    """A loaded image encoder with its preprocessing and provenance (every backend).

    ``encode_images`` gives the embeddings of the spec's ``output``
    (:mod:`slide_clip.encoders.outputs`): for vision-language models the joint image-text
    space (L2-normalised; ``encode_texts`` gives the text side), for vision-only models their
    L2-normalised image features, for ``pre-projection`` CONCH's features before the
    projection, not normalised.
    """

    spec: ModelSpec
    model: Any
    preprocess: Callable
    device: torch.device
    precision: str  # "fp32", "fp16" or "bf16" (autocast dtype on CUDA)
    weights_sha256: str
    checkpoint_sha256: str | None
    embed_dim: int
    image_size: tuple[int, int]
    preprocess_cfg: dict = field(default_factory=dict)
    arch_cfg: dict | None = None
    image_fn: Callable | None = field(default=None, repr=False)  # pixels -> features (before normalising)
    extra: dict = field(default_factory=dict)  # backend-specific provenance (open_clip: quick_gelu)
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def backend(self) -> str:
        return self.spec.backend

    @property
    def output(self) -> str:
        """What :meth:`encode_images` gives: ``joint``, ``pre-projection`` or ``image``."""
        return spec_output(self.spec)

    @property
    def supports_text(self) -> bool:
        """Whether text embeddings can be compared with this encoder's image embeddings."""
        return self.output == JOINT

    @property
    def logit_scale(self) -> float | None:
        """The model's learned temperature, exp(logit_scale) (about 100 for CLIP); None if vision-only."""
        ls = getattr(self.model, "logit_scale", None)
        return float(ls.detach().exp().item()) if ls is not None and self.supports_text else None

    def provenance(self) -> dict:
        """What the store records about this encoder: enough to rebuild it or refuse clearly."""
        s = self.spec
        return {
            "name": s.name,
            "arch": s.arch,
            "backend": s.backend,
            "vision_only": s.vision_only,
            "output": self.output,
            "normalised": self.output != PRE_PROJECTION,
            "weights_source": s.weights or "random",
            "weights_kind": s.weights_kind,
            "random_weights": s.random_weights,
            "seed": s.seed,
            "weights_sha256": self.weights_sha256,
            "checkpoint_sha256": self.checkpoint_sha256,
            "embed_dim": self.embed_dim,
            "image_size": list(self.image_size),
            "preprocess": self.preprocess_cfg,
            "arch_config": self.arch_cfg,
            "training_mpp": s.training_mpp,
            "precision": self.precision,
            "logit_scale": self.logit_scale,
            "spec": s.to_dict(),
            **self.extra,
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
            return self._embed(x)

    def pixel_norm(self, tile_size: int):
        """How to turn uint8 ``tile_size`` tiles into model input on the device
        (:class:`~slide_clip.encoders.pixels.PixelNorm`), or None when the tiles need this
        encoder's per-tile ``preprocess`` (resampling, or an unusual pipeline)."""
        from slide_clip.encoders.pixels import device_normalisation

        return device_normalisation(self.preprocess, self.preprocess_cfg, tile_size)

    def encode_uint8(self, tiles: torch.Tensor, norm) -> np.ndarray:
        """Embeddings of ``(n, h, w, 3)`` uint8 tiles, normalised on the device with ``norm``
        (from :meth:`pixel_norm`): the same numbers as ``encode_images`` of the tiles run
        through ``preprocess`` one by one."""
        from slide_clip.encoders.pixels import to_model_input

        with torch.inference_mode():
            return self._embed(to_model_input(tiles, norm, self.device))

    def _embed(self, x: torch.Tensor) -> np.ndarray:
        fn = self.image_fn or self.model.encode_image
        with self._autocast():
            feats = fn(x)
        feats = feats.float()
        if self.output != PRE_PROJECTION:
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats.cpu().numpy()

    @property
    def tokenizer(self):
        if not self.supports_text:
            raise text_error(self.spec)
        if self._tokenizer is None:
            if self.spec.backend == "conch":
                from slide_clip.encoders import conch

                self._tokenizer = conch.tokenizer_for(self.spec)
            else:
                from slide_clip.encoders.openclip import tokenizer_for

                self._tokenizer = tokenizer_for(self.spec, self.arch_cfg)
        return self._tokenizer

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised text embeddings (float32, (n, embed_dim)); refused unless the image
        embeddings are in the joint space (vision-only models, pre-projection features)."""
        if not self.supports_text:
            raise text_error(self.spec)
        with torch.inference_mode():
            tokens = self.tokenizer(texts).to(self.device)
            with self._autocast():
                feats = self.model.encode_text(tokens)
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy()
