"""The survival flow: cross-validated baselines from a cohort folder and a clinical table.

Each baseline is one task (a library call, :func:`slide_clip.survival.run_survival`); the
flow publishes a markdown artifact of the metrics. The cohort flow calls it when it is given
a clinical table.
"""

# No `from __future__ import annotations` (see process_slide.py).
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from slide_clip.errors import SlideClipError
from slide_clip.survival import BASELINES, metrics_markdown
from slide_clip_flows import quiet_user_errors
from slide_clip_tasks.survival import survival_task


@flow(name="process-survival", log_prints=True)
def process_survival(
    out: str,
    clinical: str,
    time: str,
    event: str,
    model: str | None = None,
    baselines: list[str] = list(BASELINES),  # noqa: B006 - Prefect parameters are copied per run
    folds: int = 5,
    seed: int = 0,
    name: str | None = None,
    manifest: str | None = None,
    settings: dict | None = None,
) -> dict:
    """Run the baselines on ``out``'s stores; returns ``{baseline: {"report", "headline", "pooled",
    "logrank_p", "warning"}}`` (``headline``: mean ± SD of the per-fold c-index, see docs/SURVIVAL.md).

    ``settings`` holds further :class:`slide_clip.survival.SurvivalSettings` fields (e.g.
    ``{"abmil": {"epochs": 20}}``).
    """
    quiet_user_errors()
    log = get_run_logger()
    s = {**(settings or {}), "folds": folds, "seed": seed, "name": name}
    reports = {}
    try:
        for b in baselines:
            reports[b] = survival_task(out, clinical, time, event, b, model, manifest, s)
    except SlideClipError as exc:
        log.error(str(exc))
        raise
    create_markdown_artifact(metrics_markdown(reports), key="survival-metrics",
                             description="Cross-validated survival baselines: c-index, mean ± SD over folds, "
                                         "with 95% bootstrap CIs")
    return {b: {"report": r["path"], "headline": r["headline"], "pooled": r["pooled"],
                "logrank_p": r["km"]["logrank_p"], "warning": r["small_cohort"]["warning"]}
            for b, r in reports.items()}
