"""Search queries as embeddings in a cohort model's joint space: words, image files, stored tiles.

- **Text** uses the zero-shot prompt machinery (:mod:`slide_clip.prompts`,
  :func:`slide_clip.zeroshot.text_classifier`): a query that names a class of the prompt set
  is that class (its synonyms × the set's templates); any other text is a class of its own
  with the set's templates. ``raw=True`` embeds the text verbatim. Text embeddings are
  cached with :class:`~slide_clip.zeroshot.ClassifierCache` and the text encoder is loaded
  only on a cache miss, through :class:`~slide_clip.encoders.cache.EncoderCache`, which refuses
  weights other than the stores' (``weights_sha256``).
- **Stored tile** ``(slide, x, y)``: the tile's own stored embedding (never re-encoded); x, y
  are level-0 pixels, the tile's top-left corner or any point inside it.
- **Image file**: encoded once with the stored model (its preprocessing), nothing else.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slide_clip.encoders.outputs import text_refusal
from slide_clip.errors import ConfigError
from slide_clip.explore.cohort import Cohort
from slide_clip.prompts import PromptClass, PromptSet, load_prompts
from slide_clip.zeroshot import ClassifierCache, normalize, text_classifier

#: Prompt set whose templates phrase a free-text query (when no set is given).
DEFAULT_TEMPLATES = "tissue_types"


@dataclass
class Query:
    """One query: a name (shown in tables and galleries), its unit vector and where it came from."""

    name: str
    kind: str  # "text", "class", "tile" or "image"
    vector: np.ndarray
    detail: dict = field(default_factory=dict)


def _query_set(texts: list[str], prompts: PromptSet, raw: bool) -> tuple[PromptSet, list[str]]:
    classes, kinds = [], []
    by_name = {c.name.lower(): c for c in prompts.classes}
    for t in texts:
        t = t.strip()
        if not t:
            raise ConfigError("an empty text query", hint="Give words, e.g. \"necrosis\".")
        if not raw and t.lower() in by_name:
            c = by_name[t.lower()]
            classes.append(PromptClass(name=t, synonyms=c.synonyms))
            kinds.append("class")
        else:
            classes.append(PromptClass(name=t, synonyms=(t,)))
            kinds.append("text")
    templates = ("{}",) if raw else prompts.templates
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise ConfigError(f"a text query is given twice ({names})")
    # model_construct: a query set may have a single class (PromptSet requires two to classify)
    qs = PromptSet.model_construct(name=f"search-{prompts.name}{'-raw' if raw else ''}", description="",
                                   templates=tuple(templates), classes=tuple(classes))
    return qs, kinds


def _encoder(cohort: Cohort, cfg, encoders=None):
    """The cohort's model for text or image files, its weights hash checked against the stores.

    A ``checkpoint`` in ``cfg`` is the stored model's weights file (as ``--checkpoint`` of
    `zeroshot`): it applies to the cohort's model whatever ``cfg.encode.model`` names.
    ``encoders`` (an :class:`~slide_clip.encoders.cache.EncoderCache`) keeps the model loaded
    between calls, as a long-running caller (the viewer) wants; by default a fresh one loads it.
    """
    from slide_clip.encoders.cache import EncoderCache

    if encoders is None:
        if cfg.encode.checkpoint and cfg.encode.model != cohort.model:
            cfg = cfg.with_overrides(encode={"model": cohort.model})
        encoders = EncoderCache(cfg)
    first = cohort.slides[0]
    return encoders.for_store(cohort.model, cohort.weights_sha256, first.path,
                              first.store.embedding_attrs(cohort.model))


def text_queries(cohort: Cohort, texts: list[str], cfg, *, prompts: str | Path | None = None,
                 raw: bool = False, encoders=None) -> list[Query]:
    """Embed text queries with the cohort's model (cached in ``<out>/classifiers``).

    Parameters
    ----------
    cohort : Cohort
    texts : list of str
        Words or sentences; a text naming a class of ``prompts`` is that class.
    cfg : PipelineConfig
        Where the text encoder comes from (registries, checkpoint, device).
    prompts : str or Path, optional
        Prompt set YAML or shipped name (default :data:`DEFAULT_TEMPLATES`).
    raw : bool
        Embed each text verbatim (no templates, no synonyms).
    encoders : EncoderCache, optional
        Keeps the text encoder loaded between calls (see :func:`_encoder`).
    """
    if not texts:
        return []
    refusal = text_refusal(cohort.model, cohort.slides[0].store.embedding_attrs(cohort.model))
    if refusal is not None:  # vision-only or pre-projection: refused before a model is loaded
        raise refusal
    ps = load_prompts(prompts or DEFAULT_TEMPLATES)
    qs, kinds = _query_set(texts, ps, raw)
    cache = ClassifierCache(cohort.out / "classifiers")
    clf = cache.get(cohort.model, cohort.weights_sha256, qs)
    if clf is None:
        clf = text_classifier(_encoder(cohort, cfg, encoders), qs)
        cache.put(cohort.model, cohort.weights_sha256, qs, clf)
    return [Query(c.name, k, clf[i], {"texts": qs.texts(c), "prompt_set": ps.name})
            for i, (c, k) in enumerate(zip(qs.classes, kinds))]


def parse_tile(spec: str) -> tuple[str, int, int]:
    """``SLIDE:X:Y`` (level-0 pixels) → (slide, x, y); the slide may itself contain ':'."""
    parts = spec.rsplit(":", 2)
    try:
        return parts[0], int(float(parts[1])), int(float(parts[2]))
    except (IndexError, ValueError):
        raise ConfigError(f"tile query {spec!r} is not SLIDE:X:Y", hint="Level-0 pixels, e.g. slide1:4480:2240.") \
            from None


def find_tile(cohort: Cohort, slide: str, x: int, y: int) -> tuple[int, int]:
    """(slide index, row) of the stored tile whose top-left is (x, y), else the one containing it.

    Raises :class:`ConfigError` when no stored tile covers the point.
    """
    i = cohort.index_of(slide)
    s = cohort.slides[i]
    coords = cohort.coords(i)
    hit = np.flatnonzero((coords[:, 0] == x) & (coords[:, 1] == y))
    if hit.size:
        return i, int(hit[0])
    ex, ey = s.store.tiling["tile_extent_level0"]
    inside = np.flatnonzero((coords[:, 0] <= x) & (x < coords[:, 0] + ex) & (coords[:, 1] <= y) &
                            (y < coords[:, 1] + ey))
    if not inside.size:
        raise ConfigError(f"slide {s.slide_id!r} has no stored tile at level-0 ({x}, {y})", path=s.path,
                          hint="Give a point inside tissue (see the table of `slide-clip search`, columns x, y).")
    d = (coords[inside, 0] - x) ** 2 + (coords[inside, 1] - y) ** 2
    return i, int(inside[np.argmin(d)])


def tile_queries(cohort: Cohort, tiles: list[tuple[str, int, int]]) -> list[Query]:
    """Queries from stored tiles: each tile's own stored embedding (never re-encoded)."""
    out = []
    for slide, x, y in tiles:
        i, r = find_tile(cohort, slide, x, y)
        vec = cohort.rows(i, np.array([r]))[0]
        tx, ty = (int(v) for v in cohort.coords(i)[r])
        out.append(Query(f"{cohort.slides[i].slide_id}:{tx}:{ty}", "tile", vec,
                         {"slide_id": cohort.slides[i].slide_id, "tile": r, "x": tx, "y": ty}))
    return out


def image_queries(cohort: Cohort, images: list[str | Path], cfg) -> list[Query]:
    """Queries from image files, each encoded once with the cohort's model and preprocessing."""
    if not images:
        return []
    import torch
    from PIL import Image, UnidentifiedImageError

    from slide_clip.storage import objects
    from slide_clip.storage.urls import is_url, url_name

    pics = []
    for p in images:
        try:  # a URL's bytes read whole (a tile): a missing object is its one-line StorageError
            with Image.open(io.BytesIO(objects.read_bytes(p)) if is_url(p) else p) as im:
                pics.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise ConfigError(f"query image cannot be read ({type(e).__name__})", path=p,
                              hint="Give a PNG, JPEG or TIFF tile.") from None
    enc = _encoder(cohort, cfg)
    feats = enc.encode_images(torch.stack([enc.preprocess(im) for im in pics]))
    return [Query(url_name(p) if is_url(p) else Path(p).name, "image", normalize(f), {"image": str(p)})
            for p, f in zip(images, feats)]


def load_queries(cohort: Cohort, cfg, *, texts=(), images=(), tiles=(), prompts=None, raw=False) -> list[Query]:
    """All queries, in the order text, tile, image; names must be unique."""
    qs = [*text_queries(cohort, list(texts), cfg, prompts=prompts, raw=raw),
          *tile_queries(cohort, [parse_tile(t) if isinstance(t, str) else t for t in tiles]),
          *image_queries(cohort, list(images), cfg)]
    if not qs:
        raise ConfigError("no query given", hint="Give words, --image FILE or --tile SLIDE:X:Y.")
    names = [q.name for q in qs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"query {dupes[0]!r} is given twice")
    return qs
