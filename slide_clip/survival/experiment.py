"""A survival experiment: clinical table + stores -> cross-validated baselines, risk, metrics,
Kaplan-Meier curves, heatmaps and fitted models on disk.

Outputs (see docs/FORMAT.md, "Survival outputs")::

    out/tables/<embedding model>/slides.parquet, patients.parquet
    out/survival/<baseline>/<run name>/report.json      settings, per-fold and overall metrics, data hash, versions
                                      risk.csv          patient_id, fold, risk, time, event, group
                                      km.png            out-of-fold high/low risk groups, log-rank p
                                      models/fold<k>.pkl (coxnet) or fold<k>.pt (abmil)
                                      heatmaps/<slide>_attention.png, <slide>_tile_risk.png   (abmil)
                                      top_tiles.png                                            (abmil)
"""

from __future__ import annotations

import hashlib
import json
import time as _time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from slide_clip.encoders.outputs import embeddings_line
from slide_clip.errors import ConfigError
from slide_clip.store import model_key
from slide_clip.survival.bags import BagDataset, Cohort, open_cohort
from slide_clip.survival.clinical import Clinical, join_cohort, read_clinical
from slide_clip.survival.folds import patient_folds
from slide_clip.survival.metrics import concordance, km_plot
from slide_clip.survival.pooled import write_pooled_tables

BASELINES = ("coxnet", "abmil")


@dataclass
class SurvivalSettings:
    """What a run does. ``name`` defaults to ``<embedding model>-<folds>fold-seed<seed>``."""

    baselines: tuple[str, ...] = BASELINES
    folds: int = 5
    seed: int = 0
    name: str | None = None
    n_boot: int = 500
    with_max: bool = False
    with_scores: bool = True
    covariates: tuple[str, ...] = ()
    heatmaps: str = "all"  # ABMIL heatmaps of "all" slides, of the "gallery" patients' slides, or "none"
    gallery_patients: int = 3
    gallery_tiles: int = 6
    abmil: dict = field(default_factory=dict)  # overrides of ABMILSettings

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("slide-clip", "scikit-survival", "scikit-learn", "torch", "numpy", "pandas", "zarr", "h5py",
                "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def data_hash(clinical: Clinical, cohort: Cohort) -> str:
    """sha256 over the outcome rows and every slide's identity (fingerprint, weights, tiles, patient)."""
    h = hashlib.sha256()
    t = clinical.table.loc[list(cohort.patients)]
    for pid, row in t[["time", "event"]].iterrows():
        h.update(f"{pid}\t{row['time']!r}\t{int(row['event'])}\n".encode())
    for sid in cohort.stores:
        st = cohort.open(sid)
        h.update(f"{sid}\t{cohort.patient_of(sid)}\t{st.slide.get('fingerprint')}\t{st.n_tiles}\t"
                 f"{cohort.weights_sha256}\n".encode())
    return h.hexdigest()


def _check_covariates(clinical: Clinical, covariates) -> None:
    for c in covariates:
        if c not in clinical.table.columns:
            raise ConfigError(f"has no covariate column {c!r}", path=clinical.source)
        if not pd.api.types.is_numeric_dtype(clinical.table[c]) or clinical.table[c].isna().any():
            raise ConfigError(f"covariate {c!r} must be numeric without missing values", path=clinical.source,
                              hint="Encode categories as 0/1 columns and fill in missing values.")


def _metrics(oof: pd.DataFrame, train_risk: dict[int, np.ndarray], train_idx: dict[int, np.ndarray],
             n_boot: int, seed: int) -> tuple[list[dict], dict]:
    t_all, e_all = oof["time"].to_numpy(float), oof["event"].to_numpy(int)
    per_fold = []
    for f in sorted(oof["fold"].unique()):
        te = (oof["fold"] == f).to_numpy()
        tr = train_idx[f]
        m = concordance(t_all[te], e_all[te], oof["risk"].to_numpy()[te], t_all[tr], e_all[tr], n_boot=n_boot,
                        seed=seed + int(f))
        per_fold.append({"fold": int(f), "train_median_risk": float(np.median(train_risk[f])), **m})
    overall = concordance(t_all, e_all, oof["risk"].to_numpy(), n_boot=n_boot, seed=seed)
    return per_fold, overall


def _finish(run_dir: Path, baseline: str, oof: pd.DataFrame, train_risk, train_idx, settings: SurvivalSettings,
            clinical: Clinical, cohort: Cohort, extra: dict, t0: float) -> dict:
    medians = {f: float(np.median(r)) for f, r in train_risk.items()}
    oof["group"] = np.where(oof["risk"].to_numpy() > oof["fold"].map(medians).to_numpy(), "high", "low")
    oof.to_csv(run_dir / "risk.csv", index=False)
    per_fold, overall = _metrics(oof, train_risk, train_idx, settings.n_boot, settings.seed)
    km = km_plot(oof["time"], oof["event"], oof["group"] == "high", run_dir / "km.png",
                 f"{baseline}, out-of-fold risk groups ({settings.folds} folds)", clinical.time_column)
    report = {
        "baseline": baseline,
        "run": run_dir.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(_time.perf_counter() - t0, 2),
        "settings": {**settings.to_dict(), "baselines": list(settings.baselines)},
        "data": {"out": str(cohort.out), "clinical": clinical.source, "time": clinical.time_column,
                 "event": clinical.event_column, "embedding_model": cohort.model,
                 "weights_sha256": cohort.weights_sha256, "n_patients": len(cohort.patients),
                 "n_slides": len(cohort.stores), "n_events": int(oof["event"].sum()),
                 "data_hash": data_hash(clinical, cohort)},
        "overall": overall,
        "folds": per_fold,
        "km": {**km, "split": "each fold's test patients split at the median risk of its training patients"},
        "versions": package_versions(),
        **extra,
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _outcomes(clinical: Clinical, patients: list[str]) -> tuple[np.ndarray, np.ndarray]:
    t = clinical.table.loc[patients]
    return t["time"].to_numpy(float), t["event"].to_numpy(int)


def run_coxnet(cohort: Cohort, clinical: Clinical, fold: dict[str, int], patients_table: pd.DataFrame,
               settings: SurvivalSettings, run_dir: Path, log=print) -> dict:
    """Cross-validate the elastic-net Cox baseline on the pooled patient table."""
    import pickle

    from slide_clip.survival.coxnet import feature_columns, fit_coxnet

    t0 = _time.perf_counter()
    table = patients_table.set_index("patient_id").loc[list(cohort.patients)]
    table = table.join(clinical.table[list(settings.covariates)]) if settings.covariates else table
    cols = feature_columns(table, with_scores=settings.with_scores, with_max=settings.with_max,
                           covariates=list(settings.covariates))
    pids = list(table.index)
    t, e = _outcomes(clinical, pids)
    folds = np.array([fold[p] for p in pids])
    risk = np.full(len(pids), np.nan)
    train_risk, train_idx, chosen = {}, {}, []
    (run_dir / "models").mkdir(parents=True, exist_ok=True)
    for f in range(settings.folds):
        tr, te = folds != f, folds == f
        m = fit_coxnet(table[tr], t[tr], e[tr], cols, seed=settings.seed + f)
        risk[te] = m.risk(table[te])
        train_risk[f], train_idx[f] = m.risk(table[tr]), np.flatnonzero(tr)
        j = int(np.argmin(np.abs(np.asarray(m.estimator.alphas_) - m.alpha)))
        nonzero = int(np.count_nonzero(np.asarray(m.estimator.coef_)[:, j]))
        chosen.append({"fold": f, "alpha": m.alpha, "l1_ratio": m.l1_ratio, "inner": m.inner_scores,
                       "n_features": len(cols), "nonzero": nonzero})
        with open(run_dir / "models" / f"fold{f}.pkl", "wb") as fh:
            pickle.dump(m, fh)
        log(f"coxnet fold {f}: alpha {m.alpha:.4g}")
    oof = pd.DataFrame({"patient_id": pids, "fold": folds, "risk": risk, "time": t, "event": e})
    return _finish(run_dir, "coxnet", oof, train_risk, train_idx, settings, clinical, cohort,
                   {"coxnet": {"features": cols[:5] + (["…"] if len(cols) > 5 else []), "n_features": len(cols),
                               "penalty": chosen}}, t0)


def run_abmil(cohort: Cohort, clinical: Clinical, fold: dict[str, int], settings: SurvivalSettings,
              run_dir: Path, log=print) -> dict:
    """Cross-validate gated-attention MIL over patient bags; heatmaps and a top-tile gallery."""
    import torch

    from slide_clip.survival.abmil import ABMILSettings, fit_abmil, pick_device

    t0 = _time.perf_counter()
    s = ABMILSettings(**settings.abmil)
    pids = list(cohort.patients)
    t, e = _outcomes(clinical, pids)
    folds = np.array([fold[p] for p in pids])
    risk = np.full(len(pids), np.nan)
    train_risk, train_idx = {}, {}
    models = {}
    (run_dir / "models").mkdir(parents=True, exist_ok=True)
    ds = BagDataset(cohort, "patient", as_torch=False, cache_mb=s.cache_mb)
    for f in range(settings.folds):
        tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
        m = fit_abmil(cohort, [pids[i] for i in tr], t[tr], e[tr], s, seed=settings.seed * 1000 + f, log=log,
                      bags=ds)
        models[f] = m
        train_risk[f], train_idx[f] = np.array([m.predict_bag(ds[i]["features"])[0] for i in tr]), tr
        for i in te:
            risk[i] = m.predict_bag(ds[i]["features"])[0]
        torch.save(m.state(), run_dir / "models" / f"fold{f}.pt")
        log(f"abmil fold {f}: trained on {len(tr)} patients")
    oof = pd.DataFrame({"patient_id": pids, "fold": folds, "risk": risk, "time": t, "event": e})
    extra = {"abmil": {**s.to_dict(), "device": pick_device(s.device),
                       "pictures": _abmil_pictures(cohort, ds, models, folds, risk, t, e, settings, run_dir)}}
    return _finish(run_dir, "abmil", oof, train_risk, train_idx, settings, clinical, cohort, extra, t0)


def _abmil_pictures(cohort, ds, models, folds, risk, t, e, settings, run_dir) -> dict:
    """Heatmaps of every slide and the gallery, each from the fold model that did not see the patient."""
    from slide_clip.errors import SlideClipError
    from slide_clip.survival.pictures import gallery, read_tiles, slide_heatmaps

    out = {"heatmaps": [], "gallery": None}
    order = np.argsort(-risk)
    k = settings.gallery_patients
    chosen = set(order[:k].tolist()) | set(order[-k:].tolist()) if k else set()
    rows = {}
    if settings.heatmaps not in ("all", "gallery", "none"):
        raise ConfigError(f"heatmaps must be all, gallery or none (not {settings.heatmaps!r})")
    for i, pid in enumerate(ds.ids):
        draw = settings.heatmaps == "all" or (settings.heatmaps == "gallery" and i in chosen)
        if not draw and i not in chosen:
            continue
        bag = ds[i]
        r, a, tile_risk = models[int(folds[i])].predict_bag(bag["features"])
        for j, sid in enumerate(bag["slide_ids"]):
            sel = bag["slide_index"] == j
            if draw:
                out["heatmaps"] += [str(p) for p in slide_heatmaps(
                    cohort.open(sid), a[sel], tile_risk[sel], run_dir / "heatmaps", pid, r,
                    note=f"fold {int(folds[i])}")]
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
            out["gallery"] = str(gallery(lines, run_dir / "top_tiles.png",
                                         "ABMIL: most-attended tiles of the highest- and lowest-risk patients "
                                         "(out-of-fold)"))
        except SlideClipError as exc:  # the slide files moved: the gallery needs them, nothing else does
            out["gallery_error"] = str(exc)
    return out


def run_survival(out: str | Path, clinical: str | Path, time: str, event: str, *, model: str | None = None,
                 manifest: str | Path | None = None, settings: SurvivalSettings | None = None,
                 log=print) -> dict[str, dict]:
    """Run the chosen baselines on a cohort folder; returns ``{baseline: report}``.

    Every report is also written to ``out/survival/<baseline>/<run name>/report.json``.
    """
    s = settings or SurvivalSettings()
    unknown = [b for b in s.baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline {unknown[0]!r} (choose from {', '.join(BASELINES)})")
    out = Path(out)
    cl = read_clinical(clinical, time, event)
    _check_covariates(cl, s.covariates)
    cohort = open_cohort(out, model, manifest=manifest)
    patients = join_cohort(cl, {sid: cohort.patient_of(sid) for sid in cohort.stores})
    cohort = cohort.restrict(patients)
    pids = list(cohort.patients)
    fold = patient_folds(pids, cl.table.loc[pids, "event"].to_numpy(), s.folds, s.seed)
    name = s.name or f"{model_key(cohort.model)}-{s.folds}fold-seed{s.seed}"
    log(f"{len(pids)} patients, {len(cohort.stores)} slides, {int(cl.table.loc[pids, 'event'].sum())} events; "
        + embeddings_line(cohort.model, cohort.open(next(iter(cohort.stores))).embedding_attrs(cohort.model)))
    reports = {}
    tables = None
    for b in s.baselines:
        run_dir = out / "survival" / b / name
        run_dir.mkdir(parents=True, exist_ok=True)
        if b == "coxnet":
            if tables is None:
                tables = write_pooled_tables(cohort, with_max=s.with_max)
            reports[b] = run_coxnet(cohort, cl, fold, pd.read_parquet(tables[1]), s, run_dir, log)
        else:
            reports[b] = run_abmil(cohort, cl, fold, s, run_dir, log)
        reports[b]["path"] = str(run_dir / "report.json")
        o = reports[b]["overall"]
        log(f"{b}: Harrell's C {_fmt(o['harrell'])}, Uno's C {_fmt(o['uno'])}; log-rank p "
            f"{_fmt(reports[b]['km']['logrank_p'])} -> {run_dir}")
    return reports


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def metrics_markdown(reports: dict[str, dict]) -> str:
    """A markdown table of the runs' overall and per-fold metrics (for a Prefect artifact)."""
    lines = ["# Survival baselines", "", "| baseline | fold | patients | events | Harrell's C (95% CI) | "
             "Uno's C (95% CI) |", "|---|---|---|---|---|---|"]

    def ci(m, k):
        c = m[f"{k}_ci"]
        return f"{_fmt(m[k])} ({_fmt(c['low'])}–{_fmt(c['high'])})"

    for b, r in reports.items():
        lines.append(f"| **{b}** | all | {r['overall']['n']} | {r['overall']['events']} | {ci(r['overall'], 'harrell')}"
                     f" | {ci(r['overall'], 'uno')} |")
        for f in r["folds"]:
            lines.append(f"| {b} | {f['fold']} | {f['n']} | {f['events']} | {ci(f, 'harrell')} | {ci(f, 'uno')} |")
    lines.append("")
    for b, r in reports.items():
        lines.append(f"- {b}: log-rank p (out-of-fold high vs low risk) {_fmt(r['km']['logrank_p'])}; "
                     f"KM `{r['km']['png']}`; report `{r['path']}`")
    return "\n".join(lines)
