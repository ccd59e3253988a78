"""What a model sees of a tile: the tile as cut, resized by its preprocessing, centre-cropped.

A tile of ``tile_size`` px at ``target_mpp`` µm/px is resized so that its side is
``resize_size`` px (a card's ``Resize(256)``; the model's input size when the card has no
separate resize), then centre-cropped to the model's ``input_size`` px. Therefore

- one model input pixel covers ``target_mpp × tile_size / resize_size`` µm (:attr:`TileView.mpp`,
  stored as ``seen_mpp``): the resize sets the scale, the crop does not change it;
- the model sees the central ``input_size × mpp`` µm of the tile (``seen_um``), a share
  ``(input_size / resize_size)²`` of its area (``seen_fraction``; 1 without a crop).

Prov-GigaPath's card cuts 256 px at 0.5 µm/px, resizes to 256 (nothing to do) and crops
224: 0.5 µm/px, the central 112 µm, 76.6 % of the tile. A 224 px tile would be upsampled to
256 first: 0.4375 µm/px, the central 98 µm. The console note (``pipeline.resampling_note``,
before any model is built) and the store (``encoding.begin_encoding``, from the loaded
encoder) both come from here. No torch import.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TileView:
    """A tile of ``tile_size`` px at ``target_mpp`` µm/px through a model's Resize and CenterCrop."""

    tile_size: int
    target_mpp: float
    resize_size: int
    input_size: int

    @property
    def resampled(self) -> bool:
        """Whether the tile is resized (interpolated) on its way to the model."""
        return self.tile_size != self.resize_size

    @property
    def cropped(self) -> bool:
        """Whether the model sees only the centre of the (resized) tile."""
        return self.input_size < self.resize_size

    @property
    def mpp(self) -> float:
        """µm per model input pixel."""
        return self.target_mpp * self.tile_size / self.resize_size

    @property
    def fraction(self) -> float:
        """Share of the tile's area the model sees."""
        return (min(self.input_size, self.resize_size) / self.resize_size) ** 2

    @property
    def side_um(self) -> float:
        """Side of the square the model sees, µm."""
        return min(self.input_size, self.resize_size) * self.mpp

    def attrs(self) -> dict:
        """What an embedding group records about it (docs/FORMAT.md)."""
        return {"tile_size": self.tile_size, "resampled": self.resampled, "seen_mpp": self.mpp,
                "seen_fraction": self.fraction, "seen_um": self.side_um}

    def note(self, model: str, card_tile: int) -> str | None:
        """One console line when the model does not see the tile pixel for pixel, else None.

        ``card_tile`` is the tile size the model's entry cuts by default."""
        if not (self.resampled or self.cropped):
            return None
        scale = f"{self.mpp:.4g} µm/px"
        share = f"{self.fraction:.1%} of its area, {self.side_um:.4g} µm square"
        if not self.resampled:  # the card's own crop
            return (f"note: {model} sees the central {self.input_size} px of each {self.tile_size} px tile "
                    f"({share}) at {scale}, as its card's Resize({self.resize_size}) + CenterCrop({self.input_size}) "
                    "does (recorded in the stores)")
        leave_out = (f"leave out --tile-size to cut {card_tile} px tiles, as its card does"
                     if card_tile != self.input_size else "leave out --tile-size to tile at the model's input size")
        if self.cropped:
            return (f"note: tiles of {self.tile_size} px at {self.target_mpp:g} µm/px are resampled to "
                    f"{self.resize_size} px and centre-cropped to the model's {self.input_size} px input, so "
                    f"{model} sees {scale} and the centre of each tile ({share}) (recorded in the stores; "
                    f"{leave_out})")
        return (f"note: tiles of {self.tile_size} px at {self.target_mpp:g} µm/px are resampled to the model's "
                f"{self.input_size} px input, so the model sees {scale} (recorded in the stores; {leave_out})")


def encoder_view(encoder, tile_size: int, target_mpp: float) -> TileView:
    """The view of a loaded encoder (from the preprocessing it records)."""
    size = int(encoder.image_size[0])
    return TileView(int(tile_size), float(target_mpp), int(encoder.preprocess_cfg.get("resize_size") or size), size)


def spec_view(spec, tile_size: int, target_mpp: float) -> TileView:
    """The view of a model before it is built (from its registry entry and architecture config)."""
    from slide_clip.encoders.arch_configs import model_input_size, model_resize_size

    return TileView(int(tile_size), float(target_mpp), model_resize_size(spec), model_input_size(spec))
