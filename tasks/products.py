"""Stage: a slide's score sets, summaries and heatmaps, each made only when missing or stale."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from slide_clip.config import PipelineConfig
from slide_clip.products import slide_products
from slide_clip_tasks._policy import RETRIES, RETRY_DELAY_SECONDS, transient


@task(name="products", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS,
      retry_condition_fn=transient)
def products_task(store: str, prompts: list[str], config: PipelineConfig, model: str | None = None,
                  heatmaps: bool = True, force: bool = False, encoders=None, on_set=None) -> dict:
    """``{set name: {"predicted", "rescored", "slide_prob", "model"[, "heatmaps"]}}``.

    ``encoders`` (the shard's :class:`slide_clip.encoders.cache.EncoderCache`) lends the model
    that embedded the slide to the text side, when a prompt set's classifier is not cached yet.
    """
    return slide_products(store, prompts, config, model=model, draw=heatmaps, force=force, encoders=encoders,
                          on_set=on_set)
