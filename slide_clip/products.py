"""What ``slide-clip run`` promises for a slide beyond its embeddings, each made only when
missing or stale: a score set and summary per prompt set, and that set's heatmaps.

A score set is current when it was made from the same prompts and weights (and not
``force``); heatmaps are current when their record names the score set's ``write_id`` and the
heatmap settings (:func:`slide_clip.scoring.heatmaps_current`). A slide whose heatmaps were
lost, or never drawn because a run stopped after scoring, gets them drawn from the stored
scores; nothing is re-encoded.
"""

from __future__ import annotations

from slide_clip.config import PipelineConfig
from slide_clip.encoders.cache import EncoderCache
from slide_clip.errors import SlideClipError
from slide_clip.faults import kill_point
from slide_clip.prompts import load_prompts
from slide_clip.scoring import current_summary, heatmaps, heatmaps_current, zeroshot


def score_set(store: str, prompts: str, cfg: PipelineConfig, *, model: str | None = None, force: bool = False,
              encoders: EncoderCache | None = None) -> dict:
    """The slide's summary for one prompt set, scored now unless current; ``rescored`` says which."""
    ps = load_prompts(prompts)
    if not force:
        summary = current_summary(store, ps, model)
        if summary is not None:
            return {**summary, "rescored": False}
    [summary] = zeroshot([store], ps, cfg, model=model, encoders=encoders)
    if summary["status"] == "failed":
        raise SlideClipError(summary["error"])
    return {**summary, "rescored": True}


def slide_products(store: str, prompt_sets: list[str], cfg: PipelineConfig, *, model: str | None = None,
                   draw: bool = True, force: bool = False, encoders: EncoderCache | None = None,
                   on_set=None) -> dict:
    """Every score set of ``prompt_sets`` and (``draw``) its heatmaps, made where missing or stale.

    Returns ``{set name: {"predicted", "rescored", "slide_prob", "model"[, "heatmaps"]}}``;
    ``on_set(name, entry)`` is called as each set is done (so a slide failing at a later set
    keeps the earlier ones in its status).
    """
    scored: dict[str, dict] = {}
    for p in prompt_sets:
        summary = score_set(store, p, cfg, model=model, force=force, encoders=encoders)
        name = summary["score_set"]
        entry = {"predicted": summary["predicted"], "rescored": summary["rescored"],
                 "slide_prob": summary["slide_prob"], "model": summary.get("model", model)}
        kill_point("scored")
        if draw and (summary["rescored"] or not heatmaps_current(store, name, cfg, model=model)):
            entry["heatmaps"] = [str(f) for f in heatmaps(store, name, cfg, model=model)]
            entry["drawn"] = True
        scored[name] = entry
        if on_set is not None:
            on_set(name, entry)
    return scored


def did_work(scored: dict) -> bool:
    """Whether any set was scored or drawn in this run."""
    return any(v.get("rescored") or v.get("drawn") for v in scored.values())
