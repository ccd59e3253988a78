"""The penalised Cox baseline: elastic-net Cox (scikit-survival ``CoxnetSurvivalAnalysis``) on
the pooled patient table, its penalty chosen by an inner cross-validation of the training
patients only.

Standardisation is part of the model: a scikit-learn ``Pipeline`` of ``StandardScaler`` and
the Cox model is fitted in each inner fold (so an inner fold's validation patients never
shape the scaling it is scored with) and again on all training patients for the final fit.

A fitted model is saved as JSON (:meth:`CoxNetModel.save`): its input columns, the
training mean and scale of each, the coefficients and offset at the chosen penalty, and
the penalty search. That is all the risk needs; nothing is unpickled to load it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from slide_clip.survival.folds import patient_folds
from slide_clip.survival.metrics import harrell_c

MODEL_FORMAT = "slide-clip-coxnet/1"


def feature_columns(table: pd.DataFrame, *, score_sets: list[str] | tuple[str, ...] = (), with_max: bool = False,
                    covariates: list[str] | None = None) -> list[str]:
    """The model's inputs, exactly as named: the mean embedding, the max embedding if
    ``with_max``, the columns of each named score set (``<set>__<metric>__<class>``; a set
    missing from the table is an error) and the clinical covariates."""
    from slide_clip.aggregate import COLUMN_SEPARATOR, column_key
    from slide_clip.store import model_key

    cols = [c for c in table.columns if c.startswith("emb_mean_")]
    if with_max:
        cols += [c for c in table.columns if c.startswith("emb_max_")]
    for s in score_sets:
        key = column_key(model_key(s))
        mine = [c for c in table.columns if c.count(COLUMN_SEPARATOR) == 2 and c.split(COLUMN_SEPARATOR)[0] == key]
        if not mine:
            raise KeyError(f"the pooled table has no columns of score set {s!r}")
        cols += mine
    cols += list(covariates or [])
    return cols


@dataclass
class CoxNetModel:
    """A fitted elastic-net Cox model with the standardisation of its training patients.

    ``risk = ((x - mean) / scale) · coef - offset`` (the linear predictor, log relative hazard).
    """

    columns: list[str]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    offset: float
    alpha: float
    l1_ratio: float
    inner_scores: dict = field(default_factory=dict)

    def risk(self, table: pd.DataFrame) -> np.ndarray:
        """Linear predictor (log relative hazard) per row of a pooled patient table.

        Summed row by row in C order (not by BLAS, whose summation order depends on the
        memory layout pandas hands over): a model loaded from its file gives the same bits.
        """
        X = np.ascontiguousarray(table[self.columns].to_numpy(np.float64))
        return ((X - self.mean) / self.scale * self.coef).sum(axis=1) - self.offset

    @property
    def nonzero(self) -> int:
        return int(np.count_nonzero(self.coef))

    def to_dict(self) -> dict:
        return {"format": MODEL_FORMAT, "columns": list(self.columns), "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "coef": self.coef.tolist(), "offset": float(self.offset),
                "alpha": float(self.alpha), "l1_ratio": float(self.l1_ratio), "inner": self.inner_scores}

    def save(self, path: str | Path) -> Path:
        """Write the model as JSON (floats written exactly: a loaded model gives the same risks)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CoxNetModel":
        d = json.loads(Path(path).read_text())
        if d.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path}: not a slide-clip Coxnet model (format {d.get('format')!r})")
        return cls(list(d["columns"]), np.asarray(d["mean"], np.float64), np.asarray(d["scale"], np.float64),
                   np.asarray(d["coef"], np.float64), float(d["offset"]), float(d["alpha"]), float(d["l1_ratio"]),
                   d.get("inner") or {})


def _pipeline(l1_ratio, n_alphas=100, alpha_min_ratio="auto", alphas=None):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sksurv.linear_model import CoxnetSurvivalAnalysis

    return make_pipeline(StandardScaler(), CoxnetSurvivalAnalysis(
        l1_ratio=l1_ratio, n_alphas=n_alphas, alpha_min_ratio=alpha_min_ratio, alphas=alphas, max_iter=100000,
        fit_baseline_model=False))


def _fit(pipe, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings at the smallest penalties
        pipe.fit(X, y)
    return pipe


def fit_coxnet(table: pd.DataFrame, time, event, columns: list[str], *, l1_ratio: float = 0.5,
               n_alphas: int = 30, alpha_min_ratio: float = 0.02, inner_folds: int = 3,
               seed: int = 0) -> CoxNetModel:
    """Fit on training patients; the penalty maximises Harrell's c-index over ``inner_folds``
    folds of these patients (nothing outside them is seen).

    The penalty grid is the path of the standardised training patients (as ``cv.glmnet``
    does); each inner fold then fits standardisation and model on its own training part
    and scores its validation part at every penalty of the grid.

    Parameters
    ----------
    table : DataFrame
        Pooled patient rows of the training patients (``patient_id`` column).
    time, event : arrays
        Their follow-up times and event indicators.
    columns : list of str
        Input columns (see :func:`feature_columns`).

    Raises
    ------
    ArithmeticError
        The model could not be fitted (scikit-survival's numerical error) on any inner fold,
        or on all the training patients.
    """
    from sksurv.util import Surv

    t, e = np.asarray(time, float), np.asarray(event, bool)
    X = table[columns].to_numpy(np.float64)
    if not np.isfinite(X).all():
        bad = columns[int(np.flatnonzero(~np.isfinite(X).all(axis=0))[0])]
        raise ValueError(f"pooled column {bad!r} has missing values")
    y = Surv.from_arrays(event=e, time=t)
    full = _fit(_pipeline(l1_ratio, n_alphas, alpha_min_ratio), X, y)
    cox = full[-1]
    alphas = np.asarray(cox.alphas_)
    k = max(2, min(inner_folds, int(e.sum()), len(t) // 2))
    inner = patient_folds([str(i) for i in range(len(t))], e.astype(int), k=k, seed=seed + 1)
    fold = np.array([inner[str(i)] for i in range(len(t))])
    scores = np.full((k, len(alphas)), np.nan)
    for f in range(k):
        tr, va = fold != f, fold == f
        try:
            pipe = _fit(_pipeline(l1_ratio, alphas=alphas), X[tr], y[tr])
        except ArithmeticError:  # sksurv: "numerical error" at a too small penalty for this fold
            continue
        Zva = pipe[:-1].transform(X[va])
        for j, a in enumerate(pipe[-1].alphas_):
            scores[f, j] = harrell_c(t[va], e[va], pipe[-1].predict(Zva, alpha=a))
    if not np.isfinite(scores).any():
        raise ArithmeticError("the elastic-net Cox model could not be fitted on any inner fold")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: penalties no fold could fit
        mean_score = np.nanmean(scores, axis=0)
    mean_score = np.nan_to_num(mean_score, nan=-1.0)
    best = int(np.argmax(mean_score))  # ties: the largest penalty (alphas are decreasing)
    scaler = full[0]
    return CoxNetModel(list(columns), np.asarray(scaler.mean_, np.float64), np.asarray(scaler.scale_, np.float64),
                       np.asarray(cox.coef_[:, best], np.float64).copy(), float(cox.offset_[best]),
                       float(alphas[best]), l1_ratio,
                       {"alphas": alphas.tolist(), "inner_c": [None if s < 0 else float(s) for s in mean_score],
                        "inner_folds": k})
