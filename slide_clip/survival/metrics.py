"""Survival metrics: Harrell's and Uno's c-index, Kaplan-Meier curves of risk groups and the
log-rank test (scikit-survival does the counting). Cross-validated summaries and their
bootstrap intervals are in :mod:`slide_clip.survival.validation`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _surv(time, event):
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(event, bool), time=np.asarray(time, float))


def harrell_c(time, event, risk) -> float:
    """Harrell's concordance index of ``risk`` (higher = earlier event); NaN without a comparable pair."""
    from sksurv.exceptions import NoComparablePairException
    from sksurv.metrics import concordance_index_censored

    e, t, r = np.asarray(event, bool), np.asarray(time, float), np.asarray(risk, float)
    if not e.any():
        return float("nan")
    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(concordance_index_censored(e, t, r)[0])
    except (NoComparablePairException, ZeroDivisionError):
        return float("nan")


def uno_c(train_time, train_event, time, event, risk, tau: float | None = None) -> float:
    """Uno's IPCW concordance index; the censoring distribution is estimated on the training data.

    ``tau`` (same unit as the times) truncates the comparison; default: the largest test time
    strictly below the largest training time (where the censoring estimate is defined).
    """
    from sksurv.exceptions import NoComparablePairException
    from sksurv.metrics import concordance_index_ipcw

    t, e, r = np.asarray(time, float), np.asarray(event, bool), np.asarray(risk, float)
    tt = np.asarray(train_time, float)
    if not e.any():
        return float("nan")
    limit = tt.max()
    if tau is None:
        below = t[t < limit]
        if not below.size:
            return float("nan")
        tau = float(below.max())
    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(concordance_index_ipcw(_surv(tt, train_event), _surv(t, e), r, tau=tau)[0])
    except (NoComparablePairException, ValueError, ZeroDivisionError):
        return float("nan")


def _clean(v: float):
    return None if v is None or not math.isfinite(v) else float(v)


def format_p(p) -> str:
    """A p-value for people: 3 decimals, scientific notation below 1e-3 (``1.18e-10``), n/a if undefined."""
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def logrank_p(time, event, group) -> float:
    """Log-rank test p-value between the groups (scikit-survival ``compare_survival``)."""
    from sksurv.compare import compare_survival

    g = np.asarray(group)
    if len(np.unique(g)) < 2:
        return float("nan")
    _, p = compare_survival(_surv(time, event), g)
    return float(p)


def numbers_at_risk(time, groups: dict, at) -> dict:
    """Patients still at risk (follow-up time >= t) in each group (a boolean mask) at each time of ``at``."""
    t = np.asarray(time, float)
    return {name: [int(((t >= x) & np.asarray(m, bool)).sum()) for x in at] for name, m in groups.items()}


def km_plot(time, event, high, path: str | Path, title: str, time_label: str = "time",
            random_weights: bool = False) -> dict:
    """Kaplan-Meier curves of the high- and low-risk groups with the log-rank p-value and a
    numbers-at-risk table under them, as a PNG.

    ``high`` is a boolean per patient. Returns ``{"logrank_p", "n_high", "n_low", "png",
    "at_risk"}`` (``at_risk``: ``times`` and, per group, the patients at risk at each).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from sksurv.nonparametric import kaplan_meier_estimator

    from slide_clip.pictures import random_weights_title, save_figure

    t, e, hi = np.asarray(time, float), np.asarray(event, bool), np.asarray(high, bool)
    p = logrank_p(t, e, hi.astype(int))
    fig, (ax, tab) = plt.subplots(2, 1, figsize=(5.8, 5.0), dpi=110, sharex=True,
                                  gridspec_kw={"height_ratios": [4, 1]})
    groups = {}
    for mask, label, colour in ((hi, "high risk", "#c0392b"), (~hi, "low risk", "#2471a3")):
        if mask.sum() == 0:
            continue
        groups[label] = (mask, colour)
        x, y = kaplan_meier_estimator(e[mask], t[mask])
        ax.step(np.r_[0, x], np.r_[1, y], where="post", color=colour, label=f"{label} (n={int(mask.sum())})")
        cens = mask & ~e
        if cens.any():  # censoring ticks on the curve
            ys = np.interp(t[cens], np.r_[0, x], np.r_[1, y], right=y[-1])
            ax.plot(t[cens], ys, "|", color=colour, ms=7)
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(left=0)
    title = random_weights_title(f"{title}\nlog-rank p = {format_p(p)}", random_weights)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower left", fontsize=8, title="risk group (| censored)", title_fontsize=8)
    end = float(t.max()) if len(t) else 0.0
    at = [float(x) for x in ax.get_xticks() if 0 <= x <= end]
    risk = numbers_at_risk(t, {k: m for k, (m, _) in groups.items()}, at)
    tab.set_ylim(-0.5, len(groups) - 0.5)
    for row, (name, (_, colour)) in enumerate(groups.items()):
        for x, n in zip(at, risk[name]):
            tab.text(x, len(groups) - 1 - row, str(n), ha="center", va="center", fontsize=8, color=colour)
    tab.set_yticks(range(len(groups)), list(groups)[::-1], fontsize=8)
    tab.tick_params(axis="y", length=0, pad=14)
    for side in ("top", "right", "left"):
        tab.spines[side].set_visible(False)
    tab.set_title("number at risk", fontsize=8, loc="left")
    tab.set_xlabel(time_label)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    save_figure(fig, path, 110, title)
    return {"logrank_p": _clean(p), "n_high": int(hi.sum()), "n_low": int((~hi).sum()), "png": str(path),
            "at_risk": {"times": at, **risk}}
