"""Stage: the cohort summary table (CSV and Parquet) with per-slide metadata."""

import json

from prefect import task
from prefect.cache_policies import NO_CACHE

from slide_clip.scoring import summarize
from slide_clip_tasks._policy import RETRIES, RETRY_DELAY_SECONDS, transient


@task(name="cohort-summary", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS,
      retry_condition_fn=transient)
def summary_task(out: str, score_set: str, model: str | None = None,
                 metadata: dict[str, dict] | None = None, only: list[str] | None = None) -> dict:
    """Write the cohort table of ``only`` these slides (all if None); returns its paths and rows."""
    df, csv_path, parquet_path = summarize(out, set_name=score_set, model=model, metadata=metadata, only=only)
    rows = json.loads(df.to_json(orient="records"))  # NaN -> null: JSON-able
    return {"csv": str(csv_path), "parquet": str(parquet_path), "rows": rows}
