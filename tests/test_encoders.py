"""The model registry and loading weights through open_clip's real loader."""

import numpy as np
import open_clip
import pytest
import torch

from slide_clip.encoders import file_sha256, load_encoder, load_registry, resolve_model
from slide_clip.errors import ConfigError, WeightsError


def test_default_registry_names_pathology_and_general_models():
    reg = load_registry()
    assert {"quiltnet-b-32", "quiltnet-b-16", "biomedclip", "openai-vit-b-32"} <= set(reg)
    assert reg["quiltnet-b-32"].weights == "hf-hub:wisdomik/QuiltNet-B-32"
    assert reg["openai-vit-b-32"].weights_kind == "pretrained"
    for spec in reg.values():
        assert not spec.random_weights


def test_checkpoint_file_is_really_loaded(tiny_encoder, tiny_checkpoint):
    saved = torch.load(tiny_checkpoint, weights_only=True)
    state = tiny_encoder.model.state_dict()
    assert set(saved) == set(state)
    for k, v in saved.items():
        assert torch.equal(v, state[k].cpu()), k
    prov = tiny_encoder.provenance()
    assert prov["random_weights"] is False
    assert prov["weights_kind"] == "file"
    assert prov["checkpoint_sha256"] == file_sha256(tiny_checkpoint)
    assert prov["embed_dim"] == 32
    assert prov["logit_scale"] == pytest.approx(float(saved["logit_scale"].exp()))


def test_embeddings_are_unit_norm_encode_image(tiny_encoder):
    x = torch.rand(3, 3, 224, 224)
    out = tiny_encoder.encode_images(x)
    assert out.shape == (3, 32) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        ref = tiny_encoder.model.encode_image(x)
        ref = (ref / ref.norm(dim=-1, keepdim=True)).numpy()
    assert np.abs(out - ref).max() < 1e-5


def test_random_weights_only_when_asked_and_recorded(tiny_registry):
    spec = resolve_model("random:slideclip-tiny-test", [tiny_registry])
    enc = load_encoder(spec, device="cpu")
    prov = enc.provenance()
    assert prov["random_weights"] is True and prov["weights_source"] == "random"


def test_bare_architecture_needs_a_checkpoint(tiny_checkpoint, tiny_registry):
    with pytest.raises(ConfigError, match="unknown model 'ViT-B-32'"):
        resolve_model("ViT-B-32")
    spec = resolve_model("slideclip-tiny-test", [tiny_registry], checkpoint=tiny_checkpoint)
    assert spec.weights == str(tiny_checkpoint)


def test_registry_model_with_local_checkpoint_override(tiny_checkpoint):
    spec = resolve_model("quiltnet-b-32", checkpoint=tiny_checkpoint)
    assert spec.arch == "ViT-B-32-quickgelu" and spec.weights == str(tiny_checkpoint)


def test_hub_weights_unreachable_says_which_model_where_and_what_to_do():
    # no hub is reachable here (conftest sets HF_HUB_OFFLINE so the failure is immediate)
    with pytest.raises(WeightsError) as e:
        load_encoder(resolve_model("quiltnet-b-32"), device="cpu")
    msg = str(e.value)
    assert "'quiltnet-b-32'" in msg and "wisdomik/QuiltNet-B-32" in msg and "--checkpoint" in msg
    assert "\n" not in msg


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(WeightsError, match="checkpoint file not found"):
        load_encoder(resolve_model("quiltnet-b-32", checkpoint=tmp_path / "nope.pt"), device="cpu")


def test_wrong_checkpoint_for_architecture(tiny_checkpoint, tiny_registry):
    # a tiny state dict loaded into ViT-B-32 must fail, never fall back to random weights
    spec = resolve_model("quiltnet-b-32", checkpoint=tiny_checkpoint)
    with pytest.raises(WeightsError, match="quiltnet-b-32"):
        load_encoder(spec, device="cpu")


def test_bad_registry_files(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("models:\n  x:\n    weights: hf-hub:a/b\n")
    with pytest.raises(ConfigError, match="needs an 'arch'"):
        load_registry(p)
    p.write_text("models:\n  x:\n    arch: ViT-B-32\n")
    with pytest.raises(ConfigError, match="no 'weights'"):
        load_registry(p)


def test_tiny_architecture_is_registered_with_open_clip(tiny_encoder):
    assert "slideclip-tiny-test" in open_clip.list_models()
