"""What the store records is what was loaded: seeded random weights, local checkpoints for bare
and hub architectures, stores scoreable without the registry, tiles at the model's input size."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from slide_clip.encoders import file_sha256, load_encoder, resolve_model, state_dict_sha256
from slide_clip.errors import ConfigError, WeightsError
from slide_clip.pipeline import embed_slide, resampling_note
from slide_clip.store import SlideStore
from slide_clip.synthetic import Region, Scene

ASSETS = Path(__file__).parent / "assets"
TINY = "slideclip-tiny-test"
PY = sys.executable


def _small_scene(mpp=0.5):
    """500 x 400 µm with one 400 x 300 µm piece of tissue: a handful of 112 µm tiles."""
    px = lambda um: um / mpp  # noqa: E731
    return Scene(width=int(px(500)), height=int(px(400)),
                 regions=(Region("rect", (px(50), px(50), px(450), px(350)), "tissue"),))


@pytest.fixture(scope="module")
def small_slide(make_slide):
    return make_slide("small_provenance", scene=_small_scene())[0]


# ----------------------------------------------------------------------------- (a) random weights
def test_random_weights_are_seeded_and_leave_global_rng_alone(tiny_registry):
    torch.manual_seed(123)
    before = torch.random.get_rng_state().clone()
    a = load_encoder(resolve_model(f"random:{TINY}", [tiny_registry]), device="cpu")
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random stream is untouched
    b = load_encoder(resolve_model(f"random:{TINY}@seed=0", [tiny_registry]), device="cpu")
    c = load_encoder(resolve_model(f"random:{TINY}@seed=1", [tiny_registry]), device="cpu")
    assert a.spec.name == b.spec.name == f"random:{TINY}" and c.spec.name == f"random:{TINY}@seed=1"
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    # independent computation: open_clip's own build after seeding torch's CPU generator with 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = open_clip.create_model(TINY, pretrained=None)
    assert state_dict_sha256(ref) == a.weights_sha256
    p = a.provenance()
    assert p["random_weights"] is True and p["seed"] == 0 and p["weights_source"] == "random"
    assert c.provenance()["seed"] == 1
    with pytest.raises(ConfigError, match="random:NAME@seed=N"):
        resolve_model(f"random:{TINY}@7")


def _cli(*args, module="slide_clip.cli", cwd=None, timeout=900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run([PY, "-m", module, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


@pytest.mark.slow
def test_random_vit_b_32_embed_then_zeroshot_and_run_in_separate_processes(small_slide, tmp_path):
    out = tmp_path / "out"
    r = _cli("embed", small_slide, "--out", out, "--model", "random:ViT-B-32", "--device", "cpu",
             "--workers", "0", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = _cli("zeroshot", out, "--prompts", "tumour", "--device", "cpu")  # a second process
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 of 1 slide scored" in r.stdout
    store = SlideStore.open(out / "small_provenance.zarr")
    e = store.embedding_attrs("random:ViT-B-32")
    assert e["random_weights"] is True and e["seed"] == 0 and e["arch"] == "ViT-B-32"
    # the same weights in this (third) process
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = open_clip.create_model("ViT-B-32", pretrained=None)
    assert e["weights_sha256"] == state_dict_sha256(ref)
    assert store.tiling["tile_size"] == 224 and store.tiling["tile_size_from"] == "model"

    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(small_slide, slides / small_slide.name)
    out2 = tmp_path / "run"
    r = _cli("run", slides, "--out", out2, "--model", "random:ViT-B-32", "--prompts", "tumour", "--device", "cpu",
             "--workers", "0", module="slide_clip_flows.cli")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in out2.glob("cohort-*.csv")) == ["cohort-tumour-random_ViT-B-32.csv"]
    pngs = list((out2 / "heatmaps").rglob("*.png"))
    assert len(pngs) == 2  # tumour and normal
    s2 = SlideStore.open(out2 / "small_provenance.zarr")
    assert s2.embedding_attrs("random:ViT-B-32")["weights_sha256"] == e["weights_sha256"]


# ----------------------------------------------------------------------------- (b) bare arch + checkpoint
def test_bare_architecture_with_checkpoint_embeds_and_scores_without_registry(small_slide, tiny_checkpoint,
                                                                              tmp_path):
    from slide_clip.config import load_config
    from slide_clip.prompts import load_prompts
    from slide_clip.scoring import zeroshot

    open_clip.add_model_config(ASSETS / f"{TINY}.json")
    ckpt = tmp_path / "weights.pt"
    shutil.copy(tiny_checkpoint, ckpt)
    base = load_config().with_overrides(encode={"device": "cpu", "num_workers": 0, "batch_size": 8})
    cfg = base.with_overrides(encode={"model": TINY, "checkpoint": str(ckpt)})
    r = embed_slide(small_slide, tmp_path / "out", cfg, progress=False)
    assert r.status == "ok" and r.n_tiles > 0
    store = SlideStore.open(r.store)
    e = store.embedding_attrs(TINY)
    assert e["weights_kind"] == "file" and e["checkpoint_sha256"] == file_sha256(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    ref = open_clip.create_model(TINY, pretrained=None)
    ref.load_state_dict(saved)
    assert e["weights_sha256"] == state_dict_sha256(ref)
    # scoring needs neither the registry nor --checkpoint: the store names the file it was made with
    res = zeroshot([Path(r.store)], load_prompts("tumour"), base)
    assert res[0]["status"] == "ok", res
    # the file gone: a clear refusal naming the model and what to give
    ckpt.unlink()
    shutil.rmtree(tmp_path / "out" / "classifiers")
    res = zeroshot([Path(r.store)], load_prompts("tumour"), base)
    assert res[0]["status"] == "failed" and "weights file" in res[0]["error"] and "--checkpoint" in res[0]["error"]


# ----------------------------------------------------------------------------- (c) hub architecture + checkpoint
@pytest.fixture(scope="module")
def hub_like_registry(tmp_path_factory):
    """An entry shaped like BiomedCLIP's (``arch: hf-hub:...``), whose open_clip_config.json is
    given as a local ``arch_config`` (BiomedCLIP's own needs the hub; here it is the tiny
    architecture with its own preprocessing), and two checkpoints of different weights."""
    d = tmp_path_factory.mktemp("hub_like")
    model_cfg = json.loads((ASSETS / f"{TINY}.json").read_text())
    (d / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic"}}))
    ckpts = []
    for seed in (1, 2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            open_clip.add_model_config(ASSETS / f"{TINY}.json")
            m = open_clip.create_model(TINY, pretrained=None)
        torch.save(m.state_dict(), d / f"w{seed}.pt")
        ckpts.append(d / f"w{seed}.pt")
    reg = d / "models.yaml"
    reg.write_text("models:\n  hub-like:\n    arch: hf-hub:test-org/tiny-hub\n"
                   "    weights: hf-hub:test-org/tiny-hub\n    arch_config: open_clip_config.json\n")
    return reg, ckpts


def test_hub_architecture_loads_the_checkpoint_given(hub_like_registry):
    reg, (w1, w2) = hub_like_registry
    e1 = load_encoder(resolve_model("hub-like", [reg], checkpoint=w1), device="cpu")
    e2 = load_encoder(resolve_model("hub-like", [reg], checkpoint=w2), device="cpu")
    assert e1.weights_sha256 != e2.weights_sha256
    for enc, w in ((e1, w1), (e2, w2)):
        saved = torch.load(w, weights_only=True)
        state = enc.model.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in saved.items())
        p = enc.provenance()
        assert p["checkpoint_sha256"] == file_sha256(w) and p["weights_source"] == str(w)
        assert p["preprocess"]["mean"] == [0.5, 0.5, 0.5] and p["preprocess"]["std"] == [0.25, 0.25, 0.25]
        assert p["arch_config"]["model_cfg"]["embed_dim"] == 32


@pytest.fixture
def quilt_like(tmp_path, monkeypatch):
    """An entry shaped like QuiltNet-B-32's: hub weights (``hf-hub:``) for a registry
    architecture with QuickGELU, in a Hugging Face cache on disk whose ``open_clip_config.json``
    leaves ``quick_gelu`` out (as QuiltNet-B-32's does). The hub cannot be reached: the hub path
    is served from this cache (``HF_HUB_OFFLINE=1``, conftest)."""
    import huggingface_hub

    model_cfg = json.loads((ASSETS / f"{TINY}.json").read_text())
    arch = tmp_path / "slideclip-tiny-quickgelu-test.json"
    arch.write_text(json.dumps({**model_cfg, "quick_gelu": True}))
    snap = tmp_path / "hf" / "models--test-org--quilt-like" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("a" * 40)
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        open_clip.add_model_config(arch)
        m = open_clip.create_model(arch.stem, pretrained=None)
    torch.save(m.state_dict(), snap / "open_clip_pytorch_model.bin")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    reg = tmp_path / "models.yaml"
    reg.write_text(f"models:\n  quilt-like:\n    arch: {arch.stem}\n    arch_config: {arch}\n"
                   "    weights: hf-hub:test-org/quilt-like\n")
    return reg, snap / "open_clip_pytorch_model.bin"


def test_hub_weights_of_a_registry_architecture_build_it_on_every_path(quilt_like):
    """The hub's weights, the same file given with --checkpoint, and random:NAME all build the
    registry's architecture (QuickGELU), not the hub config's (GELU); the same weights give the
    same embeddings whichever way they were loaded, and the store records the activation."""
    reg, cached = quilt_like
    hub = load_encoder(resolve_model("quilt-like", [reg]), device="cpu")
    local = load_encoder(resolve_model("quilt-like", [reg], checkpoint=cached), device="cpu")
    rand = load_encoder(resolve_model("random:quilt-like", [reg]), device="cpu")
    for enc in (hub, local, rand):
        p = enc.provenance()
        assert p["quick_gelu"] is True and p["arch_config"]["model_cfg"]["quick_gelu"] is True
        assert p["arch"] == "slideclip-tiny-quickgelu-test"
    assert hub.provenance()["weights_kind"] == "hf-hub" and hub.checkpoint_sha256 == file_sha256(cached)
    assert hub.weights_sha256 == local.weights_sha256 != rand.weights_sha256
    pixels = torch.rand(2, 3, 224, 224)
    assert np.array_equal(hub.encode_images(pixels), local.encode_images(pixels))
    assert np.array_equal(hub.encode_texts(["tumour", "stroma"]), local.encode_texts(["tumour", "stroma"]))
    # open_clip's own hub loading (what the hub path did) builds the hub config: GELU, other numbers
    theirs, _, _ = open_clip.create_model_and_transforms("hf-hub:test-org/quilt-like")
    from slide_clip.encoders.openclip import uses_quick_gelu

    assert not uses_quick_gelu(theirs)
    with torch.no_grad():
        other = torch.nn.functional.normalize(theirs.eval().encode_image(pixels), dim=-1).numpy()
    assert np.abs(other - hub.encode_images(pixels)).max() > 1e-3


def test_groups_made_another_way_are_made_again(quilt_like, small_slide, cfg, tmp_path):
    """A group built by the old hub path (no ``quick_gelu`` recorded: open_clip built the hub
    config), or under another architecture (openai-vit-b-16 was ViT-B-16), is not 'done' and
    is not scored: the slide is encoded again and the group replaced."""
    from slide_clip.encoders import load_registry
    from slide_clip.encoders.spec import made_as
    from slide_clip.pipeline import embeddings_done

    assert not made_as({"arch": "ViT-B-16"}, load_registry()["openai-vit-b-16"])
    reg, _ = quilt_like
    c = cfg.with_overrides(encode={"model": "quilt-like", "registries": (str(reg),), "num_workers": 0})
    r = embed_slide(small_slide, tmp_path / "out", c, progress=False)
    st = SlideStore.open(r.store)
    spec = resolve_model("quilt-like", [reg])
    assert r.encoded == r.n_tiles > 0 and embeddings_done(st, spec)
    group = st.group["embeddings/quilt-like"]
    old = {k: v for k, v in group.attrs.items() if k != "quick_gelu"}
    group.attrs.clear()
    group.attrs.update(old)  # as the old hub path wrote it
    assert not embeddings_done(SlideStore.open(r.store), spec)
    # scored as it is, its text side would come from another build than its image side: refused
    from slide_clip.prompts import load_prompts
    from slide_clip.scoring import zeroshot

    [res] = zeroshot([Path(r.store)], load_prompts("tumour"), c)
    assert res["status"] == "failed" and "another build" in res["error"] and "--model quilt-like" in res["error"]
    again = embed_slide(small_slide, tmp_path / "out", c, progress=False)
    assert again.status == "ok" and again.encoded == r.n_tiles
    assert SlideStore.open(r.store).embedding_attrs("quilt-like")["quick_gelu"] is True


def test_real_biomedclip_with_checkpoint_offline_refuses_clearly(tiny_checkpoint):
    # BiomedCLIP's architecture config lives on the hub; without network or cache it cannot be built
    with pytest.raises(WeightsError) as e:
        load_encoder(resolve_model("biomedclip", checkpoint=tiny_checkpoint), device="cpu")
    msg = str(e.value)
    assert "biomedclip" in msg and "arch_config" in msg and "\n" not in msg


def test_text_file_as_checkpoint_says_what_it_is(tmp_path, tiny_registry):
    bad = tmp_path / "notes.txt"
    bad.write_text("these are not weights\n")
    with pytest.raises(WeightsError) as e:
        load_encoder(resolve_model("tiny", [tiny_registry], checkpoint=bad), device="cpu")
    assert "is not a PyTorch/open_clip checkpoint" in str(e.value) and str(bad) in str(e.value)
    assert "pop from empty list" not in str(e.value)


# ----------------------------------------------------------------------------- (d) stores remember the model
def test_registry_model_store_is_scoreable_without_the_registry(small_slide, cfg, tmp_path):
    from slide_clip.config import load_config
    from slide_clip.prompts import load_prompts
    from slide_clip.scoring import zeroshot

    r = embed_slide(small_slide, tmp_path / "out", cfg.with_overrides(encode={"num_workers": 0}), progress=False)
    store = SlideStore.open(r.store)
    e = store.embedding_attrs("tiny")
    assert e["spec"]["arch"] == TINY and e["arch_config"]["model_cfg"]["vision_cfg"]["layers"] == 2
    assert e["preprocess"]["size"] in (224, [224, 224])
    plain = load_config().with_overrides(encode={"device": "cpu"})  # no --models
    res = zeroshot([Path(r.store)], load_prompts("tumour"), plain)
    assert res[0]["status"] == "ok", res


# ----------------------------------------------------------------------------- (e) tile size
@pytest.fixture(scope="module")
def tiny64_registry(tmp_path_factory):
    """The tiny architecture at a 64 px input, with a checkpoint."""
    d = tmp_path_factory.mktemp("tiny64")
    cfg = json.loads((ASSETS / f"{TINY}.json").read_text())
    cfg["vision_cfg"]["image_size"] = 64
    (d / "slideclip-tiny64-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / "slideclip-tiny64-test.json")
    m = open_clip.create_model("slideclip-tiny64-test", pretrained=None)
    torch.save(m.state_dict(), d / "w.pt")
    reg = d / "models.yaml"
    reg.write_text("models:\n  tiny64:\n    arch: slideclip-tiny64-test\n"
                   "    arch_config: slideclip-tiny64-test.json\n    checkpoint: w.pt\n")
    return reg


def test_tile_size_defaults_to_the_model_input_size(small_slide, cfg, tiny64_registry, tmp_path):
    c = cfg.with_overrides(encode={"model": "tiny64", "registries": (str(tiny64_registry),), "num_workers": 0})
    assert c.tiling.tile_size is None and resampling_note(c) is None
    r = embed_slide(small_slide, tmp_path / "auto", c, progress=False)
    st = SlideStore.open(r.store)
    t = st.tiling
    assert t["tile_size"] == 64 and t["tile_size_from"] == "model" and t["model_input_size"] == 64
    assert t["resampled"] is False
    # extent in level-0 px: 64 px at 0.5 µm/px on a 0.5 µm/px slide
    assert t["tile_extent_level0"] == [64.0, 64.0]
    e = st.embedding_attrs("tiny64")
    assert e["tile_size"] == 64 and e["resampled"] is False and e["seen_mpp"] == pytest.approx(0.5)

    asked = c.with_overrides(tiling={"tile_size": 96})
    note = resampling_note(asked)
    assert "96 px" in note and "64 px" in note and "0.75 µm/px" in note
    r = embed_slide(small_slide, tmp_path / "asked", asked, progress=False)
    st = SlideStore.open(r.store)
    t = st.tiling
    assert t["tile_size"] == 96 and t["tile_size_from"] == "user" and t["resampled"] is True
    e = st.embedding_attrs("tiny64")
    assert e["resampled"] is True and e["seen_mpp"] == pytest.approx(0.5 * 96 / 64)

    # a second model with another input size joins the auto-tiled store (its tiles resampled, recorded)
    other = cfg.with_overrides(encode={"num_workers": 0})  # tiny: 224 px input
    r = embed_slide(small_slide, tmp_path / "auto", other, progress=False)
    st = SlideStore.open(r.store)
    assert st.tiling["tile_size"] == 64
    e = st.embedding_attrs("tiny")
    assert e["tile_size"] == 64 and e["resampled"] is True and e["seen_mpp"] == pytest.approx(0.5 * 64 / 224)


def test_embed_cli_says_once_that_tiles_are_resampled(small_slide, tiny_registry, tmp_path):
    r = _cli("embed", small_slide, "--out", tmp_path / "o", "--model", "tiny", "--models", tiny_registry,
             "--tile-size", "112", "--device", "cpu", "--workers", "0", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("resampled to the model's 224 px input") == 1


def test_target_mpp_defaults_to_the_model_training_mpp(small_slide, tiny_registry, tiny_checkpoint, cfg, tmp_path):
    from slide_clip.pipeline import target_mpp_for

    reg = tmp_path / "models.yaml"
    reg.write_text(f"models:\n  tiny-1mpp:\n    arch: {TINY}\n    arch_config: {ASSETS / (TINY + '.json')}\n"
                   f"    checkpoint: {tiny_checkpoint}\n    training_mpp: 1.0\n")
    c = cfg.with_overrides(encode={"model": "tiny-1mpp", "registries": (str(reg),), "num_workers": 0})
    assert c.tiling.target_mpp is None and target_mpp_for(c) == 1.0
    assert target_mpp_for(cfg) == 0.5  # an entry without training_mpp: 0.5
    r = embed_slide(small_slide, tmp_path / "o", c, progress=False)
    t = SlideStore.open(r.store).tiling
    assert t["target_mpp"] == 1.0 and t["target_mpp_from"] == "model"
    assert t["tile_extent_level0"] == [448.0, 448.0]  # 224 px at 1 µm/px on a 0.5 µm/px slide
    assert SlideStore.open(r.store).embedding_attrs("tiny-1mpp")["training_mpp"] == 1.0
    given = c.with_overrides(tiling={"target_mpp": 0.5})
    assert target_mpp_for(given) == 0.5


# ----------------------------------------------------------------------------- (f) a card's tile, then its crop
@pytest.fixture(scope="module")
def card_crop_registry(tmp_path_factory):
    """A small timm model shaped like Prov-GigaPath's entry: 64 px input, the card's transform
    Resize(80) + CenterCrop(64), tiles of 80 px (Prov-GigaPath: 224, 256, 256)."""
    import timm

    d = tmp_path_factory.mktemp("card_crop")
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1, img_size=64)
    torch.save(m.state_dict(), d / "vit.pt")
    reg = d / "models.yaml"
    reg.write_text("models:\n  crop-vit:\n    backend: timm\n    arch: vit_tiny_patch16_224\n"
                   "    model_kwargs: {depth: 1, img_size: 64}\n    checkpoint: vit.pt\n    input_size: 64\n"
                   "    resize_size: 80\n    tile_size: 80\n    training_mpp: 0.5\n    licence: test\n")
    return reg


def _note_mpp(note: str) -> float:
    """The µm/px a console note says the model sees."""
    import re

    m = re.search(r"sees ([0-9.]+) µm/px", note) or re.search(r"\) at ([0-9.]+) µm/px", note)
    return float(m.group(1))


def test_card_tile_size_then_its_crop_console_and_store_agree(small_slide, cfg, card_crop_registry, tmp_path):
    """A model whose card cuts larger tiles and crops them gets those tiles by default; what the
    console says it sees (µm/px, share of the tile) is what its store records, at the default and
    at a given --tile-size; the crop runs on the device and gives the per-tile PIL path's numbers."""
    from slide_clip.config import load_config
    from slide_clip.pipeline import tile_size_for

    # the shipped registry: Prov-GigaPath cuts 256 px at 0.5 µm/px and sees the central 224 at 0.5 µm/px
    gp = load_config().with_overrides(encode={"model": "prov-gigapath"})
    assert tile_size_for(gp) == 256
    note = resampling_note(gp)
    assert "0.5 µm/px" in note and "76.6%" in note and "central 224 px of each 256 px tile" in note
    note = resampling_note(gp.with_overrides(tiling={"tile_size": 224}))  # the old default: upsampled
    assert "0.4375 µm/px" in note and "resampled to 256 px" in note
    note = resampling_note(gp.with_overrides(tiling={"tile_size": 256}))
    assert "0.5 µm/px" in note and "resampled" not in note  # not 256 x 0.5 / 224 = 0.5714

    c = cfg.with_overrides(encode={"model": "crop-vit", "registries": (str(card_crop_registry),), "num_workers": 0})
    for tile_size, mpp in ((None, 0.5), (80, 0.5), (64, 0.5 * 64 / 80), (96, 0.5 * 96 / 80)):
        run = c.with_overrides(tiling={"tile_size": tile_size})
        note = resampling_note(run)
        r = embed_slide(small_slide, tmp_path / f"t{tile_size}", run, progress=False)
        assert r.status == "ok", r.error
        st = SlideStore.open(r.store)
        t, e = st.tiling, st.embedding_attrs("crop-vit")
        assert t["tile_size"] == (tile_size or 80) and t["model_tile_size"] == 80 and t["model_input_size"] == 64
        assert t["tile_size_from"] == ("model" if tile_size is None else "user")
        assert e["seen_mpp"] == pytest.approx(mpp) and _note_mpp(note) == pytest.approx(e["seen_mpp"], rel=1e-3)
        # the model sees the central 64 of 80 px (after any resize): 64 % of the tile's area
        assert e["seen_fraction"] == pytest.approx(0.64) and "64.0%" in note
        assert e["seen_um"] == pytest.approx(64 * mpp)
        assert e["resampled"] is t["resampled"] is (tile_size not in (None, 80))
    # the default run's embeddings: cropped on the device, equal to the per-tile PIL preprocess
    from slide_clip.encoders import load_encoder, resolve_model
    from slide_clip.pipeline import grid_from_store
    from slide_clip.tiling import read_tile

    st = SlideStore.open(tmp_path / "tNone" / "small_provenance.zarr")
    enc = load_encoder(resolve_model("crop-vit", [card_crop_registry]), device="cpu")
    norm = enc.pixel_norm(80)
    assert norm is not None and norm.crop == (8, 8, 64, 64)
    import openslide

    grid = grid_from_store(st)
    osr = openslide.OpenSlide(str(small_slide))
    pil = torch.stack([enc.preprocess(read_tile(osr, int(x), int(y), grid)) for x, y in grid.coords])
    osr.close()
    assert np.allclose(st.embeddings("crop-vit"), enc.encode_images(pil), rtol=0, atol=1e-6)


def test_a_checkpoint_model_is_not_logged_as_randomly_initialised(tiny_registry, caplog):
    """open_clip logs "No pretrained weights loaded ... initialized randomly" for every model built
    before its checkpoint is loaded; on `run`'s console (Prefect's logging) that called trained
    checkpoint weights random. The line is not logged; the checkpoint's weights are in the model."""
    import logging

    import torch

    from slide_clip.encoders import load_encoder, resolve_model

    with caplog.at_level(logging.INFO):
        enc = load_encoder(resolve_model("tiny", [tiny_registry]), device="cpu")
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    saved = torch.load(tiny_registry.parent / "tiny.pt", map_location="cpu")
    model_state = enc.model.state_dict()
    key = next(k for k in saved if k.startswith("visual.") and saved[k].ndim >= 2)
    assert torch.equal(model_state[key], saved[key])
    assert logging.getLogger().filters == []  # the filter is gone once the model is built
