"""Stage: thumbnail and tissue mask, written to the slide's store."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from slide_clip.config import PipelineConfig
from slide_clip.pipeline import tissue_stage
from slide_clip_tasks._policy import RETRIES, RETRY_DELAY_SECONDS, transient


@task(name="tissue", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS,
      retry_condition_fn=transient)
def tissue_task(slide: str, out: str, config: PipelineConfig, mpp: float | None = None, force: bool = False,
                slide_id: str | None = None) -> str:
    """The store path; an existing store of the same slide and settings is reused unless ``force``."""
    return tissue_stage(slide, out, config, mpp=mpp, overwrite=force, slide_id=slide_id)
