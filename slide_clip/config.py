"""The pipeline's configuration: typed, validated, loaded from YAML (``configs/default.yaml``).

The command line, the Python API and the Prefect flows all take a :class:`PipelineConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slide_clip.errors import ConfigError
from slide_clip.resources import config_file
from slide_clip.yaml_files import read_yaml

DEFAULT_CONFIG = config_file("default.yaml")


class _Section(BaseModel):
    # allow_inf_nan=False: a NaN passes every bound check (nan > 0 and nan <= 50 are both False,
    # so pydantic reported "less than or equal to 50"); NaN and inf are refused as not finite
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


#: The tissue-detection algorithm (:func:`slide_clip.tissue.tissue_mask`), recorded in every
#: store as ``tiling.tissue_algorithm``. 1: Otsu's threshold on smoothed saturation (stores
#: without the attribute were made by it); 2: also a threshold at most ``min_saturation`` above
#: the glass, so pale tissue beside dense tissue is kept. Raised whenever the same settings give
#: another mask; a store made by another version is refused (:meth:`SlideStore.check_tissue_algorithm`),
#: never mixed with new ones. Not a :class:`TissueConfig` field: a store older than a field counts
#: as that field's default, which must not happen to the algorithm.
TISSUE_ALGORITHM = 2


class TissueConfig(_Section):
    """Tissue detection on the thumbnail; sizes are physical (µm, µm²)."""

    thumbnail_max_side: int = Field(2048, ge=256, le=8192, description="thumbnail's longest side, px")
    smoothing_um: float = Field(8.0, ge=0)
    min_saturation: float = Field(
        0.05, ge=0, le=1, description="the saturation threshold's floor (a blank slide stays empty) and its "
                                      "most above the glass's saturation (pale tissue is kept)")
    closing_um: float = Field(16.0, ge=0)
    min_object_um2: float = Field(20_000.0, ge=0)
    min_hole_um2: float = Field(10_000.0, ge=0)
    dark_value: float = Field(0.15, ge=0, le=1)
    exclude_pen: bool = True


class TilingConfig(_Section):
    """The tile grid: exact target resolution and size."""

    target_mpp: float | None = Field(
        None, gt=0, le=50,
        description="tile resolution, µm/px; null (default): the µm/px the model was trained at "
                    "(its registry entry's training_mpp), else 0.5. Read it with pipeline.target_mpp_for(cfg)")
    tile_size: int | None = Field(
        None, ge=16, le=4096,
        description="tile side, px at target_mpp; null (default): the model's input size, so the model "
                    "sees target_mpp; another size is resampled to the model's input, and recorded")
    overlap: float = Field(0.0, ge=0, lt=1, description="fraction shared with a neighbour")
    min_tissue: float = Field(0.25, ge=0, le=1, description="tiles with less tissue are dropped")


class EncodeConfig(_Section):
    """The image encoder and how batches reach it."""

    model: str = "quiltnet-b-32"
    checkpoint: str | None = None
    registries: tuple[str, ...] = ()
    batch_size: int = Field(64, ge=1, le=4096)
    num_workers: Literal["auto"] | Annotated[int, Field(ge=0, le=64)] = Field(
        "auto", description="loader worker processes; auto: none on a CPU, min(8, cores - 1) on a GPU")
    device: str = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    chunk_rows: int = Field(2048, ge=1, description="embedding rows per Zarr chunk")
    flush_seconds: float = Field(60.0, gt=0, description="longest time between writes")


class ScoringConfig(_Section):
    """Slide-level aggregation of tile scores."""

    topk: int = Field(50, ge=1, description="k of the top-k pooled slide score, fixed in advance")
    decision: Literal["topk", "mean", "area"] = Field(
        "topk", description="which slide score decides the predicted label")


class HeatmapConfig(_Section):
    """Heatmap rendering (always at thumbnail scale)."""

    smoothing_tiles: float = Field(0.0, ge=0, description="Gaussian sigma over neighbouring tiles; 0 = none")
    colormap: str = Field("viridis", description="a perceptual matplotlib colormap")
    alpha: float = Field(0.55, ge=0, le=1, description="opacity of the probability overlay")
    scale: Literal["fixed", "auto"] = Field(
        "fixed", description="colour scale: fixed 0-1 probabilities (comparable across slides), or auto: "
        "stretched to this slide's min-max, for flat maps (labelled as such)")


class StorageConfig(_Section):
    """Slides and stores at URLs (``s3://``, ``gs://``, ``az://``, ``https://``): how to reach them.

    Credentials come from the usual chain of each service (for S3: environment variables,
    ``~/.aws/credentials``, the profile, the instance's role); nothing secret belongs here.
    ``--storage-options`` on the command line overrides these (see :mod:`slide_clip.storage`).
    """

    endpoint_url: str | None = Field(None, description="an S3-compatible server (MinIO, Ceph, a local test server)")
    profile: str | None = Field(None, description="a named profile of ~/.aws/credentials (S3)")
    anonymous: bool = Field(False, description="unsigned requests: public buckets")
    region: str | None = None
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="any other fsspec option of the file system (s3fs, gcsfs, adlfs)")
    cache_dir: str | None = Field(None, description="local copies of slides only OpenSlide reads (MIRAX, NDPI, "
                                                    "DICOM...); default ~/.cache/slide-clip/slides")
    cache_max_gb: float = Field(50.0, gt=0, description="the cache's size limit; least recently used slides go first")
    claim_ttl_s: float = Field(300.0, ge=10, description="a store's claim expires this long after its last renewal")


class PipelineConfig(_Section):
    tissue: TissueConfig = TissueConfig()
    tiling: TilingConfig = TilingConfig()
    encode: EncodeConfig = EncodeConfig()
    scoring: ScoringConfig = ScoringConfig()
    heatmap: HeatmapConfig = HeatmapConfig()
    storage: StorageConfig = StorageConfig()

    def with_overrides(self, **sections: dict[str, Any]) -> "PipelineConfig":
        """A copy with fields replaced, e.g. ``with_overrides(tiling={"tile_size": 256})``.

        ``None`` values are ignored, so command-line options left unset keep the file's.
        """
        data = self.model_dump()
        for section, values in sections.items():
            data[section].update({k: v for k, v in (values or {}).items() if v is not None})
        return _validate(data, None)


#: Configuration fields set by command-line options, named as the user typed them.
OPTIONS = {"tiling.target_mpp": "--target-mpp", "tiling.tile_size": "--tile-size", "tiling.overlap": "--overlap",
           "tiling.min_tissue": "--min-tissue", "encode.batch_size": "--batch-size", "encode.num_workers": "--workers",
           "encode.device": "--device", "encode.precision": "--precision", "heatmap.smoothing_tiles": "--smooth",
           "heatmap.scale": "--scale", "scoring.topk": "--topk", "scoring.decision": "--decision"}

_NUMBER_ERRORS = {"finite_number", "greater_than", "greater_than_equal", "less_than", "less_than_equal",
                  "float_parsing", "float_type", "int_parsing", "int_type", "int_from_float"}


def _allowed_range(section: str, name: str) -> str | None:
    """What a numeric field accepts, in words ("a finite number greater than 0 and at most 50")."""
    import annotated_types as at

    model = PipelineConfig.model_fields.get(section)
    field = model.annotation.model_fields.get(name) if model is not None else None
    if field is None:
        return None
    parts = []
    for m in field.metadata:
        if isinstance(m, at.Gt):
            parts.append(f"greater than {m.gt:g}")
        elif isinstance(m, at.Ge):
            parts.append(f"at least {m.ge:g}")
        elif isinstance(m, at.Lt):
            parts.append(f"less than {m.lt:g}")
        elif isinstance(m, at.Le):
            parts.append(f"at most {m.le:g}")
    if not parts:  # bounds inside a union (num_workers): pydantic's own words say it better
        return None
    whole = "int" in str(field.annotation) and "float" not in str(field.annotation)
    kind = "a whole number" if whole else "a finite number"
    return f"{kind} {' and '.join(parts)}".strip()


def _field(loc) -> str:
    """A field's dotted name, without the union branches pydantic adds (``literal['auto']``)."""
    return ".".join(str(x) for x in loc if not (isinstance(x, str) and ("[" in x or x.startswith("constrained-"))))


def _validate(data: Any, source: str | None) -> PipelineConfig:
    """``data`` as a config; ``source`` is the file it came from, None for command-line options."""
    try:
        return PipelineConfig.model_validate(data or {})
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        where = _field(first["loc"])
        msgs = [err["msg"] for err in errors if _field(err["loc"]) == where]  # one per union branch
        msg = " or ".join(dict.fromkeys(m if i == 0 else m.removeprefix("Input should be ").strip()
                                        for i, m in enumerate(msgs)))
        parts = where.split(".")
        value = first.get("input")
        shown = f"{value:g}" if isinstance(value, float) else repr(value)
        allowed = _allowed_range(*parts) if first["type"] in _NUMBER_ERRORS and len(parts) == 2 else None
        if allowed:
            msg = f"{shown} is not {allowed}"
        if source is None:  # command-line options: name the option as typed
            option = OPTIONS.get(where)
            if option:
                raise ConfigError(f"{option} {shown}: must be {allowed} ({where})" if allowed
                                  else f"{option} {shown}: {msg} ({where})") from None
            raise ConfigError(f"invalid option setting {where}: {msg}") from None
        raise ConfigError(f"invalid configuration: {where}: {msg}", path=source) from None


def load_config(path: str | Path | None = None) -> PipelineConfig:
    """Read a pipeline config YAML (the project's default when ``path`` is None)."""
    p = Path(path) if path else DEFAULT_CONFIG
    if not p.is_file():
        raise ConfigError("config file not found", path=p)
    data = read_yaml(p, "config")
    if data is not None and not isinstance(data, dict):
        raise ConfigError("config must be a mapping of sections (tissue, tiling, encode, scoring, heatmap, storage)", path=p)
    cfg = _validate(data, str(p))
    enc = cfg.encode
    if enc.registries:  # registry paths in a config file are relative to that file
        regs = tuple(str((p.parent / r).resolve()) if not Path(r).is_absolute() else r for r in enc.registries)
        cfg = cfg.with_overrides(encode={"registries": regs})
    if enc.checkpoint and not Path(enc.checkpoint).is_absolute():
        cfg = cfg.with_overrides(encode={"checkpoint": str((p.parent / enc.checkpoint).resolve())})
    return cfg


def default_model() -> str:
    """The encoder used when none is named: ``encode.model`` of the shipped ``configs/default.yaml``."""
    return load_config().encode.model


def model_option_help() -> str:
    """The ``--model`` help of the commands that embed, saying the default plainly."""
    return (f"Encoder: a registry name (`slide-clip models`), or random:NAME for seeded random weights (testing "
            f"only). Default: {default_model()} (encode.model of the config; weights from the Hugging Face hub "
            "on first use, or a local file with --checkpoint).")
