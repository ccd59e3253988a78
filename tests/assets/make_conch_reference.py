"""Make ``conch_tiny_reference.pt``: reference outputs of CONCH's *own* code for tests/test_conch.py.

CONCH's package cannot be installed from the package registries, so the test compares
slide-clip's CONCH backend with outputs recorded once from CONCH's implementation
(https://github.com/mahmoodlab/CONCH, ``conch/open_clip_custom``) on a small random-weights
model of the same architecture. Run it with a checkout of CONCH's repository::

    python tests/assets/make_conch_reference.py --conch-src /path/to/CONCH

It writes, next to this script:

``conch_tiny_tokenizer.json``
    a small byte-level BPE tokenizer of CONCH's shape (NFD, strip accents, lowercase; byte
    level with a prefix space; ``<pad>`` 0, ``<start_of_text>`` 1, ``<end_of_text>`` 2 and
    the template ``<start_of_text> $A <end_of_text>``), trained here on a few sentences:
    CONCH's own tokenizer file is not redistributed.
``conch_tiny_reference.pt``
    the model config, CONCH's state dict (captioning decoder included), uint8 images, the
    pixels CONCH's transform makes of them, texts, the ids CONCH's ``tokenize`` makes of
    them with the tokenizer above (``ids128``; and ``ids``, the same call for the tiny
    context), and CONCH's ``encode_image`` / ``encode_text``
    (normalised) and ``logit_scale``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent

#: CONCH's architecture, scaled down (the same structure; every part present). CONCH's
#: factory does not pass ``attn_pooler_heads`` on (its poolers always have 8 heads), so it
#: stays 8 here as in CONCH's own config.
TINY = {
    "embed_dim": 32,
    "embed_dim_caption": 48,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 48, "layers": 2, "heads": 4, "mlp_ratio": 4.0,
                   "attn_pooler_heads": 8, "n_queries_contrast": 1, "n_queries_caption": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 0, "width": 48, "heads": 4, "layers": 2, "pad_id": 0,
                 "embed_cls": True},
    "multimodal_cfg": {"context_length": 24, "vocab_size": 0, "width": 48, "heads": 4, "layers": 1},
}

CORPUS = [
    "an H&E image of tumour tissue", "an H&E image of normal tissue", "an H&E image of stroma",
    "invasive ductal carcinoma of the breast", "lymphocytes infiltrating the tumour",
    "necrosis with debris", "adipose tissue", "colorectal adenocarcinoma, moderately differentiated",
    "squamous cell carcinoma of the lung", "a photomicrograph of benign glandular epithelium",
] * 20

TEXTS = [
    "an H&E image of tumour tissue",
    "Necrosis — with débris",  # case and accents: the normaliser lowercases and strips them
    "",
    "lymphocytes " * 40,  # longer than the context: truncated, <end_of_text> kept
]


def make_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<start_of_text>", "<end_of_text>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<start_of_text> $A <end_of_text>",
        special_tokens=[("<start_of_text>", 1), ("<end_of_text>", 2)])
    assert [tok.token_to_id(t) for t in ("<pad>", "<start_of_text>", "<end_of_text>")] == [0, 1, 2]
    tok.save(str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conch-src", required=True, help="a checkout of github.com/mahmoodlab/CONCH")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.conch_src).resolve()))
    from conch.open_clip_custom.coca_model import CoCa
    from conch.open_clip_custom.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from conch.open_clip_custom.custom_tokenizer import tokenize
    from conch.open_clip_custom.transform import image_transform
    from PIL import Image
    from transformers import PreTrainedTokenizerFast

    tok_path = HERE / "conch_tiny_tokenizer.json"
    make_tokenizer(tok_path)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_path), bos_token="<start_of_text>",
                                        eos_token="<end_of_text>", pad_token="<pad>")
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    cfg["text_cfg"]["vocab_size"] = cfg["multimodal_cfg"]["vocab_size"] = len(tokenizer)

    torch.manual_seed(1234)
    vision = {k: v for k, v in cfg["vision_cfg"].items() if k not in ("width", "heads", "layers")}
    vision.update(width=cfg["vision_cfg"]["width"], num_heads=cfg["vision_cfg"]["heads"],
                  layers=cfg["vision_cfg"]["layers"], attentional_pool_contrast=True,
                  attentional_pool_caption=True, output_tokens=True)
    text = {k: v for k, v in cfg["text_cfg"].items()}
    text["output_tokens"] = True
    model = CoCa(embed_dim=cfg["embed_dim"], embed_dim_caption=cfg["embed_dim_caption"],
                 multimodal_cfg=cfg["multimodal_cfg"], text_cfg=text, vision_cfg=vision).eval()
    # Some of CONCH's tensors start as torch.empty, biases as zeros and norms as ones: give every
    # parameter finite, non-trivial values so that every one of them shows in the outputs
    with torch.no_grad():
        for p in model.parameters():
            if not torch.isfinite(p).all() or p.abs().max() > 1e3:
                p.normal_(0, 0.05)
            p.add_(0.02 * torch.randn_like(p))
        model.logit_scale.fill_(float(np.log(1 / 0.07)) + 0.3)

    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    transform = image_transform(64, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    pixels = torch.stack([transform(Image.fromarray(im)) for im in images])
    ids128 = tokenize(tokenizer, TEXTS)  # CONCH's own function: 127 ids, then one <pad> more
    assert ids128.shape == (len(TEXTS), 128)
    # it hard-codes CONCH's 128 ids; for the tiny context, the same call with the tiny length:
    enc = tokenizer.batch_encode_plus(TEXTS, max_length=cfg["text_cfg"]["context_length"] - 1,
                                      add_special_tokens=True, return_token_type_ids=False, truncation=True,
                                      padding="max_length", return_tensors="pt")
    ids = torch.nn.functional.pad(enc["input_ids"], (0, 1), value=tokenizer.pad_token_id)
    with torch.no_grad():
        image_emb = model.encode_image(pixels, normalize=True, proj_contrast=True)
        text_emb = model.encode_text(ids, normalize=True)
    torch.save({
        "config": cfg,
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "images": torch.from_numpy(images),
        "pixels": pixels,
        "texts": TEXTS,
        "ids128": ids128,
        "ids": ids,
        "image_embeddings": image_emb,
        "text_embeddings": text_emb,
        "logit_scale": model.logit_scale.exp().item(),
        "source": "github.com/mahmoodlab/CONCH conch/open_clip_custom (CoCa, image_transform, tokenize)",
    }, HERE / "conch_tiny_reference.pt")
    print(f"wrote {HERE / 'conch_tiny_reference.pt'} and {tok_path}: {len(model.state_dict())} tensors")


if __name__ == "__main__":
    main()
