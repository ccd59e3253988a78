"""CONCH: slide-clip's backend against CONCH's own code, the registry entry, the tokenizer,
the pre-projection features, and zero-shot scoring end to end.

CONCH's own code (github.com/mahmoodlab/CONCH, ``conch/open_clip_custom``) is the PyPI package
``conch-fork`` (dev extra): the full-size model is built by it with random weights and
compared with the port loaded from its checkpoint file. The scaled-down reference
(tests/assets/conch_tiny_reference.pt, made by tests/assets/make_conch_reference.py under the
transformers CONCH was released with) records CONCH's token ids; the same weights are also
run through CONCH's code here.
"""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
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
        "models:\n  conch-tiny: &tiny\n    backend: conch\n    arch: conch_tiny\n    arch_config: conch_tiny.json\n"
        f"    checkpoint: conch_tiny.bin\n    tokenizer: {TOKENIZER}\n    input_size: 64\n"
        f"    image_mean: {OPENAI_MEAN}\n    image_std: {OPENAI_STD}\n    image_interpolation: bicubic\n"
        "    training_mpp: 0.5\n    licence: test\n"
        "  conch-tiny-features:\n    <<: *tiny\n    output: pre-projection\n")
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


def test_text_without_tokenizer_is_one_clear_line(conch_tiny, tmp_path, monkeypatch):
    from dataclasses import replace

    # no CONCH package installed (the test environment has conch-fork, whose file would be found)
    monkeypatch.setitem(sys.modules, "conch", None)
    spec = replace(resolve_model("random:conch-tiny", [conch_tiny]), tokenizer=None)
    enc = load_encoder(spec, device="cpu")
    assert enc.encode_images(REF["pixels"]).shape == (3, REF["config"]["embed_dim"])  # images need none
    with pytest.raises(ConfigError) as e:
        enc.encode_texts(["tumour"])
    msg = str(e.value)
    assert "conch_byte_level_bpe_uncased.json" in msg and "conch-tiny" in msg and "\n" not in msg
    assert "tokenizer:" in e.value.hint
    # a tokenizer file the entry names but that is gone: that file is named, no other is taken
    gone = load_encoder(replace(spec, tokenizer=str(tmp_path / "moved.json")), device="cpu")
    with pytest.raises(ConfigError, match="names is not there") as e:
        gone.encode_texts(["tumour"])
    assert "moved.json" in str(e.value) and "\n" not in str(e.value)
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


# ----------------------------------------------------------------------------- CONCH's own code (conch-fork)
#: Prompts whose text holds the literal ``<pad>``: its id stands before <end_of_text>, where
#: CONCH's mask (padding masked in the class token's row only) and open_clip's (in every row)
#: differ.
PAD_PROMPTS = ["an H&E image of <pad> tumour tissue", "<pad> necrosis <pad> with debris"]


def _conch_coca(cfg: dict):
    """CONCH's ``CoCa`` (CONCH's code, from conch-fork) for a config in CONCH's own layout
    (``configs/archs/conch_ViT-B-16.json`` / the reference's), captioning parts included."""
    from conch.open_clip_custom.coca_model import CoCa

    v = dict(cfg["vision_cfg"])
    vision = {k: val for k, val in v.items() if k not in ("width", "heads", "layers")}
    vision.update(width=v.get("width", 768), num_heads=v.get("heads", 12), layers=v.get("layers", 12),
                  attentional_pool_contrast=True, attentional_pool_caption=True, output_tokens=True)
    return CoCa(embed_dim=cfg["embed_dim"], embed_dim_caption=cfg["embed_dim_caption"],
                multimodal_cfg=cfg["multimodal_cfg"], text_cfg={**cfg["text_cfg"], "output_tokens": True},
                vision_cfg=vision).eval()


def _pad_before_end(ids: torch.Tensor, pad_id: int = 0, end_id: int = 2) -> bool:
    """Whether every row has a <pad> id between <start_of_text> and <end_of_text>."""
    return all(bool((row[1:int((row == end_id).nonzero()[0])] == pad_id).any()) for row in ids)


def test_conch_code_reproduces_the_reference_and_the_pad_mask(conch_tiny):
    """The recorded reference's weights in CONCH's own code: its recorded outputs come back,
    prompts holding the literal text ``<pad>`` embed as CONCH embeds them (its class-token
    mask), and ``output: pre-projection`` gives CONCH's ``encode_image(proj_contrast=False,
    normalize=False)``."""
    theirs = _conch_coca(REF["config"])
    theirs.load_state_dict(REF["state_dict"], strict=True)
    with torch.no_grad():
        img = theirs.encode_image(REF["pixels"], normalize=True, proj_contrast=True)
        txt = theirs.encode_text(REF["ids"], normalize=True)
        pre = theirs.encode_image(REF["pixels"], normalize=False, proj_contrast=False).numpy()
    assert (img - REF["image_embeddings"]).abs().max() <= 1e-6 and (txt - REF["text_embeddings"]).abs().max() <= 1e-6
    spec = resolve_model("conch-tiny", [conch_tiny])
    enc = load_encoder(spec, device="cpu", precision="fp32")
    ids = enc.tokenizer(PAD_PROMPTS)
    assert _pad_before_end(ids)  # the literal text is CONCH's <pad> id, inside the text
    with torch.no_grad():
        ref = theirs.encode_text(ids, normalize=True).numpy()
    assert np.abs(enc.encode_texts(PAD_PROMPTS) - ref).max() <= 1e-6
    # the pre-projection features: the same weights, CONCH's features before the joint space
    feats = load_encoder(resolve_model("conch-tiny-features", [conch_tiny]), device="cpu", precision="fp32")
    got = feats.encode_images(REF["pixels"])
    assert feats.weights_sha256 == enc.weights_sha256 and got.shape == pre.shape == (3, REF["config"]["embed_dim"])
    assert np.abs(got - pre).max() <= 1e-6 * np.abs(pre).max()
    assert not np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-2)  # not normalised, as CONCH's
    p = feats.provenance()
    assert p["output"] == "pre-projection" and p["normalised"] is False and p["logit_scale"] is None
    assert enc.provenance()["output"] == "joint" and enc.provenance()["normalised"] is True
    with pytest.raises(ConfigError, match="pre-projection") as e:
        feats.encode_texts(["tumour"])
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def conch_full(tmp_path_factory):
    """CONCH's ``conch_ViT-B-16`` built by CONCH's code from CONCH's own config file, as its
    factory builds it, with seeded random weights (tensors left uninitialised by CoCa drawn,
    norms and biases moved off their 1 and 0), saved as a checkpoint file (captioning decoder
    included)."""
    from conch.open_clip_custom.coca_model import CoCa
    from conch.open_clip_custom.factory import CFG_DIR

    cfg = json.loads((CFG_DIR / "conch_ViT-B-16.json").read_text())
    cfg.pop("custom_text", None)  # what create_model does before CoCa(**model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        theirs = CoCa(**cfg).eval()
        with torch.no_grad():
            for p in theirs.parameters():
                if not torch.isfinite(p).all() or p.abs().max() > 1e3:
                    p.normal_(0, 0.02)
                elif p.ndim <= 1:
                    p.add_(0.01 * torch.randn_like(p))
            theirs.logit_scale.fill_(4.4)
    ckpt = tmp_path_factory.mktemp("conch_full") / "pytorch_model.bin"
    torch.save(theirs.state_dict(), ckpt)
    return theirs, ckpt


def test_full_size_port_equals_conch_code(conch_full):
    """slide-clip's CONCH, loaded from the checkpoint file of CONCH's own model (the path real
    weights take), at full size: pixels, image embeddings, token ids and text embeddings
    (prompts with ``<pad>`` among them), logit scale."""
    import transformers
    from conch.open_clip_custom import get_tokenizer, tokenize
    from conch.open_clip_custom.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from conch.open_clip_custom.transform import image_transform
    from packaging.version import Version
    from PIL import Image

    from slide_clip.encoders.conch import find_tokenizer

    theirs, ckpt = conch_full
    ours = load_encoder(resolve_model("conch", checkpoint=ckpt), device="cpu", precision="fp32")
    assert find_tokenizer(ours.spec).parent.parent.parent.name == "conch"  # conch-fork's file, sha256 checked
    # preprocessing of tiles of several sizes: CONCH's image_transform and ours
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in (448, 512, 300)]
    tf = image_transform(448, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    px = torch.stack([tf(Image.fromarray(t)) for t in tiles])
    assert torch.equal(torch.stack([ours.preprocess(Image.fromarray(t)) for t in tiles]), px)
    px = px[:1]  # one tile through the full-size towers (2-core CI: about 5 s a tower)
    with torch.no_grad():
        joint = theirs.encode_image(px, normalize=True, proj_contrast=True).numpy()
    assert np.abs(ours.encode_images(px) - joint).max() <= 1e-5
    # token ids: CONCH's tokenize() runs under transformers < 4.49 only (4.49-4.57 override the
    # file's add_prefix_space; 5.x removed batch_encode_plus): the branch taken is explicit
    prompts = ["an H&E image of tumor tissue.", *PAD_PROMPTS]
    ids = ours.tokenizer(prompts)
    assert ids.shape == (3, 128) and _pad_before_end(ids[1:])
    version = Version(transformers.__version__)
    if version < Version("4.49"):
        assert torch.equal(tokenize(get_tokenizer(), prompts), ids)  # CONCH's own function
    elif version >= Version("5"):
        # tokenize()'s own call, through the API 5.x kept (the one tokenizer file, same arguments)
        tok = get_tokenizer()
        enc = tok(prompts, max_length=127, add_special_tokens=True, return_token_type_ids=False,
                  truncation=True, padding="max_length", return_tensors="pt")
        assert torch.equal(torch.nn.functional.pad(enc["input_ids"], (0, 1), value=tok.pad_token_id), ids)
    else:
        warnings.warn(f"transformers {version}: CONCH's token ids not compared (this version tokenises a "
                      "text's first word differently from the one CONCH was released with); text embeddings "
                      "are compared from slide-clip's ids")
    with torch.no_grad():
        txt = theirs.encode_text(ids, normalize=True).numpy()
    assert np.abs(ours.encode_texts(prompts) - txt).max() <= 1e-5
    assert ours.logit_scale == pytest.approx(float(theirs.logit_scale.detach().exp()), rel=1e-6)


def test_conch_features_group_beside_the_joint_one(conch_tiny, make_slide, tmp_path):
    """One slide embedded with conch-tiny and conch-tiny-features: each group says what it holds,
    the features are the joint embeddings before the projection (the checkpoint's own
    proj_contrast maps one onto the other), zero-shot and text search refuse the features in
    one line, few-shot and tile search read them as cosines, and the commands name the group
    they read."""
    from typer.testing import CliRunner

    from slide_clip.cli import app
    from slide_clip.config import load_config
    from slide_clip.explore.retrieval import search
    from slide_clip.pipeline import embed_slide
    from slide_clip.prompts import load_prompts
    from slide_clip.scoring import fewshot, zeroshot
    from slide_clip.store import SlideStore

    slide, _ = make_slide("conch_small", width_um=500, height_um=400)
    out = tmp_path / "out"
    base = load_config().with_overrides(encode={"registries": (str(conch_tiny),), "device": "cpu", "num_workers": 0,
                                                "batch_size": 32})
    for name in ("conch-tiny", "conch-tiny-features"):
        r = embed_slide(slide, out, base.with_overrides(encode={"model": name}), progress=False)
        assert r.status == "ok", r.error
    st = SlideStore.open(r.store)
    joint_a, feat_a = st.embedding_attrs("conch-tiny"), st.embedding_attrs("conch-tiny-features")
    assert (joint_a["output"], joint_a["normalised"]) == ("joint", True)
    assert (feat_a["output"], feat_a["normalised"]) == ("pre-projection", False)
    assert feat_a["weights_sha256"] == joint_a["weights_sha256"] and feat_a["logit_scale"] is None
    joint, feats = st.embeddings("conch-tiny"), st.embeddings("conch-tiny-features")
    assert len(feats) > 50 and np.abs(np.linalg.norm(feats, axis=1) - 1).min() > 1e-2  # stored as CONCH gives them
    proj = REF["state_dict"]["visual.proj_contrast"].numpy().astype(np.float64)
    mapped = feats.astype(np.float64) @ proj
    assert np.abs(mapped / np.linalg.norm(mapped, axis=1, keepdims=True) - joint).max() <= 1e-5
    unit = st.embeddings("conch-tiny-features", unit=True)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-6) and np.allclose(unit * np.linalg.norm(
        feats, axis=1, keepdims=True), feats, atol=1e-5)

    cfg = base.with_overrides(encode={"model": "conch-tiny-features"})
    with pytest.raises(ConfigError, match="pre-projection image features, not the joint") as e:
        zeroshot([Path(r.store)], load_prompts("tumour"), cfg, model="conch-tiny-features")
    assert "\n" not in str(e.value) and "--model conch" in e.value.hint
    with pytest.raises(ConfigError, match="pre-projection") as e:
        search([out], cfg, texts=["tumour"], model="conch-tiny-features", gallery=False)
    assert "\n" not in str(e.value)
    # few-shot on the features: cosines with prototypes (logits within +-100)
    coords = st.coords()
    csv = tmp_path / "ex.csv"
    csv.write_text("slide,x,y,label\n" + "".join(f"{slide},{x},{y},{'a' if i % 2 else 'b'}\n"
                                                 for i, (x, y) in enumerate(coords[:4])))
    [res] = fewshot([Path(r.store)], csv, cfg, model="conch-tiny-features")
    assert res["status"] == "ok", res
    _, logits, _ = st.scores("conch-tiny-features", res["score_set"])
    assert np.abs(logits).max() <= 100 + 1e-3

    runner = CliRunner()
    x, y = (int(v) for v in coords[7])
    r2 = runner.invoke(app, ["search", str(out), "--tile", f"{st.slide['name']}:{x}:{y}", "--top", "3",
                             "--no-gallery", "--model", "conch-tiny-features"])
    assert r2.exit_code == 0, r2.output
    assert "embeddings: conch-tiny-features (pre-projection features, not normalised)" in r2.output
    hits = pd.read_csv(next((out / "explore" / "search").glob("*/hits.csv")))
    assert hits.iloc[0][["x", "y"]].tolist() == [x, y] and hits.iloc[0]["score"] == pytest.approx(1, abs=1e-5)
    r2 = runner.invoke(app, ["bags", str(out), "--model", "conch-tiny"])
    assert r2.exit_code == 0, r2.output
    assert "embeddings: conch-tiny (joint image-text space)" in r2.output
