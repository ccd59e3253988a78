"""Stages: explore a cohort's stores (clusters, search, maps). Paths and small JSON values in and out."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from slide_clip.config import PipelineConfig
from slide_clip.explore.clusters import cluster
from slide_clip.explore.maps import embedding_map
from slide_clip.explore.retrieval import search
from slide_clip_tasks._policy import RETRIES, RETRY_DELAY_SECONDS, transient


@task(name="clusters", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS,
      retry_condition_fn=transient)
def cluster_task(out: str, k: int = 12, model: str | None = None, sample: int = 20000, seed: int = 0) -> dict:
    """Cluster the cohort's tiles (k-means) into a ``clusters-k<k>`` score set; returns the output paths."""
    r = cluster([out], k=k, model=model, sample=sample, seed=seed)
    return {"set": r["set"], "table": str(r["table_path"]), "csv": str(r["csv"]),
            "maps": [str(p) for p in r["maps"]], "galleries": [str(p) for p in r["galleries"]],
            "failed": [m for _, m in r["failed"]]}


@task(name="search", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS,
      retry_condition_fn=transient)
def search_task(out: str, config: PipelineConfig, texts: list[str], top: int = 20, model: str | None = None,
                name: str | None = None) -> dict:
    """Search the cohort with text queries; returns the hits table's and galleries' paths."""
    r = search([out], config, texts=texts, model=model, top=top, name=name)
    return {"dir": str(r["dir"]), "files": [str(p) for p in r["files"]], "queries": r["queries"],
            "failed": [m for _, m in r["failed"]]}


@task(name="embedding-map", cache_policy=NO_CACHE, retries=RETRIES, retry_delay_seconds=RETRY_DELAY_SECONDS,
      retry_condition_fn=transient)
def map_task(out: str, method: str = "umap", colour_by: list[str] | None = None, per_slide: int = 200,
             model: str | None = None, seed: int = 0) -> dict:
    """Draw a map of a sample of tiles; returns the pictures' paths and the method that ran."""
    r = embedding_map([out], model=model, method=method, per_slide=per_slide, seed=seed,
                      colour_by=colour_by or ["slide"])
    return {"files": [str(p) for p in r["files"]], "method": r["method"], "failed": [m for _, m in r["failed"]]}
