"""The model registry: a name resolves to a backend, an architecture, a weights source and
preprocessing, in the spirit of open_clip's ``create_model_and_transforms`` factory.

Names a user can give (``--model``):

``NAME``
    an entry of the registry (``configs/models.yaml`` plus any ``--models`` YAML);
``random:NAME`` / ``random:NAME@seed=N``
    random weights, seeded (seed 0 unless ``@seed=N``), with the architecture and
    preprocessing of the registry entry ``NAME`` or of the open_clip architecture ``NAME``.
    The same seed gives the same weights in every process and on every machine with the
    same torch, so a store embedded with random weights can be scored later;
``ARCH`` with ``--checkpoint FILE``
    a bare open_clip architecture with a local state dict.

``--checkpoint FILE`` also replaces the weights source of a registry entry.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any


from slide_clip.encoders.outputs import ENTRY_OUTPUTS, JOINT, output_of, spec_output
from slide_clip.errors import ConfigError
from slide_clip.resources import config_file
from slide_clip.yaml_files import read_yaml

#: The registry shipped with the project.
DEFAULT_REGISTRY = config_file("models.yaml")

RANDOM_PREFIX = "random:"
_SEED_RE = re.compile(r"^(?P<base>.+?)@seed=(?P<seed>-?\d+)$")

#: Backends: ``open_clip`` and ``conch`` (vision-language, zero-shot capable); ``timm`` and
#: ``transformers`` (vision-only).
BACKENDS = ("open_clip", "conch", "timm", "transformers")
TEXT_BACKENDS = ("open_clip", "conch")

_FIELDS = {"arch", "backend", "weights", "checkpoint", "arch_config", "image_mean", "image_std",
           "image_interpolation", "input_size", "resize_size", "training_mpp", "licence", "gated", "pooling",
           "model_kwargs", "hub_id", "weights_format", "tokenizer", "tokenizer_sha256",
           "description", "output", "tile_size", "finetuned_from"}


@dataclass(frozen=True)
class ModelSpec:
    """One model, resolved: what to build, which weights, which preprocessing.

    Attributes
    ----------
    arch
        open_clip architecture name or ``hf-hub:ORG/NAME`` (backend ``open_clip``), or a timm
        model name (backend ``timm``).
    weights
        ``hf-hub:ORG/NAME``, ``pretrained:TAG`` (open_clip tag), a local file path, or None
        for seeded random weights (then ``seed`` is set).
    arch_config
        Path of an architecture config JSON (open_clip model config, or an
        ``open_clip_config.json`` with ``model_cfg`` and ``preprocess_cfg``).
    arch_cfg
        That file's contents (recorded in stores, so a store can be scored without the file).
    input_size
        Model input side in px (None: from the architecture config).
    resize_size
        timm backend: px the shorter side is resized to before the centre crop to
        ``input_size`` (None: no crop; e.g. 256 for Prov-GigaPath's card).
    training_mpp
        µm/px the model was trained at (the default target mpp when the user gives none).
    pooling
        timm backend: ``cls`` (class token / the model's own pooling) or ``cls+mean``
        (class token concatenated with the mean patch token, as Virchow2's card says).
    tokenizer
        conch backend: path of CONCH's tokenizer file (else looked for beside the weights
        and in an installed ``conch`` package).
    tokenizer_sha256
        conch backend: the sha256 the tokenizer file must have (another file is refused).
    output
        conch backend: ``joint`` (the embedding in the joint image-text space, L2-normalised;
        the default) or ``pre-projection`` (CONCH's features before the projection, not
        normalised: for survival and multiple-instance learning; no zero-shot or text search).
        See :mod:`slide_clip.encoders.outputs`.
    tile_size
        Tile side in px cut for this model by default (None: its input size), when its card
        cuts tiles larger than the input and then resizes and crops them (Prov-GigaPath: 256,
        then Resize(256) + CenterCrop(224)).
    finetuned_from
        open_clip backend: ``pretrained:TAG``, the open_clip weights of the same architecture
        that the entry's weights were fine-tuned from (QuiltNet, PLIP: OpenAI's CLIP). The
        architecture must have that tag's activation (QuickGELU for ``openai``; tested).
    """

    name: str
    arch: str
    weights: str | None
    backend: str = "open_clip"
    arch_config: str | None = None
    arch_cfg: dict | None = field(default=None, compare=False)
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    image_interpolation: str | None = None
    input_size: int | None = None
    resize_size: int | None = None
    training_mpp: float | None = None
    licence: str = ""
    gated: bool = False
    pooling: str = "cls"
    model_kwargs: dict = field(default_factory=dict, compare=False)
    hub_id: str | None = None
    weights_format: str = "open_clip"
    tokenizer: str | None = None
    tokenizer_sha256: str | None = None
    description: str = ""
    output: str = "joint"
    tile_size: int | None = None
    finetuned_from: str | None = None
    seed: int | None = None

    @property
    def random_weights(self) -> bool:
        return self.weights is None

    @property
    def weights_kind(self) -> str:
        if self.weights is None:
            return "random"
        if self.weights.startswith("hf-hub:"):
            return "hf-hub"
        if self.weights.startswith("pretrained:"):
            return "pretrained"
        return "file"

    @property
    def vision_only(self) -> bool:
        return self.backend not in TEXT_BACKENDS

    def to_dict(self) -> dict:
        """JSON-able form (recorded in stores as ``spec``)."""
        d = asdict(self)
        for k in ("image_mean", "image_std"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("image_mean", "image_std"):
            if known.get(k) is not None:
                known[k] = tuple(float(x) for x in known[k])
        known["model_kwargs"] = dict(known.get("model_kwargs") or {})
        return cls(**known)


def _resolve_rel(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    if value.startswith(("hf-hub:", "pretrained:")):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def read_arch_config(path: str | Path, model: str) -> dict:
    """The contents of an architecture config JSON (a mapping), or a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model {model!r}: architecture config not found", path=p)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {model!r}: architecture config is not JSON ({e})", path=p) from None
    if not isinstance(data, dict):
        raise ConfigError(f"model {model!r}: architecture config must be a JSON object", path=p)
    return data


def _entry_spec(name: str, entry: dict, p: Path) -> ModelSpec:
    if not isinstance(entry, dict) or "arch" not in entry:
        raise ConfigError(f"model {name!r} needs an 'arch'", path=p)
    unknown = set(entry) - _FIELDS
    if unknown:
        raise ConfigError(f"model {name!r} has unknown fields {sorted(unknown)}", path=p)
    weights = entry.get("checkpoint") or entry.get("weights")
    if weights is None:
        raise ConfigError(
            f"model {name!r} has no 'weights' or 'checkpoint'", path=p,
            hint="Random weights are only available as --model random:NAME.",
        )
    backend = str(entry.get("backend", "open_clip"))
    if backend not in BACKENDS:
        raise ConfigError(f"model {name!r}: unknown backend {backend!r} (use {' or '.join(BACKENDS)})", path=p)
    arch_config = _resolve_rel(entry.get("arch_config"), p.parent)
    pooling = str(entry.get("pooling", "cls"))
    if pooling not in ("cls", "cls+mean"):
        raise ConfigError(f"model {name!r}: pooling must be cls or cls+mean", path=p)
    output = str(entry.get("output", JOINT))
    if output not in ENTRY_OUTPUTS or (output != JOINT and backend != "conch"):
        raise ConfigError(f"model {name!r}: output must be joint, or pre-projection for the conch backend "
                          f"(not {output!r})", path=p)
    kwargs = entry.get("model_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"model {name!r}: model_kwargs must be a mapping", path=p)
    return ModelSpec(
        name=str(name),
        arch=str(entry["arch"]),
        weights=_resolve_rel(str(weights), p.parent),
        backend=backend,
        arch_config=arch_config,
        arch_cfg=read_arch_config(arch_config, name) if arch_config else None,
        image_mean=tuple(float(x) for x in entry["image_mean"]) if entry.get("image_mean") else None,
        image_std=tuple(float(x) for x in entry["image_std"]) if entry.get("image_std") else None,
        image_interpolation=entry.get("image_interpolation"),
        input_size=int(entry["input_size"]) if entry.get("input_size") else None,
        resize_size=int(entry["resize_size"]) if entry.get("resize_size") else None,
        training_mpp=float(entry["training_mpp"]) if entry.get("training_mpp") else None,
        licence=str(entry.get("licence", "")),
        gated=bool(entry.get("gated", False)),
        pooling=pooling,
        model_kwargs=dict(kwargs),
        hub_id=entry.get("hub_id") or (str(entry["weights"])[len("hf-hub:"):]
                                       if str(entry.get("weights", "")).startswith("hf-hub:") else None),
        weights_format=str(entry.get("weights_format", "open_clip")),
        tokenizer=_resolve_rel(entry.get("tokenizer"), p.parent),
        tokenizer_sha256=str(entry["tokenizer_sha256"]).lower() if entry.get("tokenizer_sha256") else None,
        description=str(entry.get("description", "")),
        output=output,
        tile_size=int(entry["tile_size"]) if entry.get("tile_size") else None,
        finetuned_from=str(entry["finetuned_from"]) if entry.get("finetuned_from") else None,
    )


def load_registry(*paths: str | Path) -> dict[str, ModelSpec]:
    """Read the default registry and any further registry files (later files win)."""
    specs: dict[str, ModelSpec] = {}
    for path in (DEFAULT_REGISTRY, *paths):
        p = Path(path)
        try:
            st = p.stat() if p.is_file() else None
        except OSError:
            st = None
        if st is None:
            raise ConfigError("model registry not found", path=p)
        data = copy.deepcopy(_parsed_registry(str(p.resolve()), st.st_mtime_ns, st.st_size))
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, dict):
            raise ConfigError("model registry needs a top-level 'models:' mapping", path=p)
        for name, entry in models.items():
            specs[str(name)] = _entry_spec(str(name), entry, p)
    return specs


@functools.lru_cache(maxsize=64)
def _parsed_registry(path: str, mtime_ns: int, size: int):
    """A registry file's YAML, parsed once per version of the file (the executor resolves the
    model for every slide; parsing the shipped registry is most of that)."""
    return read_yaml(Path(path), "model registry") or {}


def parse_random(name: str) -> tuple[str, int]:
    """``random:NAME[@seed=N]`` -> (NAME, N); the seed is 0 unless given."""
    rest = name[len(RANDOM_PREFIX):]
    m = _SEED_RE.match(rest)
    if m:
        return m["base"], int(m["seed"])
    if "@" in rest:
        raise ConfigError(f"cannot read model name {name!r}", hint="Write random:NAME or random:NAME@seed=N.")
    return rest, 0


def random_name(base: str, seed: int) -> str:
    """The canonical name of a random model (seed 0 is left out)."""
    return f"{RANDOM_PREFIX}{base}" + (f"@seed={seed}" if seed else "")


def _is_open_clip_arch(arch: str) -> bool:
    import open_clip

    return arch in open_clip.list_models()


def resolve_model(name: str, registry_files=(), checkpoint: str | Path | None = None) -> ModelSpec:
    """Turn a model name into a :class:`ModelSpec` (see the module docstring for the forms)."""
    registry = load_registry(*registry_files)
    ckpt = str(Path(checkpoint).expanduser().resolve()) if checkpoint else None
    if name.startswith(RANDOM_PREFIX):
        if ckpt:
            raise ConfigError(f"model {name!r} asks for random weights, but a checkpoint was given")
        base, seed = parse_random(name)
        if base in registry:
            return replace(registry[base], name=random_name(base, seed), weights=None, seed=seed)
        _check_arch(name, base)
        return ModelSpec(name=random_name(base, seed), arch=base, weights=None, seed=seed)
    if name in registry:
        spec = registry[name]
        if ckpt:
            spec = replace(spec, weights=ckpt)
        return spec
    if ckpt:
        _check_arch(name, name)
        return ModelSpec(name=name, arch=name, weights=ckpt)
    raise ConfigError(
        f"unknown model {name!r}",
        hint=(f"Known: {', '.join(sorted(registry))}. Or give an open_clip architecture with "
              "--checkpoint FILE, random:NAME for seeded random weights, or add it to a registry YAML "
              "passed with --models."),
    )


def _check_arch(name: str, arch: str) -> None:
    from slide_clip.encoders.arch_configs import check_open_clip_arch  # imports this module

    check_open_clip_arch(name, arch)


def spec_from_provenance(attrs: dict) -> ModelSpec | None:
    """The spec a store's embedding group was made with (None for stores that predate it)."""
    d = attrs.get("spec")
    if not isinstance(d, dict):
        return None
    return ModelSpec.from_dict({**d, "arch_config": None})


def made_as(attrs: dict, spec: ModelSpec) -> bool:
    """Whether a stored embedding group was made the way ``spec`` embeds tiles now (weights are
    compared by the caller): the same architecture and output, and, for open_clip hub weights
    of a registry architecture (QuiltNet), built into that architecture. Groups of those
    written before ``quick_gelu`` was recorded were built by open_clip's hub loading from the
    hub config's architecture, whatever ``arch`` they name, and are made again."""
    if attrs.get("arch") != spec.arch or output_of(attrs) != spec_output(spec):
        return False
    hub_into_registry_arch = (spec.backend == "open_clip" and spec.weights_kind == "hf-hub"
                              and spec.weights_format != "transformers" and not spec.arch.startswith("hf-hub:"))
    return not (hub_into_registry_arch and "quick_gelu" not in attrs)


def same_build(attrs: dict, encoder) -> bool:
    """Whether a loaded encoder embeds as the stored group's model did (weights are compared by
    the caller): :func:`made_as`, and the same activation where both record it."""
    recorded, built = attrs.get("quick_gelu"), encoder.extra.get("quick_gelu")
    return made_as(attrs, encoder.spec) and (recorded is None or built is None or recorded == built)


def describe_weights(spec: ModelSpec) -> str:
    """One short phrase for where the weights come from (``slide-clip models``)."""
    if spec.weights is None:
        return f"random (seed {spec.seed})"
    return spec.weights


def as_jsonable(value: Any) -> Any:
    """A value round-tripped through JSON (what a Zarr attribute will hold)."""
    return json.loads(json.dumps(value))
