"""slide-clip's CONCH backend against CONCH's own code, at full size, with CONCH's tokenizer.

CONCH's code comes from the installed ``conch`` package (``conch-fork`` on PyPI, the dev
extra; tests/test_conch.py makes the same comparison on one tile) or from a checkout of
https://github.com/mahmoodlab/CONCH given with ``--conch-src``. The script:

1. builds CONCH's ``conch_ViT-B-16`` with CONCH's code and random weights (seeded; every
   parameter given non-trivial values), and saves its state dict as a checkpoint file;
2. loads that file through slide-clip (``--model conch --checkpoint FILE``: the path real
   weights take), with CONCH's tokenizer found in the checkout as an installed package;
3. compares: the preprocessing of tiles of several sizes (CONCH's ``image_transform`` and
   slide-clip's), the image embeddings (CONCH's ``encode_image(proj_contrast=True,
   normalize=True)``, and ``proj_contrast=False, normalize=False`` against
   ``conch-features``), the token ids of prompts (CONCH's ``tokenize`` under transformers
   < 4.49; under 5.x its tokenizer file through the same call), the text embeddings (prompts
   with the literal text ``<pad>`` among them) and ``logit_scale``. It exits non-zero if
   anything differs by more than 1e-5 (relative, for the unnormalised features).

Transformers 4.49 to 4.57 tokenise a text's first word differently from the release CONCH
was made with (see slide_clip/encoders/conch.py); there the token ids are reported, not
required equal, and the text embeddings are compared from slide-clip's ids::

    python benchmarks/verify_conch.py [--conch-src /path/to/CONCH] [--slide SLIDE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

PROMPTS = [
    "an H&E image of tumor tissue.",
    "an H&E image of normal tissue.",
    "invasive ductal carcinoma",
    "Lymphocytes, necrosis and débris",
    "",
    "stroma " * 200,
    "an H&E image of <pad> tumour tissue",  # the literal <pad>: CONCH masks it in the class token's row only
    "<pad> necrosis <pad> with debris",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conch-src", help="a checkout of github.com/mahmoodlab/CONCH (default: the installed "
                    "conch package, e.g. conch-fork)")
    ap.add_argument("--slide", help="a slide to take real tiles from (else random tiles only)")
    ap.add_argument("--out", help="write the comparison as JSON here")
    args = ap.parse_args()
    if args.conch_src:
        sys.path.insert(0, str(Path(args.conch_src).resolve()))
    import transformers
    from conch.open_clip_custom import get_tokenizer, tokenize
    from conch.open_clip_custom.coca_model import CoCa
    from conch.open_clip_custom.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from conch.open_clip_custom.factory import CFG_DIR
    from conch.open_clip_custom.transform import image_transform
    from packaging.version import Version
    from PIL import Image

    from slide_clip.encoders import load_encoder, resolve_model
    from slide_clip.encoders.conch import find_tokenizer

    cfg = json.loads((CFG_DIR / "conch_ViT-B-16.json").read_text())
    cfg.pop("custom_text", None)
    torch.manual_seed(0)
    theirs = CoCa(**cfg).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            if not torch.isfinite(p).all() or p.abs().max() > 1e3:
                p.normal_(0, 0.02)
            p.add_(0.01 * torch.randn_like(p))
        theirs.logit_scale.fill_(4.4)
    import conch.open_clip_custom as conch_code

    report: dict = {"transformers": transformers.__version__, "torch": torch.__version__,
                    "conch": str(Path(conch_code.__file__).parent)}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "conch_random.bin"
        torch.save(theirs.state_dict(), ckpt)
        spec = resolve_model("conch", checkpoint=ckpt)
        report["tokenizer"] = str(find_tokenizer(spec))
        ours = load_encoder(spec, device="cpu", precision="fp32")
        feats = load_encoder(resolve_model("conch-features", checkpoint=ckpt), device="cpu", precision="fp32")

    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for s in (448, 448, 512, 300)]
    if args.slide:
        import openslide

        s = openslide.OpenSlide(args.slide)
        w, h = s.dimensions
        for i in range(4):
            x, y = min(w - 448, w // 4 + i * 448), min(h - 448, h // 3)
            tiles.append(np.asarray(s.read_region((x, y), 0, (448, 448)).convert("RGB")))
        s.close()
    their_tf = image_transform(448, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    px_theirs = torch.stack([their_tf(Image.fromarray(t)) for t in tiles])
    px_ours = torch.stack([ours.preprocess(Image.fromarray(t)) for t in tiles])
    report["pixels_max_abs_diff"] = float((px_theirs - px_ours).abs().max())
    with torch.no_grad():
        img_theirs = theirs.encode_image(px_theirs, normalize=True, proj_contrast=True).numpy()
        pre_theirs = theirs.encode_image(px_theirs, normalize=False, proj_contrast=False).numpy()
    img_ours = ours.encode_images(px_theirs)
    report["image_max_abs_diff"] = float(np.abs(img_theirs - img_ours).max())
    report["pre_projection_max_rel_diff"] = float(np.abs(pre_theirs - feats.encode_images(px_theirs)).max()
                                                  / np.abs(pre_theirs).max())
    ids_ours = ours.tokenizer(PROMPTS)
    version = Version(transformers.__version__)
    if version < Version("5"):
        ids_theirs = tokenize(get_tokenizer(), PROMPTS)  # CONCH's own function
        report["ids_from"] = "conch.tokenize"
    else:  # 5.x removed batch_encode_plus: tokenize()'s call through the API 5.x kept
        tok = get_tokenizer()
        enc = tok(PROMPTS, max_length=127, add_special_tokens=True, return_token_type_ids=False, truncation=True,
                  padding="max_length", return_tensors="pt")
        ids_theirs = torch.nn.functional.pad(enc["input_ids"], (0, 1), value=tok.pad_token_id)
        report["ids_from"] = "the tokenizer file through transformers 5's __call__, tokenize()'s arguments"
    report["ids_equal"] = bool(torch.equal(ids_theirs, ids_ours))
    ids_required = not (Version("4.49") <= version < Version("5"))
    with torch.no_grad():
        txt_theirs = theirs.encode_text(ids_ours, normalize=True).numpy()
    txt_ours = ours.encode_texts(PROMPTS)
    report["text_max_abs_diff"] = float(np.abs(txt_theirs - txt_ours).max())
    report["logit_scale"] = [float(theirs.logit_scale.detach().exp()), ours.logit_scale]
    report["tiles"] = [list(t.shape[:2]) for t in tiles]
    ok = (report["pixels_max_abs_diff"] <= 1e-5 and report["image_max_abs_diff"] <= 1e-5
          and report["pre_projection_max_rel_diff"] <= 1e-5 and (report["ids_equal"] or not ids_required)
          and report["text_max_abs_diff"] <= 1e-5 and abs(report["logit_scale"][0] - report["logit_scale"][1]) < 1e-4)
    report["ok"] = ok
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
