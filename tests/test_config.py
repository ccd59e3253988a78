"""The typed pipeline configuration: YAML files, overrides, and one-line errors."""

import pytest
import torch

from slide_clip.config import load_config
from slide_clip.errors import ConfigError
from slide_clip.loader import resolve_workers


def test_defaults_and_overrides():
    cfg = load_config()
    assert cfg.tiling.target_mpp is None and cfg.tiling.tile_size is None and cfg.encode.num_workers == "auto"
    cfg2 = cfg.with_overrides(tiling={"tile_size": 256, "overlap": None}, encode={"num_workers": "3"})
    assert cfg2.tiling.tile_size == 256 and cfg2.tiling.overlap == 0.0 and cfg2.encode.num_workers == 3


@pytest.mark.parametrize("section,values,message", [
    # options are named as typed, with the configuration field they set
    ("encode", {"num_workers": "many"}, "--workers 'many': Input should be 'auto' or a valid integer"),
    ("encode", {"num_workers": -1}, "--workers -1: Input should be 'auto' or greater than or equal to 0"),
    ("tiling", {"tile_size": 3}, "--tile-size 3: must be a whole number at least 16 and at most 4096 "
                                 "(tiling.tile_size)"),
    ("scoring", {"decision": "vote"}, "--decision 'vote': Input should be 'topk', 'mean' or 'area'"),
])
def test_bad_values_are_one_line(section, values, message):
    with pytest.raises(ConfigError) as e:
        load_config().with_overrides(**{section: values})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_files(tmp_path):
    p = tmp_path / "my.yaml"
    p.write_text("tiling:\n  target_mpp: 1.0\nencode:\n  registries: [models.yaml]\n  checkpoint: w.pt\n")
    cfg = load_config(p)
    assert cfg.tiling.target_mpp == 1.0
    assert cfg.encode.registries == (str(tmp_path / "models.yaml"),)  # relative to the file
    assert cfg.encode.checkpoint == str(tmp_path / "w.pt")
    p.write_text("tiling:\n  tile_sise: 256\n")
    with pytest.raises(ConfigError, match=r"my.yaml: invalid configuration: tiling.tile_sise: Extra inputs"):
        load_config(p)
    p.write_text("tiling: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


def test_loader_workers_auto():
    assert resolve_workers("auto", torch.device("cpu")) == 0  # the model dominates on a CPU
    assert 1 <= resolve_workers("auto", torch.device("cuda")) <= 8
    assert resolve_workers(3, torch.device("cpu")) == 3
