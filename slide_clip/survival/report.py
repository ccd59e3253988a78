"""A survival run's report in words: the console lines and the markdown of the Prefect artifact.

Both say the same things in the same order: the headline (mean ± SD of the per-fold c-index,
with its interval), every fold's value and events, the pooled c-index of the standardised
risks, the log-rank and permutation p-values (scientific notation below 1e-3), and the
small-cohort warning when it applies.
"""

from __future__ import annotations

from slide_clip.survival.metrics import format_p


def fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(c: dict) -> str:
    return "n/a" if c.get("low") is None else f"{c['low']:.3f}–{c['high']:.3f}"


def headline_text(h: dict, metric: str) -> str:
    """``0.812 ± 0.045 (95% CI 0.760–0.851)`` for ``metric`` (``harrell`` or ``uno``)."""
    m = h[metric]
    return f"{fmt(m['mean'])} ± {fmt(m['sd'])} (95% CI {_ci(m['ci'])})"


def permutation_text(perm: dict | None) -> str | None:
    if not perm:
        return None
    if perm.get("p") is None:
        return f"permutation p n/a ({perm['n']} permutations, none valid)"
    return (f"permutation p {format_p(perm['p'])} ({perm['n_valid']} permutations of the outcomes, every fold "
            f"refitted; null mean C {fmt(perm['null_mean'])})")


def console_lines(report: dict, where) -> list[str]:
    """What the command line prints for one baseline's report (``where``: its folder)."""
    b, h, pooled = report["baseline"], report["headline"], report["pooled"]
    folds = report["folds"]
    k = len(folds)
    lines = [
        f"{b}: Harrell's C {headline_text(h, 'harrell')}, Uno's C {headline_text(h, 'uno')}: mean ± SD over {k} "
        "test folds",
        f"{b}:   per fold: Harrell's C " + ", ".join(fmt(f["harrell"]) for f in folds)
        + "; events " + ", ".join(str(f["events"]) for f in folds)
        + " of " + ", ".join(str(f["n"]) for f in folds) + " patients",
        f"{b}:   pooled (each fold's risks standardised on its training risks): Harrell's C {fmt(pooled['harrell'])} "
        f"(95% CI {_ci(pooled['harrell_ci'])}), Uno's C {fmt(pooled['uno'])} (95% CI {_ci(pooled['uno_ci'])})",
    ]
    km = report["km"]
    tail = f"{b}:   log-rank p {format_p(km['logrank_p'])} (out-of-fold high vs low risk, {km['n_high']} vs " \
           f"{km['n_low']} patients)"
    perm = permutation_text(report.get("permutation"))
    lines.append(tail + (f"; {perm}" if perm else ""))
    warning = report["small_cohort"]["warning"]
    if warning:
        lines.append(f"{b}:   warning: {warning}" + ("" if report.get("permutation") else
                                                       " (--permutations N adds a permutation test)"))
    lines.append(f"{b}: -> {where}")
    return lines


def metrics_markdown(reports: dict[str, dict]) -> str:
    """A markdown summary of the runs (for a Prefect artifact): headline, folds, pooled, p-values, warnings."""
    lines = ["# Survival baselines", "",
             "Headline: mean ± SD over the test folds of each fold's c-index (95% CI: bootstrap of patients within "
             "folds). Pooled: all out-of-fold patients, each fold's risks standardised on its training risks.", "",
             "| baseline | fold | patients | events | Harrell's C (95% CI) | Uno's C (95% CI) |",
             "|---|---|---|---|---|---|"]
    for b, r in reports.items():
        h, p = r["headline"], r["pooled"]
        lines.append(f"| **{b}** | **mean ± SD** | {p['n']} | {p['events']} | **{headline_text(h, 'harrell')}** | "
                     f"**{headline_text(h, 'uno')}** |")
        for f in r["folds"]:
            lines.append(f"| {b} | {f['fold']} | {f['n']} | {f['events']} | {fmt(f['harrell'])} "
                         f"({_ci(f['harrell_ci'])}) | {fmt(f['uno'])} ({_ci(f['uno_ci'])}) |")
        lines.append(f"| {b} | pooled (standardised) | {p['n']} | {p['events']} | {fmt(p['harrell'])} "
                     f"({_ci(p['harrell_ci'])}) | {fmt(p['uno'])} ({_ci(p['uno_ci'])}) |")
    lines.append("")
    for b, r in reports.items():
        perm = permutation_text(r.get("permutation"))
        lines.append(f"- {b}: log-rank p (out-of-fold high vs low risk) {format_p(r['km']['logrank_p'])}"
                     + (f"; {perm}" if perm else "") + f"; report `{r['path']}`")
        if r["small_cohort"]["warning"]:
            lines.append(f"- **{b}: warning:** {r['small_cohort']['warning']}")
        for d in r["data"].get("dropped_slides") or []:
            lines.append(f"- {b}: left out (--allow-missing): slide {d['slide']}: {d['reason']}")
        for pid in r["data"].get("dropped_patients") or []:
            lines.append(f"- {b}: left out (--allow-missing): patient {pid} (no slide)")
    return "\n".join(lines)
