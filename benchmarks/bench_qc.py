"""Size and write time of the QC picture (`<slide>_qc.png`), as `embed` writes it.

    python benchmarks/bench_qc.py [SLIDE ...]   (default: the CMU SVS and a 12288 x 8192 synthetic slide)

Draws each slide's QC picture with the pipeline's own functions (thumbnail, tissue mask, tile
grid at 0.5 µm/px, 224 px tiles) and saves it as `embed` does (`compress_level=1`); prints
the file size, the picture's size and the seconds drawing and saving took.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def qc_of(slide: Path, out: Path) -> dict:
    from slide_clip.config import load_config
    from slide_clip.slide import open_slide
    from slide_clip.tiling import make_grid, thumbnail_boxes
    from slide_clip.tissue import qc_image, read_thumbnail, tissue_mask

    cfg = load_config()
    osr, info = open_slide(slide)
    try:
        th = read_thumbnail(osr, mpp=info.mpp_x, path=slide)
        mask = tissue_mask(th.image, th.mpp, cfg.tissue)
        grid = make_grid((info.width, info.height), (info.mpp_x, info.mpp_y), info.level_downsamples, mask,
                         th.downsample, target_mpp=0.5, tile_size=224, overlap=0.0, min_tissue=0.25)
    finally:
        osr.close()
    t0 = time.perf_counter()
    pic = qc_image(th.image, mask, thumbnail_boxes(grid, th.downsample),
                   title=f"{slide.stem}: {len(grid)} tiles of 224 px at 0.5 µm/px")
    t1 = time.perf_counter()
    path = out / f"{slide.stem}_qc.png"
    pic.save(path, compress_level=1)
    t2 = time.perf_counter()
    return {"slide": slide.name, "picture": f"{pic.size[0]}x{pic.size[1]} {pic.mode}", "tiles": len(grid),
            "bytes": path.stat().st_size, "draw_s": round(t1 - t0, 3), "save_s": round(t2 - t1, 3)}


def main(argv):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        slides = [Path(a) for a in argv]
        if not slides:
            from slide_clip.synthetic import Region, Scene, write_slide

            cmu = [p / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs" for p in ROOT.parents]
            slides = [p for p in cmu if p.is_file()][:1]
            big = out / "synthetic_12288x8192.tif"  # 6 x 4 mm at 0.5 µm/px, two textures
            write_slide(big, Scene(12288, 8192, (Region("ellipse", (300, 300, 11900, 7800), "tissue"),
                                                 Region("rect", (6000, 2000, 10000, 6000), "dense"))), 0.5,
                        levels=4)
            slides.append(big)
        for s in slides:
            r = qc_of(s, out)
            print(f"{r['slide']}: {r['bytes'] / 1e6:.2f} MB ({r['picture']}, {r['tiles']} tiles), "
                  f"drawn in {r['draw_s']} s, saved in {r['save_s']} s")


if __name__ == "__main__":
    main(sys.argv[1:])
