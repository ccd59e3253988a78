"""slide-clip's CONCH backend against CONCH's own code, at full size, with CONCH's tokenizer.

CONCH's package is not on the package registries, so this is a script, not a test (the test
suite compares a small model of the same architecture with recorded outputs of CONCH's
code: tests/test_conch.py). Given a checkout of https://github.com/mahmoodlab/CONCH it:

1. builds CONCH's ``conch_ViT-B-16`` with CONCH's code and random weights (seeded; every
   parameter given non-trivial values), and saves its state dict as a checkpoint file;
2. loads that file through slide-clip (``--model conch --checkpoint FILE``: the path real
   weights take), with CONCH's tokenizer found in the checkout as an installed package;
3. compares: the preprocessing of tiles of several sizes (CONCH's ``image_transform`` and
   slide-clip's), the image embeddings (CONCH's ``encode_image(proj_contrast=True,
   normalize=True)``), the token ids of prompts (CONCH's ``tokenize``), the text embeddings
   and ``logit_scale``. It exits non-zero if anything differs by more than 1e-5.

Run with the transformers CONCH was released with for its ``tokenize`` (transformers 4.49
to 4.57 tokenise a text's first word differently; see slide_clip/encoders/conch.py)::

    python benchmarks/verify_conch.py --conch-src /path/to/CONCH [--slide SLIDE]
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
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conch-src", required=True, help="a checkout of github.com/mahmoodlab/CONCH")
    ap.add_argument("--slide", help="a slide to take real tiles from (else random tiles only)")
    ap.add_argument("--out", help="write the comparison as JSON here")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.conch_src).resolve()))
    import transformers
    from conch.open_clip_custom import get_tokenizer, tokenize
    from conch.open_clip_custom.coca_model import CoCa
    from conch.open_clip_custom.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from conch.open_clip_custom.transform import image_transform
    from PIL import Image

    from slide_clip.encoders import load_encoder, resolve_model
    from slide_clip.encoders.conch import find_tokenizer

    cfg = json.loads((Path(args.conch_src) / "conch/open_clip_custom/model_configs/conch_ViT-B-16.json").read_text())
    cfg.pop("custom_text", None)
    torch.manual_seed(0)
    theirs = CoCa(**cfg).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            if not torch.isfinite(p).all() or p.abs().max() > 1e3:
                p.normal_(0, 0.02)
            p.add_(0.01 * torch.randn_like(p))
        theirs.logit_scale.fill_(4.4)
    report: dict = {"transformers": transformers.__version__, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "conch_random.bin"
        torch.save(theirs.state_dict(), ckpt)
        spec = resolve_model("conch", checkpoint=ckpt)
        report["tokenizer"] = str(find_tokenizer(spec))
        ours = load_encoder(spec, device="cpu", precision="fp32")

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
    img_ours = ours.encode_images(px_theirs)
    report["image_max_abs_diff"] = float(np.abs(img_theirs - img_ours).max())
    ids_theirs = tokenize(get_tokenizer(), PROMPTS)
    ids_ours = ours.tokenizer(PROMPTS)
    report["ids_equal"] = bool(torch.equal(ids_theirs, ids_ours))
    with torch.no_grad():
        txt_theirs = theirs.encode_text(ids_theirs, normalize=True).numpy()
    txt_ours = ours.encode_texts(PROMPTS)
    report["text_max_abs_diff"] = float(np.abs(txt_theirs - txt_ours).max())
    report["logit_scale"] = [float(theirs.logit_scale.exp()), ours.logit_scale]
    report["tiles"] = [list(t.shape[:2]) for t in tiles]
    ok = (report["pixels_max_abs_diff"] <= 1e-5 and report["image_max_abs_diff"] <= 1e-5 and report["ids_equal"]
          and report["text_max_abs_diff"] <= 1e-5 and abs(report["logit_scale"][0] - report["logit_scale"][1]) < 1e-4)
    report["ok"] = ok
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
