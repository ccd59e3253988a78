"""A synthetic survival cohort to try the survival models offline.

``python -m slide_clip.survival.demo FOLDER`` writes into FOLDER:

- ``slides/<slide>.tif``: small synthetic slides (640 x 512 px at 1 µm/px); each is a rectangle
  of tissue in which a second, dense texture covers a random share of the area;
- ``manifest.csv`` (``path,patient_id``): some patients have two slides;
- ``clinical.csv`` (``patient_id,os_months,dead,age``): a patient's hazard is
  ``0.1 * exp(10 * f)``, f = the dense share of its tissue area (from the scenes' geometry);
- ``config.yaml``: tiles of 64 px at 1 µm/px;
- ``models.yaml``, ``tiny-arch.json``, ``tiny.pt``: a tiny open_clip architecture with seeded
  random weights saved as a checkpoint (not a trained model: it stands in for real weights
  on a machine without them, and still tells the two textures apart).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from slide_clip.synthetic import Region, Scene, write_slide
from slide_clip.text import plural

MPP = 1.0
TILE = 64
TINY_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def demo_scene(phi: float, left: bool, seed: int) -> tuple[Scene, float, float]:
    """A 640 x 512 px slide (level-0 pixels): tissue rectangle (32..608, 32..480), the dense
    texture over a share ``phi`` of its width from the left or right edge.

    Returns (scene, tissue area, dense area), areas in level-0 px².
    """
    x0, y0, x1, y1 = 32, 32, 608, 480
    w = phi * (x1 - x0)
    dense = (x0, y0, x0 + w, y1) if left else (x1 - w, y0, x1, y1)
    regions = [Region("rect", (x0, y0, x1, y1), "tissue")]
    if w > 0:
        regions.append(Region("rect", dense, "dense"))
    return Scene(640, 512, tuple(regions), seed=seed), (x1 - x0) * (y1 - y0), w * (y1 - y0)


def write_demo_cohort(folder: str | Path, patients: int = 60, two_slides: int = 20, seed: int = 11,
                      model: bool = True) -> dict:
    """Write the cohort (see the module docstring; ``model=False``: no tiny model); returns
    paths and the ground truth.

    Returns a dict with ``manifest``, ``clinical``, ``config``, ``models`` (paths), ``slides``
    (slide id -> (path, patient id)), ``scenes`` (slide id -> :class:`~slide_clip.synthetic.Scene`),
    ``dense_share`` (patient id -> f).
    """
    import pandas as pd

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    slides, scenes, tissue, dense = {}, {}, {}, {}
    for p in range(patients):
        pid = f"P{p:02d}"
        for k in range(2 if p < two_slides else 1):
            sid = f"s{p:02d}_{k}"
            sc, t_area, d_area = demo_scene(float(rng.uniform(0, 0.9)), bool(rng.integers(2)), seed=p * 10 + k)
            path = write_slide(folder / "slides" / f"{sid}.tif", sc, MPP, levels=2)
            slides[sid], scenes[sid] = (str(path), pid), sc
            tissue[pid] = tissue.get(pid, 0.0) + t_area
            dense[pid] = dense.get(pid, 0.0) + d_area
    pids = sorted(tissue)
    f = np.array([dense[p] / tissue[p] for p in pids])
    T = rng.exponential(1.0 / (0.1 * np.exp(10.0 * f)))
    C = rng.uniform(0, 2.5 * np.quantile(T, 0.9), len(pids))
    clinical = folder / "clinical.csv"
    pd.DataFrame({"patient_id": pids, "os_months": np.round(np.minimum(T, C), 4), "dead": (T <= C).astype(int),
                  "age": rng.integers(40, 80, len(pids))}).to_csv(clinical, index=False)
    manifest = folder / "manifest.csv"
    manifest.write_text("path,patient_id\n" + "".join(f"slides/{Path(p).name},{pid}\n" for p, pid in slides.values()))
    config = folder / "config.yaml"
    config.write_text(f"tiling:\n  target_mpp: {MPP}\n  tile_size: {TILE}\n")
    return {"manifest": manifest, "clinical": clinical, "config": config,
            "models": write_tiny_model(folder) if model else None,
            "slides": slides, "scenes": scenes, "dense_share": dict(zip(pids, f))}


def write_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """A registry YAML naming ``tiny``: the tiny architecture with seeded random weights in a checkpoint."""
    import open_clip
    import torch

    folder = Path(folder)
    arch = folder / "tiny-arch.json"
    arch.write_text(json.dumps(TINY_ARCH, indent=1))
    open_clip.add_model_config(arch)
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-arch", pretrained=None)
    ckpt = folder / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    reg = folder / "models.yaml"
    reg.write_text("models:\n  tiny:\n    arch: tiny-arch\n"
                   f"    arch_config: {arch.resolve()}\n    checkpoint: {ckpt.resolve()}\n"
                   "    description: tiny random-weight architecture (not a trained model)\n")
    return reg


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write a synthetic survival cohort (slides, manifest, clinical table, "
                                             "a tiny checkpointed model).")
    ap.add_argument("folder", type=Path)
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--two-slides", type=int, default=20, help="patients with two slides")
    ap.add_argument("--seed", type=int, default=11)
    a = ap.parse_args(argv)
    r = write_demo_cohort(a.folder, a.patients, a.two_slides, a.seed)
    print(f"{plural(len(r['slides']), 'slide')} of {plural(a.patients, 'patient')} in {a.folder / 'slides'}")
    for k in ("manifest", "clinical", "config", "models"):
        print(f"{k}: {r[k]}")


if __name__ == "__main__":
    main()
