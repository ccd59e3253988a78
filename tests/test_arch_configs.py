"""Input sizes from architecture configs, read without importing torch or open_clip.

A command builds its model in a background thread while tissue is found; the tile size
(the model's input side by default) is needed first, so asking for it must not wait on
that import (tests here run the question in a fresh interpreter and look at what it imported).
"""

import json
import subprocess
import sys

from slide_clip.encoders.arch_configs import _packaged_open_clip_config


def test_packaged_configs_are_open_clips_own():
    from pathlib import Path

    import open_clip

    # the architectures open_clip ships (tests elsewhere register more, e.g. the tiny one)
    names = sorted(p.stem for p in (Path(open_clip.__file__).parent / "model_configs").glob("*.json"))
    assert len(names) > 50 and "ViT-B-32" in names
    for name in names:
        assert _packaged_open_clip_config(name) == open_clip.get_model_config(name), name
    assert _packaged_open_clip_config("no-such-arch") is None


_PROBE = """
import json, sys
from slide_clip.encoders import load_registry, model_input_size, resolve_model
files = tuple(sys.argv[1:])
names = sorted(load_registry(*files)) + ["random:ViT-B-16", "random:ViT-L-14-336"]
sizes = {n: model_input_size(resolve_model(n, files)) for n in names}
print(json.dumps({"sizes": sizes, "imported": sorted(m for m in ("torch", "open_clip", "timm", "transformers")
                                                      if m in sys.modules)}))
"""


def test_input_sizes_import_neither_torch_nor_open_clip(tiny_registry):
    out = subprocess.run([sys.executable, "-c", _PROBE, str(tiny_registry)], capture_output=True, text=True,
                         check=True)
    got = json.loads(out.stdout)
    assert got["imported"] == [], got["imported"]
    sizes = got["sizes"]
    # the tiny test architecture from its own config file; the rest from the registry and open_clip's configs
    assert sizes["tiny"] == 224 and sizes["conch"] == 448 and sizes["uni"] == 224
    assert sizes["random:ViT-B-16"] == 224 and sizes["random:ViT-L-14-336"] == 336
    assert sizes["quiltnet-b-32"] == 224 and sizes["plip"] == 224
