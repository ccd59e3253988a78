"""The explore flow: clusters, text search and an embedding map of a cohort's stores.

Runs after the cohort flow (or as an option of it, ``process_cohort(clusters=K)``); reads the
stores only, never re-encodes a tile.
"""

# No `from __future__ import annotations`: served flows are pickled (see process_cohort.py).
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from slide_clip.config import PipelineConfig, load_config
from slide_clip_flows import quiet_user_errors
from slide_clip_tasks.explore import cluster_task, map_task, search_task


@flow(name="explore-cohort", log_prints=True)
def explore_cohort(
    out: str,
    clusters: int | None = 12,
    queries: list[str] = [],  # noqa: B006
    map_method: str | None = "umap",
    config: PipelineConfig | None = None,
    model: str | None = None,
    top: int = 20,
    seed: int = 0,
) -> dict:
    """Cluster (k = ``clusters``), search ``queries`` and draw a map of the stores in ``out``.

    Each part is skipped when not asked for (``clusters`` None, no ``queries``, ``map_method`` None).
    Returns the paths written per part.
    """
    quiet_user_errors()
    cfg = config or load_config()
    log = get_run_logger()
    result: dict = {}
    if clusters:
        result["clusters"] = cluster_task(out, clusters, model, seed=seed)
        log.info(f"clusters: {result['clusters']['table']}")
    if queries:
        result["search"] = search_task(out, cfg, list(queries), top, model)
        log.info(f"search: {result['search']['dir']}")
    if map_method:
        colour = ["slide"] + ([result["clusters"]["set"]] if "clusters" in result else [])
        result["map"] = map_task(out, map_method, colour, model=model, seed=seed)
    lines = [f"# Explore `{out}`", ""]
    for part, r in result.items():
        files = r.get("files") or [r.get("table"), *r.get("maps", []), *r.get("galleries", [])]
        lines.append(f"## {part}")
        lines += [f"- `{f}`" for f in files if f]
        lines += [f"- failed: {m}" for m in r.get("failed", [])]
    create_markdown_artifact("\n".join(lines), key="explore-report", description="Explore outputs")
    return result
