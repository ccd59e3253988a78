"""Bags of tile embeddings per slide and per patient, read lazily from the stores.

A bag is every tile of a slide (or of all a patient's slides, in slide order): its
embeddings ``(n, d)`` float32, level-0 coordinates ``(n, 2)`` of each tile's top-left corner
in its own slide, and which slide each tile came from. Bags are read from the Zarr stores
chunk by chunk when asked for, never all at once::

    from slide_clip.survival import open_cohort, BagDataset

    cohort = open_cohort("out/")                     # the stores' one model; patients from out/patients.csv
    ds = BagDataset(cohort, level="patient")
    bag = ds[0]                                      # {"id", "features", "coords", "slide_index", "slide_ids"}
    export_h5(cohort, "bags/", level="slide")        # bags/<slide>.h5: features, coords (CLAM/TRIDENT layout)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from slide_clip.errors import StoreError
from slide_clip.explore.cohort import Cohort
from slide_clip.scoring import find_stores
from slide_clip.storage.filesystems import upath
from slide_clip.store import STATUS_TILED, SlideStore, model_key


@dataclass(frozen=True)
class PatientCohort:
    """The complete stores of one embedding model, grouped by patient: an explore
    :class:`~slide_clip.explore.cohort.Cohort` opened strictly (any unusable store is an
    error), with each slide's patient.

    Attributes
    ----------
    cohort : Cohort
        The stores (one model, one set of weights), as explore reads them.
    patients : dict[str, list[str]]
        Patient id -> its slide ids, sorted.
    dropped : tuple of dict
        Listed slides left out (only with ``allow_missing``): ``{"slide", "slide_id", "source",
        "reason"}`` each (see :mod:`slide_clip.survival.patients`).

    ``out``, ``model``, ``weights_sha256`` and ``embed_dim`` are the cohort's; ``stores`` maps
    slide id -> store path, sorted by slide id.
    """

    cohort: Cohort
    patients: dict[str, list[str]]
    dropped: tuple = ()

    @property
    def out(self) -> Path:
        return self.cohort.out

    @property
    def model(self) -> str:
        return self.cohort.model

    @property
    def weights_sha256(self) -> str:
        return self.cohort.weights_sha256

    @property
    def embed_dim(self) -> int:
        return self.cohort.embed_dim

    @property
    def stores(self) -> dict[str, Path]:
        return dict(sorted((s.slide_id, s.path) for s in self.cohort.slides))

    def open(self, slide_id: str) -> SlideStore:
        for s in self.cohort.slides:
            if s.slide_id == slide_id:
                return s.store
        raise KeyError(slide_id)

    @property
    def random_weights(self) -> bool:
        """Whether the embeddings come from random weights (every store holds the same weights)."""
        return self.cohort.random_weights

    def patient_of(self, slide_id: str) -> str:
        for pid, sids in self.patients.items():
            if slide_id in sids:
                return pid
        raise KeyError(slide_id)

    def restrict(self, patients: dict[str, list[str]]) -> "PatientCohort":
        """The stores of these patients (e.g. checked against a clinical table)."""
        keep = {s for sids in patients.values() for s in sids}
        cohort = replace(self.cohort, slides=[s for s in self.cohort.slides if s.slide_id in keep])
        return PatientCohort(cohort, patients, self.dropped)


def _incomplete(path: Path, model: str | None) -> str | None:
    """Why a store cannot be used yet (tiling or embeddings not finished), or None."""
    st = SlideStore.open(path)
    if st.status != STATUS_TILED:
        return f"its store {path.name} is partial (tiling did not finish)"
    keys = st.models()
    if model is not None:
        keys = [k for k in keys if k == model_key(model)]
    if len(keys) == 1:
        name = st.embedding_attrs(keys[0]).get("name", keys[0])
        if not st.is_complete(name):
            a = st.embedding_attrs(name)
            return (f"its store {path.name} has partial embeddings ({a.get('rows_written', 0)} of {st.n_tiles} "
                    "tiles)")
    elif not keys:
        return f"its store {path.name} has no embeddings" + (f" of {model!r}" if model else "")
    return None


def open_cohort(out: str | Path, model: str | None = None, *, manifest: str | Path | None = None,
                stores: list[str | Path] | None = None, allow_missing: bool = False) -> PatientCohort:
    """Open every store in ``out`` (or the ``stores`` given) for one embedding model.

    Every store must be tiled and hold complete embeddings of ``model`` (or of its one
    model), all from the same weights: a partial or mismatched store raises
    :class:`~slide_clip.errors.StoreError` naming it, never a silently smaller cohort.
    Slides and patients come from :func:`slide_clip.survival.patients.list_slides`: a slide
    the manifest (or ``out/patients.csv``) lists without a complete store is a
    :class:`~slide_clip.errors.ConfigError` naming it, unless ``allow_missing``; then it is
    left out and recorded in :attr:`PatientCohort.dropped`.
    """
    from slide_clip.survival.patients import list_slides, missing_error

    out = upath(out)  # a Path, or a UPath for a URL (never Path(url), which folds s3:// into s3:/)
    paths = find_stores(stores or [out])
    if not paths:
        raise StoreError("holds no slide stores", path=out, hint="Run `slide-clip embed` or `slide-clip run` first.")
    by_id: dict[str, Path] = {}
    for p in paths:
        sid = _folder_id(p)
        if sid in by_id:
            raise StoreError(f"holds slide {sid!r}, as does {by_id[sid]}", path=p)
        by_id[sid] = upath(p)
    listing = list_slides(out, by_id, manifest)
    dropped = list(listing.dropped)
    if dropped and not allow_missing:
        raise missing_error(dropped)
    listed = {r.slide_id for r in listing.listed}
    keep: list[Path] = []
    for sid, p in sorted(by_id.items()):
        if allow_missing and sid in listed:
            why = _incomplete(p, model)
            if why is not None:
                dropped += [{"slide": r.given, "slide_id": sid, "source": r.source, "reason": why}
                            for r in listing.listed if r.slide_id == sid]
                continue
        keep.append(p)
    if not keep:
        raise StoreError("holds no complete slide store", path=out, hint="Run `slide-clip embed` first.")
    cohort = Cohort.open(keep, model, out, strict=True)
    for s in cohort.slides:
        if s.slide_id != _folder_id(s.path):  # patients were matched to slides by the stores' folder names
            raise StoreError(f"holds slide {s.slide_id!r}, not {_folder_id(s.path)!r} as its name says",
                             path=s.path, hint="Give each store its slide's name (as `slide-clip embed` does).")
    patients: dict[str, list[str]] = {}
    for s in sorted(cohort.slides, key=lambda s: s.slide_id):
        patients.setdefault(listing.patients[s.slide_id], []).append(s.slide_id)
    return PatientCohort(cohort, dict(sorted(patients.items())), tuple(dropped))


def _folder_id(path: Path) -> str:
    name = upath(path).name
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


def read_slide_bag(store: SlideStore, model: str) -> tuple[np.ndarray, np.ndarray]:
    """One slide's ``(features (n, d) float32, coords (n, 2) int64 level-0)``, read chunk by chunk.

    Raises :class:`~slide_clip.errors.StoreError` on partial or damaged embeddings.
    """
    coords = store.coords()
    d = int(store.embedding_attrs(model)["embed_dim"])
    feats = np.empty((coords.shape[0], d), np.float32)
    seen = 0
    for start, block in store.iter_embeddings(model):
        feats[start:start + len(block)] = block
        seen += len(block)
    if seen != coords.shape[0]:
        raise StoreError(f"has {seen} embedding rows for {coords.shape[0]} tiles", path=store.path)
    return feats, coords


class BagDataset:
    """A torch-style ``Dataset`` of bags, read from the stores on each access.

    Parameters
    ----------
    cohort : PatientCohort
    level : {"patient", "slide"}
        A bag per patient (all its slides' tiles, slide by slide) or per slide.
    ids : list of str, optional
        Only these patients (or slides), in this order; default all, sorted.
    as_torch : bool
        Return torch tensors (default) or numpy arrays.
    cache_mb : float
        Keep bags read so far in memory up to this many MiB (default 0: re-read every time).

    Each item is a dict: ``id``; ``features`` (n, d) float32; ``coords`` (n, 2) int64,
    level-0 pixels of the tile's own slide; ``slide_index`` (n,) int64 into ``slide_ids``.
    Use it with ``torch.utils.data.DataLoader(ds, batch_size=None)`` (bags differ in size).
    """

    def __init__(self, cohort: PatientCohort, level: str = "patient", ids: list[str] | None = None,
                 as_torch: bool = True, cache_mb: float = 0.0):
        if level not in ("patient", "slide"):
            raise ValueError("level must be 'patient' or 'slide'")
        self.cohort, self.level, self.as_torch = cohort, level, as_torch
        self.cache_bytes, self._cache, self._cached = cache_mb * 2**20, {}, 0
        every = list(cohort.patients) if level == "patient" else list(cohort.stores)
        self.ids = list(ids) if ids is not None else every
        unknown = [i for i in self.ids if i not in set(every)]
        if unknown:
            raise KeyError(f"no {level} {unknown[0]!r} in the cohort")

    def __len__(self) -> int:
        return len(self.ids)

    def slides_of(self, i: int) -> list[str]:
        bag = self.ids[i]
        return list(self.cohort.patients[bag]) if self.level == "patient" else [bag]

    def __getitem__(self, i: int) -> dict:
        item = self._cache.get(i)
        if item is None:
            item = self._read(i)
            size = item["features"].nbytes + item["coords"].nbytes
            if self._cached + size <= self.cache_bytes:
                self._cache[i] = item
                self._cached += size
        item = dict(item)
        if self.as_torch:
            import torch

            for k in ("features", "coords", "slide_index"):
                item[k] = torch.from_numpy(item[k])
        return item

    def _read(self, i: int) -> dict:
        sids = self.slides_of(i)
        feats, coords, index = [], [], []
        for k, sid in enumerate(sids):
            f, c = read_slide_bag(self.cohort.open(sid), self.cohort.model)
            feats.append(f)
            coords.append(c)
            index.append(np.full(len(f), k, np.int64))
        item = {"id": self.ids[i], "slide_ids": sids,
                "features": np.concatenate(feats) if feats else np.zeros((0, self.cohort.embed_dim), np.float32),
                "coords": np.concatenate(coords) if coords else np.zeros((0, 2), np.int64),
                "slide_index": np.concatenate(index) if index else np.zeros(0, np.int64)}
        return item


def export_h5(cohort: PatientCohort, folder: str | Path, level: str = "slide") -> list[Path]:
    """Write one HDF5 file per bag, in the layout CLAM/TRIDENT-style MIL trainers read.

    ``<folder>/<id>.h5`` holds ``features`` (n, d) float32 and ``coords`` (n, 2) int64
    (level-0 top-left of each tile in its slide), written one store chunk at a time. The
    ``coords`` dataset and the file carry ``patch_size_level0`` (tile side in level-0
    pixels, rounded; one value per slide when a patient's slides differ), ``patch_size``
    (pixels at the target resolution), ``patch_level`` 0, ``target_mpp``; patient files also
    have ``slide_index`` (n,) and the attribute ``slide_ids``.
    """
    from slide_clip.output import output_errors

    with output_errors(folder, "--h5"):
        return _export_h5(cohort, upath(folder), level)


@contextlib.contextmanager
def _h5_target(path):
    """A local file to write ``path``'s HDF5 into, swapped in (local: renamed from ``.h5.part``;
    a URL: uploaded whole, h5py writing local files only) when the block ends without error."""
    from slide_clip.storage.urls import is_url

    if is_url(path):
        from slide_clip.storage.objects import replace_file

        with replace_file(path) as tmp:
            yield tmp
        return
    tmp = path.with_suffix(".h5.part")
    yield tmp
    tmp.replace(path)


def _export_h5(cohort: PatientCohort, folder: Path, level: str) -> list[Path]:
    import h5py

    from slide_clip.storage.urls import is_url

    if not is_url(folder):
        folder.mkdir(parents=True, exist_ok=True)
    ds = BagDataset(cohort, level, as_torch=False)
    written = []
    for i, bag in enumerate(ds.ids):
        sids = ds.slides_of(i)
        stores = [cohort.open(s) for s in sids]
        n = sum(s.n_tiles for s in stores)
        sizes = [int(round(float(s.tiling["tile_extent_level0"][0]))) for s in stores]
        tile_px = {int(s.tiling["tile_size"]) for s in stores}
        target = {float(s.tiling["target_mpp"]) for s in stores}
        path = folder / f"{bag}.h5"
        with _h5_target(path) as tmp, h5py.File(tmp, "w") as f:
            fe = f.create_dataset("features", shape=(n, cohort.embed_dim), dtype="float32")
            co = f.create_dataset("coords", shape=(n, 2), dtype="int64")
            si = f.create_dataset("slide_index", shape=(n,), dtype="int64") if level == "patient" else None
            at = 0
            for k, st in enumerate(stores):
                c = st.coords()
                co[at:at + len(c)] = c
                if si is not None:
                    si[at:at + len(c)] = k
                rows = 0
                for start, block in st.iter_embeddings(cohort.model):
                    fe[at + start:at + start + len(block)] = block
                    rows += len(block)
                if rows != len(c):
                    raise StoreError(f"has {rows} embedding rows for {len(c)} tiles", path=st.path)
                at += len(c)
            attrs = {"patch_size_level0": sizes[0] if len(set(sizes)) == 1 else np.asarray(sizes),
                     "patch_size": tile_px.pop() if len(tile_px) == 1 else -1, "patch_level": 0,
                     "target_mpp": target.pop() if len(target) == 1 else float("nan")}
            for obj in (f, co):
                obj.attrs.update(attrs)
            f.attrs.update({"model": cohort.model, "weights_sha256": cohort.weights_sha256, "id": bag,
                            "level": level, "slide_ids": np.asarray(sids, dtype=h5py.string_dtype())})
        written.append(path)
    return written
