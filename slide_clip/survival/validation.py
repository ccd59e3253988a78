"""Cross-validated performance, reported as the field reports it (see docs/SURVIVAL.md).

Each of the k folds has its own model, fitted on the other folds' patients, and the scales
of their risks differ (a penalised model's spread shrinks with its penalty; on a 32-patient
cohort the SD of the training risks ran from 0.075 to 1.53 across folds). So:

- **Headline**: per fold, Harrell's and Uno's c-index of its test patients; the headline is
  their **mean and SD over folds** (SD with k - 1 degrees of freedom), with every fold's value.
- **Pooled c-index** (secondary): each fold's test risks are first put on that fold's
  *training* risk scale, ``z = (risk - mean(train risk)) / sd(train risk)``, and the c-index
  is computed over all patients' ``z``. Within a fold the order is unchanged (a positive
  affine map); across folds a patient is compared by where it falls in its own model's
  training distribution. Ranking within the training distribution would do the same but
  ties every test risk beyond the training range; z keeps them apart. A fold whose
  training risks are all equal (a model that kept no feature) gives z = 0 to its patients:
  ties, as its model says nothing.
- **Intervals**: one bootstrap for all of them, resampling patients *within* each fold
  (stratified by fold; each fold keeps its size and its own model). Each resample gives
  every fold's c-index, their mean (the headline's interval) and the pooled c-index of the
  standardised risks (the pooled interval); percentile intervals, 95 %. A resample in which
  a fold has no comparable pair is dropped and counted out of ``n_valid``.
- **Small cohorts**: :func:`small_cohort` says when the events are too few to trust the
  intervals and p-values (the rule is in docs/SURVIVAL.md).
- **Permutation test** (:func:`permutation_p`): the whole cross-validation is rerun on
  outcomes permuted among patients, and the headline is compared with that null.
"""

from __future__ import annotations

import math

import numpy as np

from slide_clip.survival.metrics import harrell_c, uno_c
from slide_clip.text import plural

#: Below these, the report and the console say the cohort is too small (docs/SURVIVAL.md).
MIN_EVENTS = 100
MIN_EVENTS_PER_FOLD = 10

HEADLINE_RULE = ("mean and SD (k - 1 degrees of freedom) over the test folds of each fold's c-index; 95 % "
                 "percentile bootstrap of that mean, patients resampled within each fold")
POOLED_RULE = ("c-index over all out-of-fold patients after standardising each fold's test risks by the mean and "
               "SD of that fold's training risks; same bootstrap")


def standardise(test_risk, train_risk) -> np.ndarray:
    """``(test - mean(train)) / sd(train)``; zeros when the training risks do not vary."""
    test, train = np.asarray(test_risk, np.float64), np.asarray(train_risk, np.float64)
    sd = float(train.std())
    if not (sd > 1e-12 * max(1.0, float(np.abs(train).max(initial=0.0)))):
        return np.zeros_like(test)
    return (test - train.mean()) / sd


def _clean(v):
    return None if v is None or not math.isfinite(v) else float(v)


def _mean_sd(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    if not len(v) or not np.isfinite(v).all():
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def _ci(samples: list[float], n_boot: int, level: float = 0.95) -> dict:
    vals = [v for v in samples if math.isfinite(v)]
    if len(vals) < max(10, n_boot // 10):
        return {"low": None, "high": None, "n_boot": n_boot, "n_valid": len(vals)}
    a = (1 - level) / 2
    lo, hi = np.quantile(vals, [a, 1 - a])
    return {"low": float(lo), "high": float(hi), "n_boot": n_boot, "n_valid": len(vals)}


class FoldData:
    """One fold's test outcomes and risks and its training outcomes and risks."""

    def __init__(self, fold: int, time, event, risk, train_time, train_event, train_risk):
        self.fold = fold
        self.time, self.event, self.risk = (np.asarray(x, np.float64) for x in (time, event, risk))
        self.train_time, self.train_event, self.train_risk = (np.asarray(x, np.float64)
                                                               for x in (train_time, train_event, train_risk))
        self.z = standardise(self.risk, self.train_risk)

    def cs(self, idx=None) -> tuple[float, float]:
        """(Harrell's, Uno's) c-index of these test patients (or a resample of them); Uno's
        censoring distribution comes from the fold's training patients."""
        i = slice(None) if idx is None else idx
        t, e, r = self.time[i], self.event[i], self.risk[i]
        return harrell_c(t, e, r), uno_c(self.train_time, self.train_event, t, e, r)


def _pooled(folds: list[FoldData], idx: list | None = None) -> tuple[float, float]:
    pick = [slice(None)] * len(folds) if idx is None else idx
    t = np.concatenate([f.time[i] for f, i in zip(folds, pick)])
    e = np.concatenate([f.event[i] for f, i in zip(folds, pick)])
    z = np.concatenate([f.z[i] for f, i in zip(folds, pick)])
    # Uno's censoring over the whole cohort (every patient is a test patient once)
    tt = np.concatenate([f.time for f in folds])
    te = np.concatenate([f.event for f in folds])
    return harrell_c(t, e, z), uno_c(tt, te, t, e, z)


def cv_concordance(folds: list[FoldData], *, n_boot: int = 500, seed: int = 0) -> dict:
    """The headline, the pooled c-index and per-fold values, with one stratified bootstrap.

    Returns ``{"headline": {"harrell": {...}, "uno": {...}, "rule"}, "pooled": {...}, "folds": [...]}``;
    see docs/FORMAT.md ("Survival outputs") for the fields.
    """
    point = [f.cs() for f in folds]
    pooled = _pooled(folds)
    rng = np.random.default_rng(seed)
    boot_fold = [[[], []] for _ in folds]
    boot_mean: list[list[float]] = [[], []]
    boot_pooled: list[list[float]] = [[], []]
    for _ in range(n_boot):
        idx = [rng.integers(0, len(f.time), len(f.time)) for f in folds]
        cs = [f.cs(i) for f, i in zip(folds, idx)]
        for k, c in enumerate(cs):
            for m in (0, 1):
                boot_fold[k][m].append(c[m])
        for m in (0, 1):
            vals = [c[m] for c in cs]
            boot_mean[m].append(float(np.mean(vals)) if all(math.isfinite(v) for v in vals) else float("nan"))
        p = _pooled(folds, idx)
        for m in (0, 1):
            boot_pooled[m].append(p[m])
    headline = {"rule": HEADLINE_RULE}
    for m, name in enumerate(("harrell", "uno")):
        mean, sd = _mean_sd([c[m] for c in point])
        headline[name] = {"mean": _clean(mean), "sd": _clean(sd), "folds": [_clean(c[m]) for c in point],
                          "ci": _ci(boot_mean[m], n_boot)}
    per_fold = []
    for k, f in enumerate(folds):
        per_fold.append({
            "fold": f.fold, "n": int(len(f.time)), "events": int(f.event.sum()),
            "harrell": _clean(point[k][0]), "harrell_ci": _ci(boot_fold[k][0], n_boot),
            "uno": _clean(point[k][1]), "uno_ci": _ci(boot_fold[k][1], n_boot),
            "train_n": int(len(f.train_time)), "train_events": int(f.train_event.sum()),
            "train_mean_risk": float(f.train_risk.mean()), "train_sd_risk": float(f.train_risk.std()),
            "train_median_risk": float(np.median(f.train_risk)),
        })
    n = sum(len(f.time) for f in folds)
    events = int(sum(f.event.sum() for f in folds))
    return {
        "headline": headline,
        "pooled": {"rule": POOLED_RULE, "n": n, "events": events, "harrell": _clean(pooled[0]),
                   "harrell_ci": _ci(boot_pooled[0], n_boot), "uno": _clean(pooled[1]),
                   "uno_ci": _ci(boot_pooled[1], n_boot)},
        "folds": per_fold,
    }


def small_cohort(n_patients: int, events_per_fold: list[int]) -> dict:
    """The events of the cohort and of each test fold, and a warning when they are too few
    (fewer than :data:`MIN_EVENTS` in all, or fewer than :data:`MIN_EVENTS_PER_FOLD` in a
    test fold); ``warning`` is None otherwise."""
    events = int(sum(events_per_fold))
    few = [f"{plural(events, 'event')} in {plural(n_patients, 'patient')} (fewer than {MIN_EVENTS})"
           if events < MIN_EVENTS else None,
           f"{plural(min(events_per_fold), 'event')} in the smallest test fold (fewer than {MIN_EVENTS_PER_FOLD})"
           if min(events_per_fold) < MIN_EVENTS_PER_FOLD else None]
    few = [x for x in few if x]
    warning = None
    if few:
        warning = ("small cohort: " + "; ".join(few) + ". The c-index intervals and the log-rank p-value are not to "
                   "be trusted (outcomes permuted at random can look significant): read them as a feasibility check")
    return {"patients": int(n_patients), "events": events, "events_per_fold": [int(x) for x in events_per_fold],
            "min_events": MIN_EVENTS, "min_events_per_fold": MIN_EVENTS_PER_FOLD, "warning": warning}


def permutation_p(observed: float, null: list[float]) -> dict:
    """One-sided permutation p-value of the headline (mean Harrell's C over folds) against
    the same cross-validation on permuted outcomes: ``(1 + #{null >= observed}) / (1 + n)``."""
    null_ok = [v for v in null if math.isfinite(v)]
    n = len(null_ok)
    if not n or not math.isfinite(observed):
        return {"n": len(null), "n_valid": n, "p": None, "null_mean": None, "null_sd": None,
                "null": [_clean(v) for v in null]}
    ge = sum(v >= observed - 1e-12 for v in null_ok)
    return {"n": len(null), "n_valid": n, "p": (1 + ge) / (1 + n), "observed": float(observed),
            "null_mean": float(np.mean(null_ok)), "null_sd": float(np.std(null_ok, ddof=1)) if n > 1 else None,
            "null": [_clean(v) for v in null],
            "statistic": "mean Harrell's C over the test folds",
            "method": "outcomes (time, event) permuted among patients; folds redrawn and every fold model refitted "
                      "for each permutation"}
