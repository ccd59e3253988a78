"""Hostile slide inputs, all written here (no downloads): broken, unusual and non-brightfield files,
DICOM series made from the shared DICOM copy of CMU-1-Small-Region with pydicom.

Each writer returns the path to give slide-clip; ``tests/test_hostile.py`` says which
one-line error each must give.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import tifffile

from slide_clip.synthetic import Region, Scene, write_slide


def small_scene(mpp: float = 0.5, width_um: float = 600, height_um: float = 450) -> Scene:
    """A small brightfield scene: an ellipse of tissue (level-0 pixels at ``mpp``)."""
    w, h = int(width_um / mpp), int(height_um / mpp)
    return Scene(w, h, (Region("ellipse", (0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h), "tissue"),))


def good_slide(path: Path, mpp: float = 0.5) -> Path:
    return write_slide(path, small_scene(mpp), mpp, levels=2)


def zero_byte(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def truncated(path: Path, source: Path, keep: float = 0.5) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def plain_rgb_tiff(path: Path) -> Path:
    tifffile.imwrite(path, np.full((300, 400, 3), 200, np.uint8), photometric="rgb")
    return path


def grey16_tiff(path: Path) -> Path:
    tifffile.imwrite(path, (np.arange(300 * 400, dtype=np.uint16) % 4096).reshape(300, 400),
                     photometric="minisblack")
    return path


def multichannel_tiff(path: Path, channels: int = 5) -> Path:
    """A tiled, pyramidal, qptiff-like fluorescence image: one 8-bit greyscale page per channel."""
    rng = np.random.default_rng(0)
    with tifffile.TiffWriter(path) as tif:
        for _ in range(channels):
            tif.write(rng.integers(0, 40, (512, 512), dtype=np.uint8), tile=(256, 256),
                      photometric="minisblack", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    return path


def rgba_tiff(path: Path) -> Path:
    img = np.full((300, 400, 4), 200, np.uint8)
    img[..., 3] = 255
    tifffile.imwrite(path, img, photometric="rgb", extrasamples=["unassalpha"])
    return path


def dpi96_slide(path: Path) -> Path:
    return write_slide(path, small_scene(0.5), 25.4e3 / 96, levels=2)


def coarse_slide(path: Path) -> Path:
    """A real-looking slide scanned at 2 µm/px: coarser than a 0.5 µm/px target."""
    return write_slide(path, small_scene(2.0, 2400, 1800), 2.0, levels=2)


# ------------------------------------------------------------------------------ DICOM
def _dicom_copy(src_dir: Path, dst: Path, *, new_series: bool, drop: str | None = None,
                prefix: str = "") -> list[Path]:
    """Copy a DICOM WSI series into ``dst`` (pydicom); a new SeriesInstanceUID and instance UIDs
    if ``new_series``; ``drop`` deletes that attribute from the VOLUME instance."""
    import pydicom
    from pydicom.uid import generate_uid

    dst.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    out = []
    for f in sorted(src_dir.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        if new_series:
            ds.SeriesInstanceUID = series
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if drop and "VOLUME" in ds.ImageType:
            delattr(ds, drop)
        flavor = str(ds.ImageType[2]).lower() if "ImageType" in ds else "volume"
        p = dst / f"{prefix}{flavor}.dcm"
        ds.save_as(p)
        out.append(p)
    return out


def two_series_beside_svs(dst: Path, cmu_dicom: Path, svs: Path) -> Path:
    """A folder holding two DICOM series (the shared one, and a copy as a new series) and an SVS."""
    _dicom_copy(cmu_dicom, dst, new_series=False, prefix="s1_")
    _dicom_copy(cmu_dicom, dst, new_series=True, prefix="s2_")
    shutil.copy(svs, dst / "beside.svs")
    return dst


def dicom_missing(dst: Path, cmu_dicom: Path, attr: str = "ImageType") -> Path:
    """A DICOM WSI series whose VOLUME instance lacks an attribute OpenSlide needs."""
    _dicom_copy(cmu_dicom, dst, new_series=True, drop=attr)
    return dst


def dicom_truncated(dst: Path, cmu_dicom: Path) -> Path:
    """A DICOM WSI series whose VOLUME instance was cut short (a partial copy)."""
    files = _dicom_copy(cmu_dicom, dst, new_series=True)
    vol = max(files, key=lambda f: f.stat().st_size)
    data = vol.read_bytes()
    vol.write_bytes(data[: len(data) // 3])
    return dst


# ------------------------------------------------------------------------------ input-side (issue 20)
def dark_slide(path: Path) -> Path:
    """A tiled RGB TIFF at 0.5 µm/px with a dark background (a fluorescence-like scan): it opens and
    its resolution is valid, so it is refused only after its thumbnail is read."""
    img = np.full((1024, 1536, 3), 12, np.uint8)
    img[300:700, 400:1100] = (40, 200, 60)
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    return path


def corrupt_jpeg_tile(path: Path, row: int, col: int, level_page: int = 0) -> tuple[int, int]:
    """Flip 40 bytes in the middle of one JPEG file tile (row, col) of a tiled JPEG TIFF page, as bit
    rot or a damaged copy would; returns that tile's level-0 origin (x, y) for level 0."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level_page]
        cols = -(-page.imagewidth // page.tilewidth)
        k = row * cols + col
        offset, size = int(page.dataoffsets[k]), int(page.databytecounts[k])
        origin = (col * page.tilewidth, row * page.tilelength)
    data = bytearray(path.read_bytes())
    start = offset + size // 3
    data[start:start + 40] = bytes(b ^ 0xFF for b in data[start:start + 40])
    path.write_bytes(bytes(data))
    return origin


# ------------------------------------------------------------------------------ damaged stores
# Damage done to a real store on disk, as a disk, a copy or a hand edit would do it.
def chunk_files(array_dir: Path) -> list[Path]:
    """The chunk files of a Zarr v3 array folder, in order."""
    return sorted(p for p in (Path(array_dir) / "c").rglob("*") if p.is_file())


def delete_chunk(array_dir: Path) -> Path:
    """Delete an array's first chunk file (a file lost from a copy)."""
    p = chunk_files(array_dir)[0]
    p.unlink()
    return p


def truncate_chunk(array_dir: Path, keep: float = 0.5) -> Path:
    """Cut an array's first chunk file short (a partial copy, a full disk): Blosc cannot decode it."""
    p = chunk_files(array_dir)[0]
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])
    return p


def edit_shape(array_dir: Path, rows: int) -> Path:
    """Edit an array's ``zarr.json`` so that it claims ``rows`` rows (its chunks stay as they are)."""
    import json

    meta = Path(array_dir) / "zarr.json"
    m = json.loads(meta.read_text())
    m["shape"] = [rows, *m["shape"][1:]]
    meta.write_text(json.dumps(m))
    return meta


def drop_metadata(node_dir: Path) -> Path:
    """Delete a group's or array's ``zarr.json`` (the folder and its chunks stay)."""
    meta = Path(node_dir) / "zarr.json"
    meta.unlink()
    return meta


def emptied_score_set(set_dir: Path) -> Path:
    """What an interrupted score-set write of older versions left: the set's group, without
    attributes or arrays (they deleted the old set first, then wrote the new one)."""
    import json
    import shutil

    set_dir = Path(set_dir)
    shutil.rmtree(set_dir)
    set_dir.mkdir()
    (set_dir / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    return set_dir
