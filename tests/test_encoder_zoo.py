"""The model zoo: every registry entry's configuration, each backend's shapes, preprocessing
and checkpoint round trip (offline, random weights), PLIP's conversion against transformers,
and vision-only models refusing text."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from slide_clip.encoders import file_sha256, load_encoder, load_registry, model_input_size, resolve_model
from slide_clip.errors import ConfigError, WeightsError

REG = load_registry()
TIMM = [n for n, s in REG.items() if s.backend == "timm"]

#: Published sizes (parameters, millions, and feature width) of the full architectures.
FULL = {"uni": (303.4, 1024, 1), "uni2-h": (681.4, 1536, 9), "virchow2": (631.2, 1280, 5),
        "h-optimus-0": (1134.8, 1536, 5), "h-optimus-1": (1134.8, 1536, 5), "prov-gigapath": (1135.0, 1536, 1)}
EMBED = {"uni": 1024, "uni2-h": 1536, "virchow2": 2560, "h-optimus-0": 1536, "h-optimus-1": 1536,
         "prov-gigapath": 1536}


def test_registry_names_the_zoo_with_card_facts():
    for name in ("plip", "uni", "uni2-h", "virchow2", "h-optimus-0", "h-optimus-1", "prov-gigapath", "phikon-v2"):
        s = REG[name]
        assert model_input_size(s) == 224 and s.licence and s.image_mean and s.image_std and s.image_interpolation
    assert REG["h-optimus-0"].image_mean == (0.707223, 0.578729, 0.703617)
    assert REG["virchow2"].pooling == "cls+mean" and REG["prov-gigapath"].resize_size == 256
    assert all(REG[n].gated for n in ("uni", "uni2-h", "virchow2", "prov-gigapath"))
    assert REG["plip"].backend == "open_clip" and not REG["plip"].vision_only
    assert all(REG[n].vision_only for n in TIMM + ["phikon-v2"])


def test_open_clip_entries_build_their_weights_activation_and_preprocessing():
    """Every open_clip entry whose weights are an open_clip pretrained tag, or were fine-tuned from
    one (``finetuned_from``), builds that tag's activation (open_clip's pretrained config for the
    tag: ``quick_gelu``) and preprocesses as the tag does, on every path (the tag's own download,
    a --checkpoint file, random:NAME: all build the entry's architecture config)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.pretrained import get_pretrained_cfg

    from slide_clip.encoders.arch_configs import open_clip_full_config

    checked, without_tag = set(), set()
    for name, spec in REG.items():
        if spec.backend != "open_clip":
            continue
        source = spec.weights if spec.weights.startswith("pretrained:") else spec.finetuned_from
        if source is None:
            without_tag.add(name)
            continue
        tag = source[len("pretrained:"):]
        tag_cfg = get_pretrained_cfg(spec.arch, tag)
        assert tag_cfg, f"{name}: open_clip has no pretrained tag {tag!r} for {spec.arch}"
        cfg = open_clip_full_config(spec)
        assert cfg["model_cfg"].get("quick_gelu", False) == tag_cfg.get("quick_gelu", False), name
        pre = cfg["preprocess_cfg"]
        assert tuple(spec.image_mean or pre.get("mean") or OPENAI_DATASET_MEAN) == tuple(tag_cfg["mean"]), name
        assert tuple(spec.image_std or pre.get("std") or OPENAI_DATASET_STD) == tuple(tag_cfg["std"]), name
        assert (spec.image_interpolation or pre.get("interpolation") or "bicubic") == tag_cfg["interpolation"], name
        checked.add(name)
    assert checked == {"openai-vit-b-32", "openai-vit-b-16", "quiltnet-b-32", "plip"}
    # BiomedCLIP's architecture is its hub config; QuiltNet-B-16's starting weights are not stated
    # where this could be checked (docs/ARCHITECTURE.md): a new entry must say where its weights come from
    assert without_tag == {"biomedclip", "quiltnet-b-16"}
    assert REG["openai-vit-b-16"].arch == "ViT-B-16-quickgelu"


@pytest.mark.parametrize("name", TIMM)
def test_full_size_architectures_match_the_published_sizes(name):
    """Every timm entry built at full size on the meta device (no memory, no weights)."""
    import timm

    from slide_clip.encoders.timm_backend import timm_kwargs

    spec = REG[name]
    with torch.device("meta"):
        m = timm.create_model(spec.arch, pretrained=False, **timm_kwargs(spec))
    params, width, prefix = FULL[name]
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == params
    assert m.num_features == width and m.num_prefix_tokens == prefix


def _small(spec, **kw):
    """The entry with one transformer block (its width, heads, tokens and preprocessing kept)."""
    if spec.backend == "transformers":
        return replace(spec, arch_cfg={**spec.arch_cfg, "num_hidden_layers": 1}, **kw)
    return replace(spec, model_kwargs={**spec.model_kwargs, "depth": 1}, **kw)


def _tiles(n=3, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("name", [*TIMM, "phikon-v2"])
def test_vision_only_backend_random_then_checkpoint_round_trip(name, tmp_path):
    spec = _small(resolve_model(f"random:{name}"))
    enc = load_encoder(spec, device="cpu")
    again = load_encoder(spec, device="cpu")
    assert enc.weights_sha256 == again.weights_sha256  # seeded
    pixels = torch.stack([enc.preprocess(t) for t in _tiles()])
    assert pixels.shape == (3, 3, 224, 224)
    out = enc.encode_images(pixels)
    assert out.shape == (3, EMBED.get(name, 1024)) == (3, enc.embed_dim) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    # preprocessing constants are the entry's: check the transform's own Normalize and Resize
    from torchvision import transforms as T

    steps = {type(t): t for t in enc.preprocess.transforms}
    assert tuple(steps[T.Normalize].mean) == REG[name].image_mean and tuple(steps[T.Normalize].std) == REG[name].image_std
    assert steps[T.Resize].size == (REG[name].resize_size or 224) and steps[T.CenterCrop].size == (224, 224)
    assert steps[T.Resize].interpolation == T.InterpolationMode(REG[name].image_interpolation)
    # independent computation of the same tiles: normalise by hand with numpy
    raw = np.stack([np.asarray(t, np.float32) / 255 for t in _tiles()])
    if not REG[name].resize_size:
        ref = (raw - np.array(REG[name].image_mean, np.float32)) / np.array(REG[name].image_std, np.float32)
        assert np.abs(pixels.permute(0, 2, 3, 1).numpy() - ref).max() < 1e-5
    if name == "virchow2":  # class token + mean patch token (registers left out), by hand
        with torch.no_grad():
            tok = enc.model.forward_features(pixels).numpy()
        ref = np.concatenate([tok[:, 0], tok[:, 5:].mean(axis=1)], axis=1)
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        assert np.abs(out - ref).max() < 1e-5
    # a checkpoint file of these weights, loaded through the path real weights take
    ckpt = tmp_path / "weights.pt"
    torch.save(enc.model.state_dict(), ckpt)
    loaded = load_encoder(_small(resolve_model(name, checkpoint=ckpt)), device="cpu")
    assert loaded.weights_sha256 == enc.weights_sha256 and loaded.checkpoint_sha256 == file_sha256(ckpt)
    assert np.array_equal(loaded.encode_images(pixels), out)
    p = loaded.provenance()
    assert p["vision_only"] is True and p["logit_scale"] is None and p["backend"] == REG[name].backend
    assert p["preprocess"]["mean"] == list(REG[name].image_mean)
    with pytest.raises(ConfigError, match="vision-only") as e:
        loaded.encode_texts(["tumour"])
    assert name in str(e.value) and "\n" not in str(e.value)
    # a checkpoint of another model refuses, never half-loads
    other = tmp_path / "other.pt"
    torch.save({"x": torch.zeros(1)}, other)
    with pytest.raises(WeightsError, match="does not fit"):
        load_encoder(_small(resolve_model(name, checkpoint=other)), device="cpu")


@pytest.mark.parametrize("name", ["uni", "virchow2", "phikon-v2"])
def test_hub_models_offline_name_model_hub_id_and_checkpoint(name):
    with pytest.raises(WeightsError) as e:
        load_encoder(resolve_model(name), device="cpu")
    msg = str(e.value)
    repo = REG[name].weights[len("hf-hub:"):]
    assert f"'{name}'" in msg and repo in msg and "--checkpoint" in msg and "\n" not in msg
    if REG[name].gated:
        assert "gated" in msg


def test_plip_conversion_equals_transformers_clip(tmp_path):
    """PLIP's architecture (transformers CLIPModel at ViT-B/32 size) with random weights, saved as
    a transformers checkpoint and loaded through the registry: same image and text embeddings."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig()  # the ViT-B/32 layout PLIP uses: 224 px, patch 32, 512-d projection, quick_gelu
    assert cfg.vision_config.hidden_act == "quick_gelu" and cfg.projection_dim == 512
    hf = CLIPModel(cfg).eval()
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(ckpt))
    enc = load_encoder(resolve_model("plip", checkpoint=ckpt), device="cpu")
    pixels = torch.stack([enc.preprocess(t) for t in _tiles(2)])
    texts = ["an H&E image of tumor tissue.", "normal tissue"]
    tokens = enc.tokenizer(texts)
    with torch.no_grad():
        ref_img = hf.get_image_features(pixel_values=pixels)
        ref_txt = hf.get_text_features(input_ids=tokens)
    ref_img = getattr(ref_img, "pooler_output", ref_img)
    ref_txt = getattr(ref_txt, "pooler_output", ref_txt)
    ref_img = torch.nn.functional.normalize(ref_img, dim=-1).numpy()
    ref_txt = torch.nn.functional.normalize(ref_txt, dim=-1).numpy()
    assert np.abs(enc.encode_images(pixels) - ref_img).max() < 1e-4
    assert np.abs(enc.encode_texts(texts) - ref_txt).max() < 1e-4
    assert enc.logit_scale == pytest.approx(float(hf.logit_scale.detach().exp()))
    assert tuple(enc.provenance()["preprocess"]["mean"]) == REG["plip"].image_mean


def test_vision_only_store_refuses_zeroshot_in_one_line_and_fewshot_works(make_slide, tmp_path):
    from slide_clip.config import load_config
    from slide_clip.pipeline import embed_slide
    from slide_clip.prompts import load_prompts
    from slide_clip.scoring import fewshot, zeroshot
    from slide_clip.store import SlideStore

    import timm

    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1)
    torch.save(m.state_dict(), tmp_path / "vit.pt")
    reg = tmp_path / "models.yaml"
    reg.write_text("models:\n  tiny-vision:\n    backend: timm\n    arch: vit_tiny_patch16_224\n"
                   "    model_kwargs: {depth: 1}\n    checkpoint: vit.pt\n    licence: test\n")
    slide, _ = make_slide("zoo_small", width_um=600, height_um=500)
    cfg = load_config().with_overrides(encode={"model": "tiny-vision", "registries": (str(reg),), "device": "cpu",
                                               "num_workers": 0, "batch_size": 16})
    r = embed_slide(slide, tmp_path / "out", cfg, progress=False)
    st = SlideStore.open(r.store)
    a = st.embedding_attrs("tiny-vision")
    assert a["vision_only"] is True and a["embed_dim"] == 192 and a["backend"] == "timm"
    with pytest.raises(ConfigError) as e:
        zeroshot([Path(r.store)], load_prompts("tumour"), cfg)
    assert "'tiny-vision' is vision-only" in str(e.value) and "\n" not in str(e.value)
    coords = st.coords()
    csv = tmp_path / "ex.csv"
    csv.write_text("slide,x,y,label\n" + "".join(f"{slide},{x},{y},{'a' if i % 2 else 'b'}\n"
                                                 for i, (x, y) in enumerate(coords[:4])))
    res = fewshot([Path(r.store)], csv, cfg)
    assert res[0]["status"] == "ok"


def test_models_command_shows_kind_input_mpp_licence_gated():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "slide_clip.cli", "models"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    head, *rows = r.stdout.splitlines()
    assert head.split()[:7] == ["name", "kind", "backend", "input", "mpp", "licence", "gated"]
    row = {ln.split()[0]: ln.split() for ln in rows if ln and not ln.startswith("Every")}
    assert row["uni"][1:5] == ["vision-only", "timm", "224", "0.5"] and "yes" in row["uni"]
    assert row["plip"][1:3] == ["vision-language", "open_clip"]
    assert row["h-optimus-0"][5] == "Apache-2.0" and "no" in row["h-optimus-0"]
    assert "random:NAME" in r.stdout
