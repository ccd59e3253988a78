"""Stage: heatmap PNGs and the QuPath GeoJSON of one score set."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from slide_clip.config import PipelineConfig
from slide_clip.scoring import heatmaps
from slide_clip_tasks._policy import RETRIES, RETRY_DELAY_SECONDS, transient


@task(name="heatmap", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS,
      retry_condition_fn=transient)
def heatmap_task(store: str, score_set: str, config: PipelineConfig, model: str | None = None) -> list[str]:
    """Paths of the files written."""
    return [str(p) for p in heatmaps(store, score_set, config, model=model)]
