"""The open_clip backend: vision-language models (CLIP, CoCa) built by open_clip's factory.

Every local build (random weights, a checkpoint file) starts from an architecture config
*dict*: open_clip's own for a built-in architecture, the contents of the registry's
``arch_config`` file, the ``open_clip_config.json`` of an ``hf-hub:`` architecture when it
is in the local Hugging Face cache, or the copy recorded in a store. A checkpoint file is
then loaded into that architecture strictly (every key must fit): open_clip itself ignores
``pretrained=`` for ``hf-hub:`` architectures, which would load the hub's weights instead.

Which architecture is built (:func:`build`):

- the registry's ``arch`` for random weights, a file, and hub weights of an entry whose
  ``arch`` is an open_clip architecture (QuiltNet): the hub's weights file is downloaded and
  loaded like a local file, so the same weights give the same model however they arrive
  (open_clip's own hub loading would build the hub config's architecture instead, and
  QuiltNet-B-32's hub config leaves out the QuickGELU its OpenAI starting point needs);
- the hub's ``open_clip_config.json`` for an ``hf-hub:`` architecture (BiomedCLIP), also for a
  local file once that config is cached or given as ``arch_config``;
- open_clip's config of the architecture for a ``pretrained:TAG`` (the registry names the
  ``-quickgelu`` architecture where the tag's weights were trained with QuickGELU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import threading
from pathlib import Path

import torch

from slide_clip.encoders.arch_configs import hub_repo as _hub_repo
from slide_clip.encoders.arch_configs import open_clip_full_config as full_config
from slide_clip.encoders.spec import ModelSpec
from slide_clip.encoders.weights import file_sha256, load_into, read_state_dict, seeded
from slide_clip.errors import ConfigError, WeightsError

_lock = threading.Lock()
_config_dir: Path | None = None


def _local_name(spec: ModelSpec) -> str:
    repo = _hub_repo(spec.arch)
    return "slideclip-hub-" + re.sub(r"[^A-Za-z0-9_.-]+", "--", repo) if repo else spec.arch


def register(spec: ModelSpec, model_cfg: dict) -> str:
    """Make ``model_cfg`` known to open_clip; returns the name to build it by."""
    import open_clip

    name = _local_name(spec)
    with _lock:
        if open_clip.get_model_config(name) == model_cfg:
            return name
        if spec.arch_config and Path(spec.arch_config).stem == name and spec.arch_cfg == model_cfg:
            open_clip.add_model_config(Path(spec.arch_config))
        else:
            global _config_dir
            if _config_dir is None:
                _config_dir = Path(tempfile.mkdtemp(prefix="slide-clip-archs-"))
            p = _config_dir / f"{name}.json"
            p.write_text(json.dumps(model_cfg))
            open_clip.add_model_config(p)
    return name


def _check_arch_config_name(spec: ModelSpec) -> None:
    if spec.arch_config and not _hub_repo(spec.arch) and Path(spec.arch_config).stem != spec.arch:
        raise ConfigError(
            f"model {spec.name!r}: arch {spec.arch!r} must match its config file's name "
            f"{Path(spec.arch_config).stem!r}", path=spec.arch_config)


def _preprocess_kwargs(spec: ModelSpec, preprocess_cfg: dict) -> dict:
    kw = {}
    mean = spec.image_mean or preprocess_cfg.get("mean")
    std = spec.image_std or preprocess_cfg.get("std")
    interp = spec.image_interpolation or preprocess_cfg.get("interpolation")
    if mean:
        kw["image_mean"] = tuple(mean)
    if std:
        kw["image_std"] = tuple(std)
    if interp:
        kw["image_interpolation"] = interp
    if preprocess_cfg.get("resize_mode"):
        kw["image_resize_mode"] = preprocess_cfg["resize_mode"]
    return kw


def _weights_error(spec: ModelSpec, err: Exception) -> WeightsError:
    where = {
        "hf-hub": f"the Hugging Face hub repository {(spec.weights or '')[len('hf-hub:'):]}",
        "pretrained": f"open_clip's download for pretrained tag {(spec.weights or '')[len('pretrained:'):]!r}",
        "file": f"the file {spec.weights}",
        "random": "random initialisation",
    }[spec.weights_kind]
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    gated = " (gated: accept its licence on the hub, then download)" if spec.gated else ""
    return WeightsError(
        f"model {spec.name!r} ({spec.arch}): cannot get weights from {where}{gated} ({reason})",
        hint=("Download the weights on a machine with network access and point at the file: "
              "--checkpoint FILE, or 'checkpoint: FILE' in a registry YAML passed with --models."),
    )


def build(spec: ModelSpec):
    """Build ``spec``'s model with its weights; returns (model, preprocess, preprocess_cfg,
    arch_cfg, checkpoint_sha256). ``arch_cfg`` is what was built (recorded in stores)."""
    import open_clip

    _check_arch_config_name(spec)
    cfg = full_config(spec)
    kind = spec.weights_kind
    checkpoint_sha = None
    hub_file = None
    # hub weights of a registry architecture (PLIP's transformers checkpoint, QuiltNet): loaded
    # like a local file into that architecture, whichever way the weights arrive
    hub_into_registry_arch = kind == "hf-hub" and (spec.weights_format == "transformers" or not _hub_repo(spec.arch))
    if kind in ("hf-hub", "pretrained") and spec.arch_cfg is None and not hub_into_registry_arch:
        return _build_from_network(spec, cfg)
    if cfg is None:
        repo = _hub_repo(spec.arch)
        if repo:
            raise WeightsError(
                f"model {spec.name!r}: its architecture config is on the hub ({repo}) and not in the local "
                "cache, so the architecture cannot be built offline",
                hint=(f"Download open_clip_config.json of {repo} and name it as 'arch_config' of the entry in a "
                      "registry YAML passed with --models (or run once with network access)."))
        raise ConfigError(
            f"model {spec.name!r}: open_clip has no architecture {spec.arch!r}",
            hint="See open_clip.list_models(), or give an 'arch_config' JSON in the registry.")
    if hub_into_registry_arch:
        hub_file = (_download_transformers_weights(spec) if spec.weights_format == "transformers"
                    else _download_open_clip_weights(spec))
    name = register(spec, cfg["model_cfg"])
    kwargs = _preprocess_kwargs(spec, cfg["preprocess_cfg"])
    state = None
    if kind == "file" or hub_file:
        path = hub_file or spec.weights
        state = read_state_dict(path, spec.name)
        checkpoint_sha = file_sha256(path)
    elif kind != "random":  # hub/pretrained weights with an explicit arch config
        return _build_from_network(spec, cfg)
    try:
        with seeded(spec.seed or 0), _no_random_init_warning():
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None, pretrained_text=False, **kwargs)
    except (ConfigError, WeightsError):
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a text tower whose HF config is not cached
        raise _weights_error(spec, e) from None
    if state is not None:
        _load_open_clip_state(model, state, spec)
    return model, preprocess, _preprocess_cfg(model), _jsonable(cfg), checkpoint_sha


class _RandomInitWarning(logging.Filter):
    """open_clip's "No pretrained weights loaded ... initialized randomly": said of every model
    built here before its checkpoint is loaded into it, so it would call trained weights random
    on a console where logging is on (Prefect's, in ``run``). Whether weights are random is
    said by the store and the pictures (``random:`` names), not by this line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _no_random_init_warning():
    root, quiet = logging.getLogger(), _RandomInitWarning()
    root.addFilter(quiet)  # open_clip logs it with logging.warning(), on the root logger
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _download_transformers_weights(spec: ModelSpec) -> str:
    """The weights file of a transformers-format hub repository (downloaded or cached)."""
    from huggingface_hub import hf_hub_download

    repo = spec.weights[len("hf-hub:"):]
    last: Exception | None = None
    for fname in ("model.safetensors", "pytorch_model.bin"):
        try:
            return hf_hub_download(repo, fname)
        except Exception as e:  # noqa: BLE001 - try the next name, then report
            last = e
    raise _weights_error(spec, last or RuntimeError("no weights file"))


def _download_open_clip_weights(spec: ModelSpec) -> str:
    """The open_clip weights file of a hub repository (downloaded or cached), as open_clip's own
    hub loading finds it (``open_clip_model.safetensors``, else ``open_clip_pytorch_model.bin``)."""
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        return download_pretrained_from_hf(spec.weights[len("hf-hub:"):])
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: one line
        raise _weights_error(spec, e) from None


def _build_from_network(spec: ModelSpec, cfg: dict | None):
    import open_clip

    kwargs = _preprocess_kwargs(spec, (cfg or {}).get("preprocess_cfg", {}))
    kwargs["require_pretrained"] = True  # never fall back to random weights when a download fails
    repo = _hub_repo(spec.arch)
    try:
        if spec.weights_kind == "hf-hub":
            name = spec.arch if repo and spec.arch == spec.weights else spec.weights
            model, _, preprocess = open_clip.create_model_and_transforms(name, **kwargs)
        else:
            if not repo and spec.arch not in open_clip.list_models():
                raise ConfigError(f"model {spec.name!r}: open_clip has no architecture {spec.arch!r}",
                                  hint="See open_clip.list_models(), or give an 'arch_config' JSON in the registry.")
            tag = spec.weights[len("pretrained:"):]
            model, _, preprocess = open_clip.create_model_and_transforms(spec.arch, pretrained=tag, **kwargs)
    except (ConfigError, WeightsError):
        raise
    except Exception as e:  # noqa: BLE001 - network, hub, format errors all end here
        raise _weights_error(spec, e) from None
    built = full_config(spec) or cfg
    return model, preprocess, _preprocess_cfg(model), _jsonable(built) if built else None, None


def _load_open_clip_state(model, state: dict, spec: ModelSpec) -> None:
    """open_clip's checkpoint conversions, then a strict load."""
    from open_clip.factory import convert_state_dict, convert_to_custom_text_state_dict

    from slide_clip.encoders.hf_clip import hf_clip_to_open_clip, is_hf_clip

    if is_hf_clip(state):  # a transformers CLIPModel checkpoint (PLIP): same tensors, open_clip names
        state = hf_clip_to_open_clip(state)
    try:
        state = convert_state_dict(model, state)
    except Exception:  # noqa: BLE001 - not a third-party format: keep as is
        pass
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in state and isinstance(own, torch.Tensor) and own.ndim != state[key].ndim:
            state[key] = state[key].reshape(own.shape)
    pos_ids = "text.transformer.embeddings.position_ids"
    if pos_ids in state and pos_ids not in model.state_dict():
        del state[pos_ids]
    load_into(model, state, spec.name, spec.weights)


def _preprocess_cfg(model) -> dict:
    import open_clip

    try:
        cfg = dict(open_clip.get_model_preprocess_cfg(model))
    except Exception:  # noqa: BLE001
        cfg = {}
    return _jsonable(cfg)


def _jsonable(v):
    return json.loads(json.dumps(v, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def tokenizer_for(spec: ModelSpec, arch_cfg: dict | None):
    """The model's tokenizer (open_clip's, from its text config)."""
    import open_clip

    if arch_cfg is not None:
        name = register(spec, arch_cfg["model_cfg"] if "model_cfg" in arch_cfg else arch_cfg)
        return open_clip.get_tokenizer(name)
    return open_clip.get_tokenizer(spec.arch)


def uses_quick_gelu(model) -> bool:
    """Whether the built model's transformers use QuickGELU (read from the model itself)."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


def image_size_of(model) -> tuple[int, int]:
    size = getattr(model.visual, "image_size", 224)
    return tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))


def embed_dim_of(model, size, dev) -> int:
    dim = getattr(model.visual, "output_dim", None)
    if isinstance(dim, int):
        return dim
    with torch.inference_mode():
        return int(model.encode_image(torch.zeros(1, 3, *size, device=dev)).shape[-1])
