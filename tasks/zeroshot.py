"""Stage: zero-shot tile scores and the slide summary for one prompt set."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from slide_clip.config import PipelineConfig
from slide_clip.errors import SlideClipError
from slide_clip.prompts import load_prompts
from slide_clip.scoring import current_summary, zeroshot
from slide_clip_tasks._policy import RETRIES, RETRY_DELAY_SECONDS, transient


@task(name="zeroshot", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS,
      retry_condition_fn=transient)
def zeroshot_task(store: str, prompts: str, config: PipelineConfig, model: str | None = None,
                  force: bool = False) -> dict:
    """The slide summary; scores already made with the same prompts are kept unless ``force``."""
    ps = load_prompts(prompts)
    if not force:
        summary = current_summary(store, ps, model)
        if summary is not None:
            return {**summary, "rescored": False}
    [summary] = zeroshot([store], ps, config, model=model)
    if summary["status"] == "failed":
        raise SlideClipError(summary["error"])
    return {**summary, "rescored": True}
