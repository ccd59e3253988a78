"""A survival experiment: clinical table + stores -> cross-validated baselines, risk, metrics,
Kaplan-Meier curves, heatmaps and fitted models on disk.

Outputs (see docs/FORMAT.md, "Survival outputs"; each run folder is written beside the
previous one of its name and swapped in when complete, :mod:`slide_clip.survival.rundir`)::

    out/survival/<baseline>/<run name>/report.json   settings, features, headline, pooled and per-fold metrics,
                                                      small-cohort check, data hash, versions
                                      risk.csv        patient_id, fold, risk, risk_z, time, event, group
                                      km.png          out-of-fold high/low risk groups, log-rank p
                                      features.parquet (coxnet) the model's input table, one row per patient
                                      models/fold<k>.json (coxnet) or fold<k>.safetensors (abmil)
                                      heatmaps/<slide>_attention.png, <slide>_tile_risk.png   (abmil)
                                      top_tiles.png                                            (abmil)
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import time as _time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from slide_clip.encoders.outputs import embeddings_line
from slide_clip.errors import ConfigError, OutputError, SlideClipError, SlideError
from slide_clip.storage.filesystems import upath
from slide_clip.store import model_key
from slide_clip.survival.bags import BagDataset, PatientCohort, open_cohort
from slide_clip.survival.clinical import Clinical, check_outcomes, join_cohort, read_clinical
from slide_clip.survival.folds import patient_folds
from slide_clip.survival.metrics import harrell_c, km_plot
from slide_clip.survival.report import console_lines
from slide_clip.survival.rundir import run_folder, run_name
from slide_clip.survival.validation import FoldData, cv_concordance, permutation_p, small_cohort
from slide_clip.text import plural

BASELINES = ("coxnet", "abmil")
HEATMAPS = ("all", "gallery", "none")


@dataclass
class SurvivalSettings:
    """What a run does. ``name`` defaults to ``<embedding model>-<folds>fold-seed<seed>``.

    Coxnet's inputs are exactly what is named here: the mean tile embedding, the max tile
    embedding if ``with_max``, the columns of each score set in ``score_sets`` and the
    clinical ``covariates``; never whatever else the stores happen to hold.
    """

    baselines: tuple[str, ...] = BASELINES
    folds: int = 5
    seed: int = 0
    name: str | None = None
    n_boot: int = 500
    with_max: bool = False
    score_sets: tuple[str, ...] = ()
    covariates: tuple[str, ...] = ()
    heatmaps: str = "all"  # ABMIL heatmaps of "all" slides, of the "gallery" patients' slides, or "none"
    gallery_patients: int = 3
    gallery_tiles: int = 6
    abmil: dict = field(default_factory=dict)  # overrides of ABMILSettings
    allow_missing: bool = False  # leave out listed slides without a complete store (and patients left without one)
    permutations: int = 0  # permutation test of the headline: the whole cross-validation per permutation

    def to_dict(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        for k in ("baselines", "score_sets", "covariates"):
            d[k] = list(d[k])
        return d


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("slide-clip", "scikit-survival", "scikit-learn", "torch", "numpy", "pandas", "zarr", "h5py",
                "matplotlib", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def data_hash(clinical: Clinical, cohort: PatientCohort, features: dict, inputs: pd.DataFrame | None = None) -> str:
    """sha256 over the outcome rows, every slide's identity (fingerprint, weights, tiles,
    patient), the model's feature list and, for a table model, its input values."""
    h = hashlib.sha256()
    t = clinical.table.loc[list(cohort.patients)]
    for pid, row in t[["time", "event"]].iterrows():
        h.update(f"{pid}\t{row['time']!r}\t{int(row['event'])}\n".encode())
    for sid in cohort.stores:
        st = cohort.open(sid)
        h.update(f"{sid}\t{cohort.patient_of(sid)}\t{st.slide.get('fingerprint')}\t{st.n_tiles}\t"
                 f"{cohort.weights_sha256}\n".encode())
    h.update(json.dumps(features, sort_keys=True).encode())
    if inputs is not None:
        h.update(np.ascontiguousarray(inputs.to_numpy(np.float64)).tobytes())
    return h.hexdigest()


def _check_covariates(clinical: Clinical, covariates) -> None:
    for c in covariates:
        if c not in clinical.table.columns:
            raise ConfigError(f"has no covariate column {c!r}", path=clinical.source)
        if not pd.api.types.is_numeric_dtype(clinical.table[c]) or clinical.table[c].isna().any():
            raise ConfigError(f"covariate {c!r} must be numeric without missing values", path=clinical.source,
                              hint="Encode categories as 0/1 columns and fill in missing values.")


# ----------------------------------------------------------------------------- writing
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]|No space left on device")


def _disk_errno(exc: BaseException) -> int | None:
    """The errno of a disk failure in ``exc``'s chain (pyarrow puts it only in its message)."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            if e.errno:
                return e.errno
            m = _ERRNO_IN_TEXT.search(str(e))
            if m:
                return int(m.group(1)) if m.group(1) else errno.ENOSPC
        e = e.__cause__ or e.__context__
    return None


_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
         errno.EFBIG: "the file is too large for the file system"}
_DENIED = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted"}


@contextmanager
def _writing(where: Path):
    """Disk failures while a run writes its folder, as one line naming it and what to do."""
    try:
        yield
    except SlideClipError:
        raise
    except Exception as exc:  # noqa: BLE001 - only disk failures are translated; others go on
        code = _disk_errno(exc)
        path = getattr(exc, "filename", None) or where
        if code in _FULL:
            raise OutputError(f"cannot write: {_FULL[code]}", path=path,
                              hint="Free space and run the same command again: the previous results of this run "
                                   "name are kept until a new run is complete.") from None
        if code in _DENIED:
            raise OutputError(f"cannot write: {_DENIED[code]}", path=path,
                              hint="survival writes its results under OUT/survival/: make OUT writable, or copy the "
                                   "stores to a writable folder and run there.") from None
        raise


def _probe(folder: Path) -> None:
    """Fail now, not after the training, when the results cannot be written."""
    from slide_clip.storage.urls import is_url

    if is_url(folder):
        from slide_clip.storage import objects

        p = f"{str(folder).rstrip('/')}/.write-test-{id(folder)}"
        objects.write_bytes(p, b"x")
        objects.remove(p)
        return
    with _writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / f".write-test-{id(folder)}"
        p.write_bytes(b"x")
        p.unlink()


# ----------------------------------------------------------------------------- cross-validation
@dataclass
class CrossValidation:
    """Out-of-fold risks of one cross-validation (patients in ``pids`` order) and what made them."""

    risk: np.ndarray
    train_risk: dict[int, np.ndarray]
    train_idx: dict[int, np.ndarray]
    models: dict[int, object]
    info: list[dict] = field(default_factory=list)


def _outcomes(clinical: Clinical, patients: list[str]) -> tuple[np.ndarray, np.ndarray]:
    t = clinical.table.loc[patients]
    return t["time"].to_numpy(float), t["event"].to_numpy(int)


def cv_coxnet(table: pd.DataFrame, cols: list[str], t, e, folds, k: int, seed: int, log=None) -> CrossValidation:
    """Fit the elastic-net Cox model on every fold's training patients; risks of its test patients."""
    from slide_clip.survival.coxnet import fit_coxnet

    cv = CrossValidation(np.full(len(t), np.nan), {}, {}, {})
    for f in range(k):
        tr, te = folds != f, folds == f
        m = fit_coxnet(table[tr], t[tr], e[tr], cols, seed=seed + f)
        cv.risk[te] = m.risk(table[te])
        cv.train_risk[f], cv.train_idx[f], cv.models[f] = m.risk(table[tr]), np.flatnonzero(tr), m
        cv.info.append({"fold": f, "alpha": m.alpha, "l1_ratio": m.l1_ratio, "inner": m.inner_scores,
                        "n_features": len(cols), "nonzero": m.nonzero})
        if log:
            log(f"coxnet fold {f}: alpha {m.alpha:.4g}, {m.nonzero} of {len(cols)} coefficients non-zero")
    return cv


def cv_abmil(cohort: PatientCohort, ds: BagDataset, t, e, folds, k: int, seed: int, s, log=None) -> CrossValidation:
    """Train ABMIL on every fold's training patients; risks of its test patients (all tiles)."""
    from slide_clip.survival.abmil import fit_abmil

    pids = ds.ids
    cv = CrossValidation(np.full(len(t), np.nan), {}, {}, {})
    for f in range(k):
        tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
        m = fit_abmil(cohort, [pids[i] for i in tr], t[tr], e[tr], s, seed=seed * 1000 + f, log=log, bags=ds)
        cv.models[f] = m
        cv.train_risk[f], cv.train_idx[f] = np.array([m.predict_bag(ds[i]["features"])[0] for i in tr]), tr
        for i in te:
            cv.risk[i] = m.predict_bag(ds[i]["features"])[0]
        if log:
            log(f"abmil fold {f}: trained on {plural(len(tr), 'patient')}")
    return cv


def _fold_array(pids: list[str], events, k: int, seed: int) -> np.ndarray:
    fold = patient_folds(pids, events, k, seed)
    return np.array([fold[p] for p in pids])


def _permutation_null(run_cv, pids: list[str], t, e, settings: SurvivalSettings, log) -> list[float]:
    """The headline statistic (mean Harrell's C over folds) of the whole cross-validation
    rerun on outcomes permuted among patients (folds redrawn, every model refitted)."""
    rng = np.random.default_rng([settings.seed, 20])
    null = []
    n = settings.permutations
    for b in range(n):
        perm = rng.permutation(len(pids))
        tp, ep = t[perm], e[perm]
        fp = _fold_array(pids, ep, settings.folds, settings.seed)
        try:
            cv = run_cv(tp, ep, fp)
            null.append(float(np.mean([harrell_c(tp[fp == f], ep[fp == f], cv.risk[fp == f])
                                       for f in range(settings.folds)])))
        except ArithmeticError:
            null.append(float("nan"))
        if (b + 1) % max(1, n // 4) == 0:
            log(f"permutations: {b + 1} of {n}")
    return null


# ----------------------------------------------------------------------------- one run, written
def _finish(run_dir: Path, baseline: str, pids: list[str], folds: np.ndarray, cv: CrossValidation, t, e,
            settings: SurvivalSettings, clinical: Clinical, cohort: PatientCohort, features: dict, inputs, extra: dict,
            t0: float, null: list[float] | None, dropped_patients: list[str]) -> dict:
    k = settings.folds
    fd = [FoldData(f, t[folds == f], e[folds == f], cv.risk[folds == f], t[cv.train_idx[f]], e[cv.train_idx[f]],
                   cv.train_risk[f]) for f in range(k)]
    z = np.full(len(pids), np.nan)
    for f in range(k):
        z[folds == f] = fd[f].z
    medians = {f: float(np.median(r)) for f, r in cv.train_risk.items()}
    oof = pd.DataFrame({"patient_id": pids, "fold": folds, "risk": cv.risk, "risk_z": z, "time": t, "event": e})
    oof["group"] = np.where(oof["risk"].to_numpy() > oof["fold"].map(medians).to_numpy(), "high", "low")
    oof.to_csv(run_dir / "risk.csv", index=False)
    metrics = cv_concordance(fd, n_boot=settings.n_boot, seed=settings.seed)
    km = km_plot(oof["time"], oof["event"], oof["group"] == "high", run_dir / "km.png",
                 f"{baseline}, out-of-fold risk groups ({k} folds, split at each fold's training median)",
                 clinical.time_column, random_weights=cohort.random_weights)
    km["png"] = "km.png"
    events_per_fold = [f["events"] for f in metrics["folds"]]
    report = {
        "baseline": baseline,
        "run": run_name(run_dir),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": None,
        "settings": settings.to_dict(),
        "data": {"out": str(cohort.out), "clinical": clinical.source, "time": clinical.time_column,
                 "event": clinical.event_column, "embedding_model": cohort.model,
                 "weights_sha256": cohort.weights_sha256, "n_patients": len(pids),
                 "n_slides": len(cohort.stores), "n_events": int(np.sum(e)), "events_per_fold": events_per_fold,
                 "data_hash": data_hash(clinical, cohort, features, inputs),
                 "dropped_slides": list(cohort.dropped), "dropped_patients": list(dropped_patients)},
        "features": features,
        **metrics,
        "small_cohort": small_cohort(len(pids), events_per_fold),
        "permutation": None if null is None else permutation_p(metrics["headline"]["harrell"]["mean"] or float("nan"),
                                                               null),
        "km": {**km, "split": "each fold's test patients split at the median risk of its training patients"},
        "versions": package_versions(),
        **extra,
    }
    report["seconds"] = round(_time.perf_counter() - t0, 2)
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def run_coxnet(cohort: PatientCohort, clinical: Clinical, folds: np.ndarray, settings: SurvivalSettings, run_dir: Path,
               log=print, dropped_patients=()) -> dict:
    """Cross-validate the elastic-net Cox baseline on the pooled patient table."""
    from slide_clip.survival.coxnet import feature_columns
    from slide_clip.survival.pooled import pooled_tables

    t0 = _time.perf_counter()
    _, patients = pooled_tables(cohort, with_max=settings.with_max, score_sets=list(settings.score_sets))
    table = patients.set_index("patient_id").loc[list(cohort.patients)]
    table = table.join(clinical.table[list(settings.covariates)]) if settings.covariates else table
    cols = feature_columns(table, score_sets=settings.score_sets, with_max=settings.with_max,
                           covariates=list(settings.covariates))
    features = {"kind": "pooled patient table", "columns": cols, "n": len(cols),
                "score_sets": list(settings.score_sets), "with_max": settings.with_max,
                "covariates": list(settings.covariates)}
    inputs = table[cols]
    inputs.reset_index().to_parquet(run_dir / "features.parquet", index=False)
    pids = list(table.index)
    t, e = _outcomes(clinical, pids)
    log(f"coxnet: {len(cols)} features: the mean embedding ({cohort.embed_dim})"
        + (f", the max embedding ({cohort.embed_dim})" if settings.with_max else "")
        + "".join(f", score set {s!r}" for s in settings.score_sets)
        + "".join(f", covariate {c!r}" for c in settings.covariates))
    k, seed = settings.folds, settings.seed

    def run(tt, ee, ff, log=None):
        try:
            return cv_coxnet(table, cols, tt, ee, ff, k, seed, log)
        except ArithmeticError as exc:
            raise ConfigError(f"the elastic-net Cox model cannot be fitted to these outcomes ({exc})",
                              path=clinical.source, hint="Check the time and event columns; with very few events, "
                                                         "use fewer --folds.") from None

    cv = run(t, e, folds, log)
    (run_dir / "models").mkdir()
    for f, m in cv.models.items():
        m.save(run_dir / "models" / f"fold{f}.json")
    null = _permutation_null(lambda tt, ee, ff: cv_coxnet(table, cols, tt, ee, ff, k, seed), pids, t, e, settings,
                             log) if settings.permutations else None
    extra = {"coxnet": {"penalty": cv.info, "models": [f"models/fold{f}.json" for f in range(k)]}}
    return _finish(run_dir, "coxnet", pids, folds, cv, t, e, settings, clinical, cohort, features, inputs, extra, t0,
                   null, list(dropped_patients))


def run_abmil(cohort: PatientCohort, clinical: Clinical, folds: np.ndarray, settings: SurvivalSettings, run_dir: Path,
              log=print, dropped_patients=()) -> dict:
    """Cross-validate gated-attention MIL over patient bags; heatmaps and a top-tile gallery."""
    from slide_clip.survival.abmil import ABMILSettings, pick_device

    t0 = _time.perf_counter()
    s = ABMILSettings(**settings.abmil)
    pids = list(cohort.patients)
    t, e = _outcomes(clinical, pids)
    ds = BagDataset(cohort, "patient", as_torch=False, cache_mb=s.cache_mb)
    features = {"kind": "tile embeddings", "embedding_model": cohort.model, "embed_dim": cohort.embed_dim,
                "standardised": "per dimension, over the training patients' tiles"}
    k, seed = settings.folds, settings.seed
    cv = cv_abmil(cohort, ds, t, e, folds, k, seed, s, log)
    (run_dir / "models").mkdir()
    for f, m in cv.models.items():
        m.save(run_dir / "models" / f"fold{f}.safetensors")
    null = _permutation_null(lambda tt, ee, ff: cv_abmil(cohort, ds, tt, ee, ff, k, seed, s), pids, t, e, settings,
                             log) if settings.permutations else None
    extra = {"abmil": {**s.to_dict(), "device": pick_device(s.device),
                       "models": [f"models/fold{f}.safetensors" for f in range(k)],
                       "pictures": _abmil_pictures(cohort, ds, cv.models, folds, cv.risk, t, e, settings, run_dir)}}
    return _finish(run_dir, "abmil", pids, folds, cv, t, e, settings, clinical, cohort, features, None, extra, t0,
                   null, list(dropped_patients))


def _abmil_pictures(cohort, ds, models, folds, risk, t, e, settings, run_dir) -> dict:
    """Heatmaps of every slide and the gallery, each from the fold model that did not see the patient
    (file paths relative to the run folder)."""
    from slide_clip.pictures import RANDOM_WEIGHTS_NOTE, random_weights_title
    from slide_clip.survival.pictures import gallery, read_tiles, slide_heatmaps

    random = cohort.random_weights
    out = {"heatmaps": [], "gallery": None}
    order = np.argsort(-risk)
    k = settings.gallery_patients
    chosen = set(order[:k].tolist()) | set(order[-k:].tolist()) if k else set()
    rows = {}
    for i, pid in enumerate(ds.ids):
        draw = settings.heatmaps == "all" or (settings.heatmaps == "gallery" and i in chosen)
        if not draw and i not in chosen:
            continue
        bag = ds[i]
        r, a, tile_risk = models[int(folds[i])].predict_bag(bag["features"])
        for j, sid in enumerate(bag["slide_ids"]):
            sel = bag["slide_index"] == j
            if draw:
                out["heatmaps"] += [str(p.relative_to(run_dir)) for p in slide_heatmaps(
                    cohort.open(sid), a[sel], tile_risk[sel], run_dir / "heatmaps", pid, r,
                    note=f"fold {int(folds[i])}" + (f"\n{RANDOM_WEIGHTS_NOTE}" if random else ""))]
        if i in chosen:
            top = np.argsort(-a)[: settings.gallery_tiles]
            rows[i] = [(bag["slide_ids"][int(bag["slide_index"][j])], int(j - np.flatnonzero(
                bag["slide_index"] == bag["slide_index"][j])[0])) for j in top]
    if chosen:
        try:
            lines = []
            for i in [*order[:k].tolist(), *order[-k:].tolist()]:
                tiles = []
                for sid, row in rows[i]:
                    tiles += read_tiles(cohort.open(sid), [row])
                tag = "highest" if i in order[:k] else "lowest"
                lines.append({"label": f"{tag} risk: {ds.ids[i]} (risk {risk[i]:.2f}, time {t[i]:g}, "
                                       f"{'event' if e[i] else 'censored'})", "tiles": tiles})
            t0 = cohort.open(next(iter(cohort.stores))).tiling
            gallery(lines, run_dir / "top_tiles.png", random_weights_title(
                "ABMIL: most-attended tiles of the highest- and lowest-risk patients (out-of-fold; tiles of "
                f"{int(t0['tile_size'])} px at {float(t0['target_mpp']):g} µm/px)", random))
            out["gallery"] = "top_tiles.png"
        except SlideError as exc:  # the slide files moved: the gallery needs them, nothing else does
            out["gallery_error"] = str(exc)
    return out


def _check_settings(s: SurvivalSettings) -> None:
    unknown = [b for b in s.baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline {unknown[0]!r} (choose from {', '.join(BASELINES)})")
    if s.heatmaps not in HEATMAPS:
        raise ConfigError(f"heatmaps must be all, gallery or none (not {s.heatmaps!r})")
    if s.permutations < 0 or s.n_boot < 0:
        raise ConfigError("--permutations and --bootstrap must be 0 or more")


def _check_tiles(cohort: PatientCohort) -> None:
    """A patient whose slides have no tile (no tissue found) has nothing to model."""
    for pid, sids in cohort.patients.items():
        if sum(cohort.open(s).n_tiles for s in sids) == 0:
            raise ConfigError(f"patient {pid!r} has no tiles: no tissue was found on its slides "
                              f"({', '.join(sids)})", path=cohort.stores[sids[0]],
                              hint="Check the slides' QC pictures (<slide>_qc.png), or leave the patient out.")


def run_survival(out: str | Path, clinical: str | Path, time: str, event: str, *, model: str | None = None,
                 manifest: str | Path | None = None, settings: SurvivalSettings | None = None,
                 log=print) -> dict[str, dict]:
    """Run the chosen baselines on a cohort folder; returns ``{baseline: report}``.

    Every report is also written to ``out/survival/<baseline>/<run name>/report.json``, each run
    folder swapped in only when complete; the returned reports add ``path`` (that file) and
    ``dir`` (the folder).
    """
    s = settings or SurvivalSettings()
    _check_settings(s)
    out = upath(out)  # a Path, or a UPath for a URL (never Path(url), which folds s3:// into s3:/)
    cl = read_clinical(clinical, time, event)
    _check_covariates(cl, s.covariates)
    cohort = open_cohort(out, model, manifest=manifest, allow_missing=s.allow_missing)
    _probe(out / "survival")
    patients, dropped_patients = join_cohort(cl, {sid: cohort.patient_of(sid) for sid in cohort.stores},
                                             allow_missing=s.allow_missing)
    cohort = cohort.restrict(patients)
    pids = list(cohort.patients)
    check_outcomes(cl, pids)
    _check_tiles(cohort)
    folds = _fold_array(pids, cl.table.loc[pids, "event"].to_numpy(), s.folds, s.seed)
    name = s.name or f"{model_key(cohort.model)}-{s.folds}fold-seed{s.seed}"
    log(f"{plural(len(pids), 'patient')}, {plural(len(cohort.stores), 'slide')}, "
        f"{plural(int(cl.table.loc[pids, 'event'].sum()), 'event')}; "
        + embeddings_line(cohort.model, cohort.open(next(iter(cohort.stores))).embedding_attrs(cohort.model)))
    for d in cohort.dropped:
        log(f"left out (--allow-missing): slide {d['slide']}: {d['reason']}")
    for pid in dropped_patients:
        log(f"left out (--allow-missing): patient {pid}: no slide")
    reports = {}
    for b in s.baselines:
        final = out / "survival" / b / name
        with _writing(final), run_folder(final) as rf:
            run = run_coxnet if b == "coxnet" else run_abmil
            rep = run(cohort, cl, folds, s, rf.path, log, dropped_patients)
            rf.commit()
        reports[b] = {**rep, "path": str(final / "report.json"), "dir": str(final)}
        for line in console_lines(rep, final):
            log(line)
    return reports
