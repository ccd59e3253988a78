"""Stage: one cross-validated survival baseline of a cohort folder."""

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from slide_clip.survival import SurvivalSettings, run_survival


@task(name="survival-baseline", cache_policy=NO_CACHE)
def survival_task(out: str, clinical: str, time: str, event: str, baseline: str, model: str | None = None,
                  manifest: str | None = None, settings: dict | None = None) -> dict:
    """Run one baseline (``coxnet`` or ``abmil``); returns its report (JSON-able)."""
    log = get_run_logger()
    s = SurvivalSettings(**{**(settings or {}), "baselines": (baseline,)})
    [report] = run_survival(out, clinical, time, event, model=model, manifest=manifest, settings=s,
                            log=log.info).values()
    return report
