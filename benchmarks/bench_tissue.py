"""Tissue recall and precision against known truth, tissue algorithm 1 (Otsu) vs 2 (this version).

Synthetic slides (``slide_clip.synthetic``, real pyramidal TIFFs read through OpenSlide): the
slides of issue 19, 1792 x 1792 px at 0.5 µm/px, a pale texture over the slide with 64 px
margins and the ``dense`` texture over a share phi of it (phi from 0 to 1); and ``ellipse``
slides of the same size, a pale ellipse around a dense one of area share phi. Pale textures:
the ``tissue`` texture (base saturation 0.31) and eosin-pale ``stained(s)`` for s = 0.06, 0.1,
0.15, 0.2; the mean smoothed saturation of each texture and of the glass is measured and
printed. Settings: the defaults (2,048 px thumbnail, 224 px tiles at 0.5 µm/px) and
``--target-mpp 1.0`` with ``tissue.thumbnail_max_side: 512``. Per slide and setting:

* pixel level, on the thumbnail: recall = |mask ∩ truth| / |truth|, precision = |mask ∩ truth| / |mask|;
* tile level: tiles kept (mask fraction >= min_tissue 0.25) vs tiles whose true tissue
  fraction (the truth mask, same grid) is >= 0.25: recall, precision, and the counts.

Real slides (``--real``, default the CMU SVS and its DICOM copy under ../shared/data/slides):
no truth, so the mask area, the tiles kept (defaults), the time of ``tissue_mask`` (best of
``--repeats``) and the QC pictures of both algorithms, written to ``--out``.

Algorithm 1 is this version's ``tissue_mask`` with both thresholds set to Otsu's (clamped at
``min_saturation``), which is exactly what algorithm 1 computed (the rest of the mask is the
same code). ``--alternatives``: also skimage's 3-class multi-Otsu (its lowest threshold) on
some of the report's slides, an alternative that was considered. ``--survival-demo``: the
tiles kept on the survival demo cohort's slide geometry.

    .venv/bin/python benchmarks/bench_tissue.py --out /tmp/bench_tissue --json /tmp/bench_tissue.json
    .venv/bin/python benchmarks/bench_tissue.py --no-synthetic --alternatives --survival-demo --real
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from slide_clip import tissue as tissue_module  # noqa: E402
from slide_clip.config import TissueConfig  # noqa: E402
from slide_clip.synthetic import Region, Scene, stained, write_slide  # noqa: E402
from slide_clip.tiling import make_grid, thumbnail_boxes  # noqa: E402
from slide_clip.tissue import qc_image, read_thumbnail, tissue_mask  # noqa: E402

SIDE, MARGIN, MPP = 1792, 64, 0.5
PHIS = (0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.7, 0.85, 1.0)
ELLIPSE_PHIS = (0.0, 0.2, 0.45, 0.7, 1.0)
PALE = {"tissue": "tissue", "s0.06": stained(0.06), "s0.10": stained(0.1), "s0.15": stained(0.15),
        "s0.20": stained(0.2)}
SETTINGS = {"default": (2048, 0.5), "mpp1_thumb512": (512, 1.0)}
TILE, MIN_TISSUE = 224, 0.25


@contextlib.contextmanager
def algorithm(version):
    """Run ``tissue_mask`` as algorithm ``version`` (1: both thresholds Otsu's; "multiotsu", an
    alternative considered: both the lowest of skimage's 3-class multi-Otsu thresholds)."""
    if version == 2:
        yield
        return
    from skimage import filters

    original = tissue_module.saturation_thresholds

    def otsu_only(sat_s, lit, white, sigma, min_saturation):
        if version == "multiotsu":
            t = max(min_saturation, float(filters.threshold_multiotsu(sat_s[lit], classes=3)[0]))
            return t, t
        high = original(sat_s, lit, white, sigma, min_saturation)[1]
        return high, high

    tissue_module.saturation_thresholds = otsu_only
    try:
        yield
    finally:
        tissue_module.saturation_thresholds = original


def scene(phi: float, pale, shape: str = "rect") -> Scene:
    """``rect``: the report's slides (tiles lie well inside the tissue or on glass).
    ``ellipse``: a pale ellipse (radii 760 x 620 px) with a dense ellipse of area share phi at
    its centre: the curved edge cuts tiles at every tissue fraction, so tile precision shows."""
    if shape == "rect":
        regions = [Region("rect", (MARGIN, MARGIN, SIDE - MARGIN, SIDE - MARGIN), pale)]
        if phi > 0:
            regions.append(Region("rect", (MARGIN, MARGIN, MARGIN + (SIDE - 2 * MARGIN) * phi, SIDE - MARGIN),
                                  "dense"))
        return Scene(SIDE, SIDE, tuple(regions))
    c, rx, ry = SIDE / 2, 760.0, 620.0
    regions = [Region("ellipse", (c - rx, c - ry, c + rx, c + ry), pale)]
    if phi > 0:
        k = phi ** 0.5
        regions.append(Region("ellipse", (c - k * rx, c - k * ry, c + k * rx, c + k * ry), "dense"))
    return Scene(SIDE, SIDE, tuple(regions))


def thumbnail(path: Path, max_side: int, mpp: float | None):
    import openslide

    osr = openslide.OpenSlide(str(path))
    try:
        return read_thumbnail(osr, max_side, mpp), osr.dimensions, tuple(osr.level_downsamples)
    finally:
        osr.close()


def grid(dims, mpp_xy, downsamples, mask, thumb, target_mpp):
    return make_grid(dims, mpp_xy, downsamples, mask, thumb.downsample, target_mpp=target_mpp, tile_size=TILE,
                     overlap=0.0, min_tissue=MIN_TISSUE)


def smoothed_saturation(thumb) -> np.ndarray:
    from skimage import filters

    sat, _ = tissue_module._saturation_value(thumb.image)
    return filters.gaussian(sat, sigma=TissueConfig().smoothing_um / thumb.mpp)


def synthetic(workdir: Path) -> list[dict]:
    rows = []
    families = [("rect", name, pale, PHIS) for name, pale in PALE.items()]
    families += [("ellipse", name, PALE[name], ELLIPSE_PHIS) for name in ("tissue", "s0.10", "s0.20")]
    for shape, pale_name, pale, phis in families:
        for phi in phis:
            sc = scene(phi, pale, shape)
            path = workdir / f"{shape}_{pale_name}_{phi}.tif"
            if not path.is_file():
                write_slide(path, sc, MPP)
            for setting, (max_side, target_mpp) in SETTINGS.items():
                thumb, dims, ds = thumbnail(path, max_side, MPP)
                truth = sc.truth(thumb.image.shape[:2])
                true = grid(dims, (MPP, MPP), ds, truth, thumb, target_mpp)
                true_set = {tuple(c) for c in true.coords}
                sat = smoothed_saturation(thumb)
                pale_px = truth & ~sc.truth(truth.shape, texture="dense")
                row = {"shape": shape, "pale": pale_name, "phi": phi, "setting": setting, "true_tiles": len(true),
                       "pale_saturation": float(sat[pale_px].mean()) if pale_px.any() else None,
                       "glass_saturation": float(np.median(sat[~truth]))}
                for v in (1, 2):
                    with algorithm(v):
                        mask = tissue_mask(thumb.image, thumb.mpp, TissueConfig(thumbnail_max_side=max_side))
                    kept = {tuple(c) for c in grid(dims, (MPP, MPP), ds, mask, thumb, target_mpp).coords}
                    hit = int((mask & truth).sum())
                    tp = len(kept & true_set)
                    row[f"v{v}"] = {"recall": hit / max(1, int(truth.sum())), "precision": hit / max(1, int(mask.sum())),
                                    "tiles": len(kept), "tile_recall": tp / max(1, len(true_set)),
                                    "tile_precision": tp / max(1, len(kept))}
                rows.append(row)
                print(f"{shape:7s} {pale_name:6s} phi {phi:4.2f} {setting:14s} pale sat {row['pale_saturation'] or 0:.3f} "
                      f"true {len(true):3d} | v1 tiles {row['v1']['tiles']:3d} r {row['v1']['recall']:.3f} "
                      f"p {row['v1']['precision']:.3f} | v2 tiles {row['v2']['tiles']:3d} r {row['v2']['recall']:.3f} "
                      f"p {row['v2']['precision']:.3f} tile r {row['v2']['tile_recall']:.3f} "
                      f"p {row['v2']['tile_precision']:.3f}", flush=True)
    return rows


def alternatives(workdir: Path) -> list[dict]:
    """Pixel recall of the multi-Otsu alternative on some report slides (default settings)."""
    rows = []
    for pale_name in ("tissue", "s0.10"):
        for phi in (0.0, 0.3, 0.45, 0.7, 1.0):
            sc = scene(phi, PALE[pale_name])
            path = workdir / f"rect_{pale_name}_{phi}.tif"
            if not path.is_file():
                write_slide(path, sc, MPP)
            thumb, _, _ = thumbnail(path, 2048, MPP)
            truth = sc.truth(thumb.image.shape[:2])
            with algorithm("multiotsu"):
                mask = tissue_mask(thumb.image, thumb.mpp)
            hit = int((mask & truth).sum())
            rows.append({"pale": pale_name, "phi": phi, "recall": hit / int(truth.sum()),
                         "precision": hit / max(1, int(mask.sum()))})
            print(f"multi-Otsu {pale_name:6s} phi {phi:4.2f}: recall {rows[-1]['recall']:.3f} "
                  f"precision {rows[-1]['precision']:.3f}", flush=True)
    return rows


def survival_demo(workdir: Path) -> list[dict]:
    """Tiles kept on the survival demo's slides (:mod:`slide_clip.survival.demo`: 64 px tiles at
    1 µm/px), one per dense share (left band, seed 1): truth, algorithm 1, algorithm 2."""
    from slide_clip.survival.demo import MPP as DEMO_MPP
    from slide_clip.survival.demo import TILE as DEMO_TILE
    from slide_clip.survival.demo import demo_scene

    rows = []
    for phi in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        sc, _, _ = demo_scene(phi, True, 1)
        path = write_slide(workdir / f"survival_demo_{phi}.tif", sc, DEMO_MPP)
        thumb, dims, ds = thumbnail(path, 2048, DEMO_MPP)

        def tiles(mask):
            return len(make_grid(dims, (DEMO_MPP, DEMO_MPP), ds, mask, thumb.downsample, target_mpp=DEMO_MPP,
                                 tile_size=DEMO_TILE, overlap=0.0, min_tissue=MIN_TISSUE))

        row = {"phi": phi, "true_tiles": tiles(sc.truth(thumb.image.shape[:2]))}
        for v in (1, 2):
            with algorithm(v):
                row[f"v{v}_tiles"] = tiles(tissue_mask(thumb.image, thumb.mpp))
        rows.append(row)
        print(f"survival demo phi {phi:.1f}: tiles true {row['true_tiles']} v1 {row['v1_tiles']} "
              f"v2 {row['v2_tiles']}", flush=True)
    return rows


def real(paths: list[Path], out: Path, repeats: int) -> list[dict]:
    from slide_clip.slide import open_slide

    rows = []
    for p in paths:
        osr, info = open_slide(p)
        try:
            thumb = read_thumbnail(osr, 2048, info.mpp)
            dims, ds = osr.dimensions, tuple(osr.level_downsamples)
        finally:
            osr.close()
        row = {"slide": p.name, "thumbnail": list(thumb.image.shape[:2]), "thumb_mpp": thumb.mpp}
        masks = {}
        for v in (1, 2):
            times = []
            with algorithm(v):
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    mask = tissue_mask(thumb.image, thumb.mpp)
                    times.append(time.perf_counter() - t0)
            masks[v] = mask
            g = grid(dims, (info.mpp, info.mpp), ds, mask, thumb, 0.5)
            area = float(mask.sum()) * thumb.downsample[0] * thumb.downsample[1] * info.mpp ** 2 / 1e6
            row[f"v{v}"] = {"area_mm2": area, "tiles": len(g), "seconds_best": min(times)}
            qc = qc_image(thumb.image, mask, thumbnail_boxes(g, thumb.downsample),
                          title=f"{p.name} | tissue algorithm {v} | {len(g)} tiles | {area:.2f} mm²")
            qc.save(out / f"{p.name}_algorithm{v}_qc.png")
        row["added_area_share"] = float((masks[2] & ~masks[1]).sum() / max(1, masks[1].sum()))
        row["removed_area_share"] = float((masks[1] & ~masks[2]).sum() / max(1, masks[1].sum()))
        rows.append(row)
        print(f"{p.name}: v1 {row['v1']} | v2 {row['v2']} | added {row['added_area_share']:.3f} "
              f"removed {row['removed_area_share']:.3f}", flush=True)
    return rows


def main(argv=None) -> None:
    shared = REPO.parent.parent / "shared" / "data" / "slides"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_tissue"), help="slides and QC pictures")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--real", type=Path, nargs="*",
                    default=[shared / "CMU-1-Small-Region.svs", shared / "CMU-1-Small-Region-dicom"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--alternatives", action="store_true", help="also the multi-Otsu alternative")
    ap.add_argument("--survival-demo", action="store_true", help="also the survival demo's slides")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    result = {"synthetic": [] if a.no_synthetic else synthetic(a.out),
              "alternatives": alternatives(a.out) if a.alternatives else [],
              "survival_demo": survival_demo(a.out) if a.survival_demo else [], "real": real(a.real, a.out, a.repeats)}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
