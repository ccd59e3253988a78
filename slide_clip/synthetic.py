"""Synthetic brightfield slides with known tissue, for tests, benchmarks and `doctor` checks.

A scene is defined in level-0 pixels: a glass background and regions (ellipses or
rectangles) of H&E-like texture. It is rendered tile by tile into a pyramidal tiled TIFF
that OpenSlide opens as ``generic-tiff`` with its resolution set, so memory stays small
whatever the slide's size. The ground-truth tissue mask is available at any scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Texture colours, RGB: an eosin-pink tissue with hematoxylin nuclei, and a second, dense
#: purple texture (a stand-in for, say, a tumour or lymphocyte region).
TEXTURES = {
    "tissue": {"base": (232, 160, 200), "spot": (120, 60, 160), "period": (14.0, 11.0), "cut": 0.55},
    "dense": {"base": (150, 80, 170), "spot": (70, 30, 110), "period": (5.0, 6.0), "cut": 0.2},
    # Artefacts, not tissue: a green marker stroke and black debris.
    "green_ink": {"base": (40, 150, 70), "spot": (30, 130, 60), "period": (9.0, 9.0), "cut": 0.9},
    "black": {"base": (15, 15, 18), "spot": (25, 25, 25), "period": (9.0, 9.0), "cut": 0.9},
}
ARTEFACTS = frozenset({"green_ink", "black"})
GLASS = (243, 241, 246)


@dataclass(frozen=True)
class Texture:
    """A texture given by value rather than by name in :data:`TEXTURES` (a :class:`Region` takes either).

    ``base`` and ``spot`` are RGB; spots show where ``sin(y / period_y) * sin(x / period_x) > cut``.
    ``artefact`` textures are not tissue in :meth:`Scene.truth`.
    """

    base: tuple[int, int, int]
    spot: tuple[int, int, int]
    period: tuple[float, float] = (14.0, 11.0)
    cut: float = 0.55
    artefact: bool = False


def stained(saturation: float, value: float = 0.94, hue_deg: float = 330.0) -> Texture:
    """Eosin-like tissue whose base colour has HSV ``saturation`` (pale stroma at 0.05-0.2, the
    ``tissue`` texture's base is at 0.31) and sparse nuclei twice as saturated and darker.

    The nuclei cover 8.5 % of the area, so the texture's mean saturation is about
    ``1.09 * saturation`` before the rendering noise (which adds a little); benchmarks report the
    measured value.
    """
    import colorsys

    if not 0 < saturation <= 0.5:
        raise ValueError("saturation must be in (0, 0.5]")

    def rgb(h, s, v):
        return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h / 360, s, v))

    return Texture(rgb(hue_deg, saturation, value), rgb(285.0, min(1.0, 2 * saturation), 0.8 * value),
                   period=(14.0, 11.0), cut=0.75)


def _texture(name) -> dict:
    if isinstance(name, Texture):
        return {"base": name.base, "spot": name.spot, "period": name.period, "cut": name.cut}
    return TEXTURES[name]


def _is_artefact(name) -> bool:
    return name.artefact if isinstance(name, Texture) else name in ARTEFACTS


@dataclass(frozen=True)
class Region:
    """An area of one texture; coordinates are level-0 pixels."""

    kind: str  # "ellipse" or "rect"
    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    texture: str | Texture = "tissue"  # a name in TEXTURES, or a Texture

    def contains(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        x0, y0, x1, y1 = self.box
        if self.kind == "rect":
            return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    regions: tuple[Region, ...] = field(default=())
    seed: int = 0

    def render(self, x0: int, y0: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the pixels whose level-0 top-left is x0 + i*downsample."""
        xs = x0 + (np.arange(w) + 0.5) * downsample
        ys = y0 + (np.arange(h) + 0.5) * downsample
        X, Y = xs[None, :], ys[:, None]  # broadcast, never materialised twice
        out = np.empty((h, w, 3), dtype=np.int16)
        out[:] = GLASS
        for r in self.regions:
            inside = r.contains(X, Y)
            if not inside.any():
                continue
            t = _texture(r.texture)
            px, py = t["period"]
            spot = (np.sin(ys / py)[:, None] * np.sin(xs / px)[None, :]) > t["cut"]
            col = np.where(spot[..., None], np.array(t["spot"], np.int16), np.array(t["base"], np.int16))
            out[inside] = col[inside]
        rng = np.random.default_rng([self.seed, int(x0), int(y0), int(w), int(h), int(downsample * 1000)])
        out += rng.integers(-5, 6, size=out.shape, dtype=np.int16)
        return np.clip(out, 0, 255).astype(np.uint8)

    def truth(self, shape: tuple[int, int], texture: str | None = None) -> np.ndarray:
        """Ground-truth mask (h, w) of the whole slide at a scale.

        True where tissue shows (of ``texture`` only, if given); artefacts painted later
        cover what lies under them.
        """
        h, w = shape
        xs = (np.arange(w) + 0.5) * self.width / w
        ys = (np.arange(h) + 0.5) * self.height / h
        X, Y = np.meshgrid(xs, ys)
        m = np.zeros(shape, dtype=bool)
        for r in self.regions:
            inside = r.contains(X, Y)
            if _is_artefact(r.texture) or (texture is not None and r.texture != texture):
                m &= ~inside
            else:
                m |= inside
        return m


def write_slide(
    path: str | Path,
    scene: Scene,
    mpp: float | None = 0.5,
    *,
    levels: int = 3,
    tile: int = 256,
    compression: str | None = "zlib",
    compression_level: int = 1,
) -> Path:
    """Write ``scene`` as a pyramidal tiled TIFF (each level half the previous).

    ``compression`` is ``zlib`` (``compression_level``), ``jpeg`` (RGB JPEG tiles, like most
    scanners' files; ``compression_level`` is then the JPEG quality, 90 when left at 1;
    needs ``imagecodecs``) or None. ``mpp`` (µm per level-0 pixel) is stored in the resolution tags (centimetres); None
    writes no resolution, like a slide whose scanner forgot it.
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=scene.width * scene.height * 3 > 2**31) as tif:
        for level in range(levels):
            ds = 2**level
            w, h = max(1, scene.width // ds), max(1, scene.height // ds)
            if level and max(w, h) < tile:
                break

            def tiles(ds=ds, w=w, h=h):
                for ty in range(0, h, tile):
                    for tx in range(0, w, tile):
                        t = np.full((tile, tile, 3), 255, np.uint8)
                        th, tw = min(tile, h - ty), min(tile, w - tx)
                        t[:th, :tw] = scene.render(tx * ds, ty * ds, tw, th, ds)
                        yield t

            kwargs = {}
            if mpp is not None:
                res = 1e4 / (mpp * ds)
                kwargs = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tif.write(tiles(), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                      compression=compression,
                      compressionargs=_compression_args(compression, compression_level),
                      subfiletype=1 if level else 0, **kwargs)
    return path


def _compression_args(compression: str | None, level: int) -> dict | None:
    if compression == "zlib":
        return {"level": level}
    if compression == "jpeg":
        return {"level": 90 if level == 1 else level}
    return None


def demo_scene(mpp: float = 0.5) -> Scene:
    """A 3 x 2 mm slide: an ellipse of tissue holding a rectangle of a second, denser texture."""
    def px(um):
        return um / mpp

    return Scene(int(px(3000)), int(px(2000)), (
        Region("ellipse", (px(150), px(150), px(2850), px(1850)), "tissue"),
        Region("rect", (px(1700), px(500), px(2500), px(1500)), "dense"),
    ))


def main(argv=None) -> None:
    """``python -m slide_clip.synthetic OUT.tif [--mpp 0.5]``: write the demo slide."""
    import argparse

    ap = argparse.ArgumentParser(description="Write a synthetic two-texture brightfield slide (pyramidal TIFF).")
    ap.add_argument("out", type=Path)
    ap.add_argument("--mpp", type=float, default=0.5, help="µm per level-0 pixel (default 0.5)")
    a = ap.parse_args(argv)
    write_slide(a.out, demo_scene(a.mpp), a.mpp)
    print(a.out)


if __name__ == "__main__":
    main()
