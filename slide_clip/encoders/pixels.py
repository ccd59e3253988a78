"""uint8 tiles to model input on the device: the encoder's CenterCrop, ToTensor + Normalize, done there.

Loader processes hand over tiles as uint8 (a quarter of float32's bytes through shared
memory and over PCIe). When the encoder's preprocess is the standard Resize / CenterCrop /
(RGB) / ToTensor / Normalize pipeline and its Resize leaves the tile as it is (the tile is
already the resize size: the model's input size, or a card's larger tile, e.g.
Prov-GigaPath's 256 px before its CenterCrop(224)), the rest is, on the device and in the
same order as torchvision: the centre crop (an exact slice, at torchvision's offsets), then
``x.float() / 255``, ``- mean``, ``/ std`` (float32), with the mean and std the encoder
records in its ``preprocess_cfg``. On a CPU this gives the same numbers as
``encoder.preprocess`` tile by tile (tests check it). Anything else (a tile size that must be
resampled, an unusual preprocess) keeps the per-tile PIL preprocess in the loader.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PixelNorm:
    """Per-channel mean and std (of [0, 1] pixels) the encoder's preprocess normalises with."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: tuple[int, int, int, int] | None = None  # (top, left, height, width) of the centre crop, tile pixels


def _size2(v) -> tuple[int, int] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 1:
        return (int(v[0]), int(v[0]))
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return (int(v[0]), int(v[1]))
    return None


def _close(a, b) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) < 1e-12 for x, y in zip(a, b))


def device_normalisation(preprocess, preprocess_cfg: dict, tile_size: int) -> PixelNorm | None:
    """The crop and normalisation to apply on the device to uint8 ``tile_size`` tiles, or None.

    None unless ``preprocess`` is a torchvision ``Compose`` of exactly the standard steps
    (Resize to ``tile_size``, CenterCrop to at most ``tile_size``, an RGB conversion,
    ToTensor, Normalize) and its Normalize uses the mean and std in ``preprocess_cfg``.
    """
    from torchvision import transforms as T

    steps = getattr(preprocess, "transforms", None)
    mean, std = preprocess_cfg.get("mean"), preprocess_cfg.get("std")
    if not isinstance(preprocess, T.Compose) or not steps or mean is None or std is None:
        return None
    want = (int(tile_size), int(tile_size))
    norm = crop = None
    for step in steps:
        kind = type(step).__name__
        if isinstance(step, T.Resize):
            if crop is not None or (_size2(step.size) != want
                                    and not (isinstance(step.size, int) and step.size == tile_size)):
                return None
        elif isinstance(step, T.CenterCrop):
            size = _size2(step.size)
            if crop is not None or size is None or size[0] > want[0] or size[1] > want[1]:
                return None
            # torchvision's offsets (transforms.functional.center_crop)
            crop = (int(round((want[0] - size[0]) / 2.0)), int(round((want[1] - size[1]) / 2.0)), *size)
        elif kind in ("MaybeConvertMode", "_ConvertMode"):
            if getattr(step, "mode", "RGB") not in ("RGB", None):
                return None
        elif kind in ("ToTensor", "MaybeToTensor"):
            pass
        elif isinstance(step, T.Normalize):
            if norm is not None or step.inplace:
                return None
            norm = step
        elif getattr(step, "__name__", "") == "_convert_to_rgb":  # open_clip's older RGB step
            pass
        else:
            return None
    if norm is None or not (_close(norm.mean, mean) and _close(norm.std, std)):
        return None
    if crop is not None and crop[2:] == want:
        crop = None  # CenterCrop to the tile size: nothing to cut
    return PixelNorm(tuple(float(v) for v in mean), tuple(float(v) for v in std), crop)


def to_model_input(tiles: torch.Tensor, norm: PixelNorm, device: torch.device) -> torch.Tensor:
    """``(n, h, w, 3)`` uint8 tiles -> ``(n, 3, h, w)`` float32 model input on ``device``.

    On CUDA the copy is asynchronous from pinned memory and the result stays channels_last
    (the layout of the uint8 tiles, and the one the model's convolution prefers there);
    elsewhere it is made contiguous like the per-tile path's batches.
    """
    if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"expected (n, h, w, 3) uint8 tiles, got {tuple(tiles.shape)} {tiles.dtype}")
    cuda = device.type == "cuda"
    if cuda and not tiles.is_pinned():
        tiles = tiles.pin_memory()
    x = tiles.to(device, non_blocking=cuda).permute(0, 3, 1, 2)  # a channels_last view
    if norm.crop is not None:  # CenterCrop: a slice of the uint8 tiles, on the device
        top, left, h, w = norm.crop
        x = x[:, :, top:top + h, left:left + w]
    if not cuda:
        x = x.contiguous()  # NCHW like the per-tile path's batches; reordered as uint8 (1 byte a value)
    mean = torch.as_tensor(norm.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.as_tensor(norm.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    x = x.to(torch.float32).div_(255).sub_(mean).div_(std)  # ToTensor's div, then Normalize's sub, div
    return x.contiguous(memory_format=torch.channels_last) if cuda else x
