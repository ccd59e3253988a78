"""CONCH: slide-clip's backend against outputs recorded from CONCH's own code, the registry
entry, the tokenizer, and zero-shot scoring end to end.

The reference (tests/assets/conch_tiny_reference.pt) was made by CONCH's implementation
(github.com/mahmoodlab/CONCH, ``conch/open_clip_custom``) on a scaled-down model of the same
architecture with random weights, by tests/assets/make_conch_reference.py; CONCH's package
is not on the package registries. The full-size comparison with CONCH's tokenizer is
benchmarks/verify_conch.py.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slide_clip.encoders import file_sha256, load_encoder, load_registry, model_input_size, resolve_model
from slide_clip.errors import ConfigError, WeightsError

ASSETS = Path(__file__).parent / "assets"
REF = torch.load(ASSETS / "conch_tiny_reference.pt", weights_only=False)
TOKENIZER = ASSETS / "conch_tiny_tokenizer.json"
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def conch_tiny(tmp_path_factory):
    """A registry with a scaled-down CONCH whose weights are the reference's checkpoint file."""
    d = tmp_path_factory.mktemp("conch")
    torch.save(REF["state_dict"], d / "conch_tiny.bin")  # CONCH's state dict, captioning decoder included
    (d / "conch_tiny.json").write_text(json.dumps(REF["config"]))
    reg = d / "models.yaml"
    reg.write_text(
        "models:\n  conch-tiny:\n    backend: conch\n    arch: conch_tiny\n    arch_config: conch_tiny.json\n"
        f"    checkpoint: conch_tiny.bin\n    tokenizer: {TOKENIZER}\n    input_size: 64\n"
        f"    image_mean: {OPENAI_MEAN}\n    image_std: {OPENAI_STD}\n    image_interpolation: bicubic\n"
        "    training_mpp: 0.5\n    licence: test\n")
    return reg


def test_conch_equals_conch_own_implementation(conch_tiny):
    from PIL import Image

    spec = resolve_model("conch-tiny", [conch_tiny])
    enc = load_encoder(spec, device="cpu", precision="fp32")
    assert enc.supports_text and enc.embed_dim == REF["config"]["embed_dim"]
    # preprocessing: CONCH's Resize(bicubic) / CenterCrop / ToTensor / Normalize(OpenAI)
    images = REF["images"].numpy()
    pixels = torch.stack([enc.preprocess(Image.fromarray(im)) for im in images])
    assert torch.equal(pixels, REF["pixels"])
    # image embeddings: CONCH's encode_image(proj_contrast=True, normalize=True)
    out = enc.encode_images(REF["pixels"])
    assert np.abs(out - REF["image_embeddings"].numpy()).max() <= 1e-6
    # the uint8 path (normalised on the device) gives the same numbers
    norm = enc.pixel_norm(64)
    assert norm is not None and norm.mean == tuple(OPENAI_MEAN)
    assert np.array_equal(enc.encode_uint8(torch.from_numpy(images), norm), out)
    # token ids: CONCH's tokenize (its 128 ids) and the same call at the tiny context length
    from slide_clip.encoders.conch import ConchTokenizer

    assert torch.equal(ConchTokenizer(TOKENIZER, 128)(REF["texts"]), REF["ids128"])
    assert torch.equal(enc.tokenizer(REF["texts"]), REF["ids"])
    # text embeddings (CONCH's encode_text, normalised) and the learned temperature
    assert np.abs(enc.encode_texts(REF["texts"]) - REF["text_embeddings"].numpy()).max() <= 1e-6
    assert enc.logit_scale == pytest.approx(REF["logit_scale"], rel=1e-6)
    p = enc.provenance()
    assert p["backend"] == "conch" and p["vision_only"] is False and p["checkpoint_sha256"]
    assert p["spec"]["tokenizer"] == str(TOKENIZER)


def test_captioning_parts_dropped_everything_else_strict(conch_tiny, tmp_path):
    state = dict(REF["state_dict"])
    assert any(k.startswith("text_decoder.") for k in state) and "visual.attn_pool_caption.query" in state
    del state["visual.proj_contrast"]  # a part the embeddings need: refused, never half-loaded
    bad = tmp_path / "bad.bin"
    torch.save(state, bad)
    with pytest.raises(WeightsError, match="does not fit") as e:
        load_encoder(resolve_model("conch-tiny", [conch_tiny], checkpoint=bad), device="cpu")
    assert "proj_contrast" in str(e.value)


def test_random_conch_seeded_and_checkpoint_round_trip(conch_tiny, tmp_path):
    spec = resolve_model("random:conch-tiny@seed=3", [conch_tiny])
    a, b = load_encoder(spec, device="cpu"), load_encoder(spec, device="cpu")
    assert a.weights_sha256 == b.weights_sha256 and a.provenance()["random_weights"] is True
    assert a.weights_sha256 != load_encoder(resolve_model("random:conch-tiny", [conch_tiny]), device="cpu").weights_sha256
    ckpt = tmp_path / "w.pt"
    torch.save(a.model.state_dict(), ckpt)
    c = load_encoder(resolve_model("conch-tiny", [conch_tiny], checkpoint=ckpt), device="cpu")
    assert c.weights_sha256 == a.weights_sha256 and c.checkpoint_sha256 == file_sha256(ckpt)
    assert np.array_equal(c.encode_images(REF["pixels"]), a.encode_images(REF["pixels"]))
    assert np.array_equal(c.encode_texts(["tumour"]), a.encode_texts(["tumour"]))


def test_registry_entry_is_conch_at_full_size():
    spec = load_registry()["conch"]
    assert spec.backend == "conch" and not spec.vision_only and model_input_size(spec) == 448
    assert list(spec.image_mean) == OPENAI_MEAN and list(spec.image_std) == OPENAI_STD
    assert spec.image_interpolation == "bicubic" and spec.gated and spec.weights == "hf-hub:MahmoodLab/CONCH"
    import timm

    from slide_clip.encoders.conch import Conch

    with torch.device("meta"):
        m = Conch(spec.arch_cfg)
        # the trunk is timm's ViT-B/16 (built here through timm's own registry) at 448 px
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=448)
    ours = {k: tuple(v.shape) for k, v in m.visual.trunk.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    sd = m.state_dict()
    # CONCH's text tower: 32007-id vocabulary, 127 text positions + the class token, 768 wide, 512-d
    assert tuple(sd["text.token_embedding.weight"].shape) == (32007, 768)
    assert tuple(sd["text.positional_embedding"].shape) == (128, 768)
    assert tuple(sd["text.text_projection"].shape) == (768, 512) and tuple(sd["visual.proj_contrast"].shape) == (512, 512)
    assert tuple(sd["visual.attn_pool_contrast.query"].shape) == (1, 512)


def test_text_without_tokenizer_is_one_clear_line(conch_tiny, tmp_path):
    from dataclasses import replace

    spec = replace(resolve_model("random:conch-tiny", [conch_tiny]), tokenizer=None)
    enc = load_encoder(spec, device="cpu")
    assert enc.encode_images(REF["pixels"]).shape == (3, REF["config"]["embed_dim"])  # images need none
    with pytest.raises(ConfigError) as e:
        enc.encode_texts(["tumour"])
    msg = str(e.value)
    assert "conch_byte_level_bpe_uncased.json" in msg and "conch-tiny" in msg and "\n" not in msg
    assert "tokenizer:" in e.value.hint
    # the file beside the checkpoint is found
    ckpt = tmp_path / "w.pt"
    torch.save(enc.model.state_dict(), ckpt)
    (tmp_path / "conch_byte_level_bpe_uncased.json").write_bytes(TOKENIZER.read_bytes())
    found = load_encoder(replace(spec, weights=str(ckpt)), device="cpu")
    assert found.encode_texts(["tumour"]).shape == (1, REF["config"]["embed_dim"])
    # a tokenizer file that is not the one the entry names by sha256 is refused, in one line
    wrong = load_encoder(replace(spec, weights=str(ckpt), tokenizer_sha256="0" * 64), device="cpu")
    with pytest.raises(ConfigError, match="not CONCH's") as e:
        wrong.encode_texts(["tumour"])
    assert "\n" not in str(e.value) and "conch_byte_level_bpe_uncased.json" in str(e.value)
    assert load_registry()["conch"].tokenizer_sha256 == (
        "a3861e67c64d32670eb6725a8e52d7dbdd2a06646a4a3c7463052ae7110760fb")  # CONCH's file at commit 141cc09


def test_hub_offline_names_model_hub_id_and_checkpoint():
    with pytest.raises(WeightsError) as e:
        load_encoder(resolve_model("conch"), device="cpu")
    msg = str(e.value)
    assert "'conch'" in msg and "MahmoodLab/CONCH" in msg and "--checkpoint" in msg and "gated" in msg
    assert "\n" not in msg


def test_conch_store_zero_shot_end_to_end(conch_tiny, make_slide, tmp_path):
    """Embed a real slide with CONCH through the registry, score it zero-shot with prompts that
    are the reference's texts: the probabilities are softmax(logit_scale x cosine) with CONCH's
    own text embeddings and temperature."""
    from slide_clip.config import load_config
    from slide_clip.pipeline import embed_slide
    from slide_clip.prompts import load_prompts
    from slide_clip.scoring import zeroshot
    from slide_clip.store import SlideStore

    prompts = tmp_path / "two.yaml"
    prompts.write_text(f"name: two\ntemplates: ['{{}}']\nclasses:\n  - {{name: a, synonyms: [{json.dumps(REF['texts'][0])}]}}\n"
                       f"  - {{name: b, synonyms: [{json.dumps(REF['texts'][1])}]}}\n")
    slide, _ = make_slide("conch_small", width_um=500, height_um=400)
    cfg = load_config().with_overrides(encode={"model": "conch-tiny", "registries": (str(conch_tiny),),
                                               "device": "cpu", "num_workers": 0, "batch_size": 32})
    r = embed_slide(slide, tmp_path / "out", cfg, progress=False)
    st = SlideStore.open(r.store)
    a = st.embedding_attrs("conch-tiny")
    assert a["backend"] == "conch" and a["vision_only"] is False and a["image_size"] == [64, 64]
    [summary] = zeroshot([Path(r.store)], load_prompts(prompts), cfg)
    assert summary["status"] == "ok"
    probs, _, attrs = st.scores("conch-tiny", "two")
    feats = st.embeddings("conch-tiny").astype(np.float64)
    txt = REF["text_embeddings"].numpy()[:2].astype(np.float64)
    logits = REF["logit_scale"] * feats @ txt.T
    ref = np.exp(logits - logits.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    assert len(probs) == len(feats) > 50 and np.abs(probs - ref).max() <= 1e-4
    assert attrs["logit_scale"] == pytest.approx(REF["logit_scale"], rel=1e-6)
