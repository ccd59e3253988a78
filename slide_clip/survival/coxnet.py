"""The penalised Cox baseline: elastic-net Cox (scikit-survival ``CoxnetSurvivalAnalysis``) on
the pooled patient table, its penalty chosen by an inner cross-validation of the training
patients only."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from slide_clip.survival.folds import patient_folds
from slide_clip.survival.metrics import harrell_c


def feature_columns(table: pd.DataFrame, *, with_scores: bool = True, with_max: bool = False,
                    covariates: list[str] | None = None) -> list[str]:
    """The pooled table's model inputs: mean embedding, optionally max embedding, zero-shot
    score columns and numeric clinical covariates."""
    cols = [c for c in table.columns if c.startswith("emb_mean_")]
    if with_max:
        cols += [c for c in table.columns if c.startswith("emb_max_")]
    if with_scores:
        cols += [c for c in table.columns if c.count(":") == 2]
    cols += list(covariates or [])
    return cols


@dataclass
class CoxNetModel:
    """A fitted elastic-net Cox model with the standardisation of its training patients."""

    columns: list[str]
    mean: np.ndarray
    scale: np.ndarray
    estimator: object
    alpha: float
    l1_ratio: float
    inner_scores: dict = field(default_factory=dict)

    def risk(self, table: pd.DataFrame) -> np.ndarray:
        """Linear predictor (log relative hazard) per row of a pooled patient table."""
        X = (table[self.columns].to_numpy(np.float64) - self.mean) / self.scale
        return np.asarray(self.estimator.predict(X, alpha=self.alpha), np.float64)


def _fit_path(X, y, l1_ratio, n_alphas=100, alpha_min_ratio="auto", alphas=None):
    from sksurv.linear_model import CoxnetSurvivalAnalysis

    est = CoxnetSurvivalAnalysis(l1_ratio=l1_ratio, n_alphas=n_alphas, alpha_min_ratio=alpha_min_ratio,
                                 alphas=alphas, max_iter=100000, fit_baseline_model=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings at the smallest penalties
        est.fit(X, y)
    return est


def fit_coxnet(table: pd.DataFrame, time, event, columns: list[str], *, l1_ratio: float = 0.5,
               n_alphas: int = 30, alpha_min_ratio: float = 0.02, inner_folds: int = 3,
               seed: int = 0) -> CoxNetModel:
    """Fit on training patients; the penalty maximises Harrell's c-index over ``inner_folds``
    folds of these patients (nothing outside them is seen).

    Parameters
    ----------
    table : DataFrame
        Pooled patient rows of the training patients (``patient_id`` column).
    time, event : arrays
        Their follow-up times and event indicators.
    columns : list of str
        Input columns (see :func:`feature_columns`).
    """
    from sksurv.util import Surv

    t, e = np.asarray(time, float), np.asarray(event, bool)
    X = table[columns].to_numpy(np.float64)
    if not np.isfinite(X).all():
        bad = columns[int(np.flatnonzero(~np.isfinite(X).all(axis=0))[0])]
        raise ValueError(f"pooled column {bad!r} has missing values")
    mean, scale = X.mean(axis=0), X.std(axis=0)
    scale[scale < 1e-12] = 1.0
    Z = (X - mean) / scale
    y = Surv.from_arrays(event=e, time=t)
    path = _fit_path(Z, y, l1_ratio, n_alphas, alpha_min_ratio)
    alphas = np.asarray(path.alphas_)
    k = max(2, min(inner_folds, int(e.sum()), len(t) // 2))
    inner = patient_folds([str(i) for i in range(len(t))], e.astype(int), k=k, seed=seed + 1)
    fold = np.array([inner[str(i)] for i in range(len(t))])
    scores = np.full((k, len(alphas)), np.nan)
    for f in range(k):
        tr, va = fold != f, fold == f
        try:
            est = _fit_path(Z[tr], y[tr], l1_ratio, alphas=alphas)
        except ArithmeticError:  # sksurv: "numerical error" at a too small penalty for this fold
            continue
        for j, a in enumerate(est.alphas_):
            scores[f, j] = harrell_c(t[va], e[va], est.predict(Z[va], alpha=a))
    if not np.isfinite(scores).any():
        raise ArithmeticError("the elastic-net Cox model could not be fitted on any inner fold")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: penalties no fold could fit
        mean_score = np.nanmean(scores, axis=0)
    mean_score = np.nan_to_num(mean_score, nan=-1.0)
    best = int(np.argmax(mean_score))  # ties: the largest penalty (alphas are decreasing)
    return CoxNetModel(columns, mean, scale, path, float(alphas[best]), l1_ratio,
                       {"alphas": alphas.tolist(), "inner_c": [None if s < 0 else float(s) for s in mean_score],
                        "inner_folds": k})
