"""Stage: the tile grid at the exact target resolution."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from slide_clip.config import PipelineConfig
from slide_clip.pipeline import tiles_stage
from slide_clip_tasks._policy import RETRIES, RETRY_DELAY_SECONDS, transient


@task(name="tile-grid", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS,
      retry_condition_fn=transient)
def tiles_task(store: str, config: PipelineConfig) -> int:
    """The number of tiles kept (0 for a slide without tissue)."""
    return tiles_stage(store, config)
