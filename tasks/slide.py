"""Stage: open and check a slide (format, brightfield RGB, resolution)."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from slide_clip.config import PipelineConfig
from slide_clip.pipeline import check_slide, target_mpp_for
from slide_clip_tasks._policy import RETRIES, RETRY_DELAY_SECONDS, transient


@task(name="check-slide", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS,
      retry_condition_fn=transient)
def check_slide_task(slide: str, config: PipelineConfig, mpp: float | None = None) -> dict:
    """The slide's metadata (SlideInfo as a dict); fails with a one-line error for bad input."""
    return check_slide(slide, mpp, target_mpp_for(config))
