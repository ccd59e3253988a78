"""The slide-clip command line, run as a user runs it: a real process, real files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from slide_clip.store import SlideStore
from slide_clip.synthetic import Region, Scene

CLI = [sys.executable, "-m", "slide_clip.cli"]


def run(*args, timeout=600):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_help_reads_well():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("info", "embed", "models"):
        assert cmd in r.stdout
    r = run("embed", "--help")
    for opt in ("--out", "--config", "--model", "--mpp", "--mpp-csv", "--tile-size", "--target-mpp",
                "--batch-size", "--workers", "--device", "--checkpoint"):
        assert opt in r.stdout


def _help_text(*cmd) -> str:
    """A command's --help with typer's box drawing and line wrapping taken out."""
    r = subprocess.run([*CLI, *cmd, "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    return " ".join(w for w in r.stdout.replace("│", " ").split())


def test_help_says_the_default_model():
    from slide_clip.config import load_config

    default = load_config().encode.model
    assert default == "quiltnet-b-32"  # the shipped config's
    assert f"Default: {default} (encode.model of the config" in _help_text("embed")
    for cmd in ("zeroshot", "fewshot", "heatmap", "search", "cluster", "map", "summarize", "view"):
        assert f"Default: the one model the stores hold" in _help_text(cmd), cmd


def _hub_unreachable_env(tmp_path) -> dict:
    """This process's environment without HF_HUB_OFFLINE, with an empty hub cache. The test
    machines have no network; on one that has, the hub endpoint is a closed local port."""
    import socket

    from slide_clip.encoders.hub import hub_reachable

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HUB_CACHE"] = str(tmp_path / "hf-cache")
    if hub_reachable()[0]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            env["HF_ENDPOINT"] = f"http://127.0.0.1:{sock.getsockname()[1]}"
    return env


def test_unreachable_hub_fails_at_once_with_the_checkpoint_line(tmp_path, make_slide):
    """No network and no HF_HUB_OFFLINE: a real attempt, one line naming --checkpoint, no
    minute of hub retries (the seconds are in docs/BENCHMARKS.md); HF_HUB_OFFLINE=1 the same."""
    slide, _ = make_slide("tissue_0.5", mpp=0.5)
    env = _hub_unreachable_env(tmp_path)
    for extra in ({}, {"HF_HUB_OFFLINE": "1"}):
        r = subprocess.run([*CLI, "embed", str(slide), "--out", str(tmp_path / "o"), "--model", "quiltnet-b-32"],
                           capture_output=True, text=True, timeout=120, env={**env, **extra})
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr and "Retrying" not in r.stderr, r.stderr
        assert lines[0].startswith("error: model 'quiltnet-b-32': its weights are on the Hugging Face hub "
                                   "(wisdomik/QuiltNet-B-32), which cannot be reached from here")
        assert "give the file with --checkpoint FILE" in lines[0]
        assert ("HF_HUB_OFFLINE is set" in lines[0]) == bool(extra)
        assert not (tmp_path / "o").exists()  # said before any slide was read or any folder made


def test_unreachable_hub_is_found_before_loading_and_cached_weights_still_load(tmp_path, monkeypatch):
    """The library path (a Prefect task, the scoring commands) fails the same way, and a hub
    repository already in the local cache is not refused offline."""
    from huggingface_hub import constants

    from slide_clip.encoders import hub, load_encoder, resolve_model
    from slide_clip.errors import WeightsError

    env = _hub_unreachable_env(tmp_path)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    for k in ("HF_HUB_CACHE", "HF_ENDPOINT"):
        if k in env:
            monkeypatch.setenv(k, env[k])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)  # restored after
    monkeypatch.setattr(hub, "_last", None)
    spec = resolve_model("quiltnet-b-32")
    with pytest.raises(WeightsError, match="give the file with --checkpoint FILE") as e:
        load_encoder(spec, "cpu")
    assert "cannot be reached from here" in str(e.value)
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE  # the hub client will not retry
    snap = Path(env["HF_HUB_CACHE"]) / "models--wisdomik--QuiltNet-B-32" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "open_clip_config.json").write_text("{}")
    hub.check_hub(spec)  # in the cache: left to the loader, which reads it without a request
    assert hub.hub_repos(resolve_model("random:quiltnet-b-32")) == []


def test_info_prints_metadata_table(cmu_svs, cmu_dicom):
    r = run("info", cmu_svs, cmu_dicom)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["slide", "vendor", "size", "levels"]
    assert "CMU-1-Small-Region" in lines[1] and "aperio" in lines[1] and "2220x2967" in lines[1]
    assert "0.499" in lines[1] and "dicom" in lines[2]
    r = run("info", "--json", cmu_svs)
    assert json.loads(r.stdout)["mpp_x"] == pytest.approx(0.499)


def test_info_bad_path_is_one_line():
    r = run("info", "/no/such/slide.svs")
    assert r.returncode == 1
    assert r.stderr.strip() == "error: /no/such/slide.svs: no such file or folder. Check the path."


def test_models_lists_registry():
    r = run("models")
    assert r.returncode == 0 and "quiltnet-b-32" in r.stdout and "biomedclip" in r.stdout


def test_multi_slide_run_goes_on_past_bad_slides(tmp_path, cmu_svs, make_slide, tiny_registry):
    good, _ = make_slide("tissue_0.5", mpp=0.5)
    no_mpp, _ = make_slide("no_mpp", write_mpp=None)
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"\x00" * 4096)
    out = tmp_path / "out"
    r = run("embed", good, cmu_svs, broken, no_mpp, tmp_path / "missing.svs", "--out", out,
            "--models", tiny_registry, "--model", "tiny", "--batch-size", "16", "--workers", "1",
            "--device", "cpu")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    status = dict(line.split("\t")[:2] for line in r.stdout.strip().splitlines()[1:])
    assert status == {"tissue_0.5": "ok", "CMU-1-Small-Region": "ok", "broken": "failed",
                      "no_mpp": "failed", "missing": "failed"}
    assert "no_mpp.tif: has no resolution (mpp) in its metadata" in r.stdout
    assert "--mpp" in r.stdout
    for name in ("tissue_0.5", "CMU-1-Small-Region"):
        assert SlideStore.open(out / f"{name}.zarr").is_complete("tiny")
    # the missing mpp given as a CSV override: now it runs
    csv = tmp_path / "mpp.csv"
    csv.write_text(f"slide,mpp\n{no_mpp.name},0.5\n")
    r = run("embed", no_mpp, "--out", out, "--mpp-csv", csv, "--models", tiny_registry, "--model", "tiny",
            "--workers", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert SlideStore.open(out / "no_mpp.zarr").slide["mpp_source"] == "override"


def test_unknown_model_is_one_line(tmp_path, make_slide):
    good, _ = make_slide("tissue_0.5", mpp=0.5)
    r = run("embed", good, "--out", tmp_path, "--model", "nonesuch")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: unknown model 'nonesuch'")
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_option_value_is_one_line(tmp_path, make_slide):
    good, _ = make_slide("tissue_0.5", mpp=0.5)
    r = run("embed", good, "--out", tmp_path, "--tile-size", "3")
    assert r.returncode == 2 and "tiling.tile_size" in r.stderr and "Traceback" not in r.stderr


def _rows_written(store: Path) -> int:
    meta = store / "embeddings" / "tiny" / "zarr.json"
    try:
        return int(json.loads(meta.read_text())["attributes"]["rows_written"])
    except (OSError, ValueError, KeyError):
        return 0


def test_killed_run_resumes_to_an_identical_store(tmp_path, make_slide, tiny_registry):
    scene = Scene(6000, 4000, (Region("rect", (0, 0, 6000, 4000)),))
    slide, _ = make_slide("big_tissue", mpp=0.5, scene=scene)
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "encode:\n  model: tiny\n  batch_size: 8\n  num_workers: 1\n  device: cpu\n  chunk_rows: 16\n"
        f"  registries: [{tiny_registry}]\n"
    )
    args = [slide, "--config", config, "--no-progress"]
    ref = run("embed", *args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    reference = SlideStore.open(tmp_path / "ref" / "big_tissue.zarr")
    n = reference.n_tiles
    assert n > 300

    out = tmp_path / "killed"
    store = out / "big_tissue.zarr"
    proc = subprocess.Popen([*CLI, "embed", *map(str, args), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while _rows_written(store) < 48 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _rows_written(store)
    assert 48 <= killed_at < n, f"the run was not interrupted mid-slide ({killed_at} of {n})"

    partial = SlideStore.open(store)
    assert not partial.is_complete("tiny")
    with pytest.raises(Exception, match="partial"):
        partial.embeddings("tiny")
    assert partial.embeddings("tiny", allow_partial=True).shape[0] == killed_at

    resumed = run("embed", *args, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{n - killed_at} encoded" in resumed.stderr
    final = SlideStore.open(store)
    assert final.is_complete("tiny")
    assert np.array_equal(final.coords(), reference.coords())
    a, b = final.embeddings("tiny"), reference.embeddings("tiny")
    assert not np.isnan(a).any()
    assert np.array_equal(a, b)


def test_zeroshot_heatmap_summarize_commands(tmp_path, make_slide, cmu_svs, tiny_registry):
    good, _ = make_slide("tissue_0.5", mpp=0.5)
    out = tmp_path / "out"
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"\x00" * 100)
    common = ["--models", tiny_registry]
    r = run("embed", good, cmu_svs, broken, "--out", out, *common, "--model", "tiny", "--workers", "0",
            "--device", "cpu", "--no-progress")
    assert r.returncode == 1  # the broken slide
    r = run("zeroshot", out, "--prompts", "tumour", *common)
    assert r.returncode == 0, r.stderr
    assert "ok       CMU-1-Small-Region" in r.stdout and "predicted: " in r.stdout
    # the set's name as --set takes it, and where it went
    assert "2 of 2 slides scored" in r.stdout
    assert f"score set 'tumour' (model tiny) written into the slide stores in {out}" in r.stdout
    assert f"slide summaries in {out / 'summaries' / 'tiny' / 'tumour'}" in r.stdout
    assert f"slide-clip heatmap {out} --set tumour" in r.stdout
    r = run("heatmap", out, "--set", "tumour", "--class", "tumour", "--smooth", "1")
    assert r.returncode == 0, r.stderr
    files = [Path(line) for line in r.stdout.split()]
    assert {f.name for f in files} == {"CMU-1-Small-Region_tumour.png", "CMU-1-Small-Region.geojson",
                                       "tissue_0.5_tumour.png", "tissue_0.5.geojson"}
    assert all(f.is_file() for f in files)
    fixed = {f: f.read_bytes() for f in files if f.suffix == ".png"}
    # one score set: no --set needed; the auto scale never writes over the fixed scale's pictures
    r = run("heatmap", out, "--class", "tumour", "--smooth", "1", "--scale", "auto")
    assert r.returncode == 0, r.stderr
    auto = [Path(line) for line in r.stdout.split()]
    assert {f.name for f in auto} == {"CMU-1-Small-Region_tumour_auto.png", "CMU-1-Small-Region.geojson",
                                      "tissue_0.5_tumour_auto.png", "tissue_0.5.geojson"}
    assert all(f.read_bytes() == b for f, b in fixed.items())
    folder = files[0].parent
    assert (folder / "tissue_0.5.heatmaps.json").is_file() and (folder / "tissue_0.5_auto.heatmaps.json").is_file()
    assert json.loads((folder / "tissue_0.5_auto.heatmaps.json").read_text())["files"] == [
        "tissue_0.5_tumour_auto.png", "tissue_0.5.geojson"]
    # an unknown set lists the sets as --set takes them (not model/set)
    r = run("heatmap", out / "tissue_0.5.zarr", "--set", "tumor")
    assert r.returncode == 1 and "has no score set 'tumor'" in r.stderr
    assert "give one with --set): tumour." in r.stderr and "tiny/tumour" not in r.stderr
    r = run("summarize", out)
    assert r.returncode == 0, r.stderr
    assert (out / "cohort-tumour-tiny.csv").is_file() and (out / "cohort-tumour-tiny.parquet").is_file()
    import pandas as pd

    df = pd.read_csv(out / "cohort-tumour-tiny.csv")
    assert sorted(df["slide_id"]) == ["CMU-1-Small-Region", "broken", "tissue_0.5"]
    assert df.set_index("slide_id").loc["broken", "status"] == "failed"


def test_scoring_commands_bad_input_is_one_line(tmp_path, make_slide, tiny_registry):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntemplates: ['no slot']\nclasses:\n  - {name: a, synonyms: [a]}\n  - {name: b, synonyms: [b]}\n")
    r = run("zeroshot", tmp_path, "--prompts", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith(
        f"error: {bad}: invalid prompt set: template 'no slot' must have exactly one '{{}}' slot for the class name")
    r = run("zeroshot", tmp_path / "nothing.zarr", "--prompts", "tumour")
    assert r.returncode == 1 and "nothing.zarr: is not a slide-clip store" in r.stdout
    r = run("heatmap", tmp_path / "nothing.zarr", "--set", "tumour")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    r = run("summarize", tmp_path)
    assert r.returncode == 2 and "has no slide summaries" in r.stderr
    r = run("fewshot", tmp_path, "--examples", tmp_path / "none.csv")
    assert r.returncode == 2 and "examples CSV not found" in r.stderr


def test_doctor_checks_the_installation(tmp_path, tiny_registry):
    def doctor(*args, **env):
        return subprocess.run([sys.executable, "-m", "slide_clip_flows.cli", "doctor", *map(str, args)], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})

    out = tmp_path / "out"
    r = doctor("--out", out, "--models", tiny_registry, "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()

    def line(status, name):
        found = [ln for ln in lines if ln.split()[0] == status and ln[6:].startswith(name)]
        assert found, f"no '{status} {name}' line in:\n{r.stdout}"
        return found[0]

    assert "opens with its mpp" in line("ok", "openslide")
    assert "cpu" in line("ok", "device")
    assert str(tiny_registry.parent / "tiny.pt") in line("ok", "model tiny")
    assert "not cached" in line("warn", "model quiltnet-b-32")  # no hub here: a warning, not a failure
    assert str(out) in line("ok", "zarr") and out.is_dir() and not any(out.iterdir())
    assert "temporary server" in line("ok", "prefect")
    # a registry whose checkpoint is gone warns; a Prefect server that does not answer fails
    gone = tmp_path / "gone.yaml"
    gone.write_text(tiny_registry.read_text().replace(str(tiny_registry.parent / "tiny.pt"), str(tmp_path / "x.pt")))
    r = doctor("--models", gone, "--device", "cpu", PREFECT_API_URL="http://127.0.0.1:9/api")
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert "not found: give --checkpoint" in line("warn", "model tiny")
    assert "does not answer" in line("FAIL", "prefect")
    assert "Traceback" not in r.stdout + r.stderr


# ----------------------------------------------------------------------------- option values (in-process)
def _invoke(*args):
    from typer.testing import CliRunner

    import slide_clip_flows.cli  # noqa: F401 - adds `run` to the app
    from slide_clip.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("option,value,message", [
    ("--target-mpp", "nan", "--target-mpp nan: must be a finite number greater than 0 and at most 50"),
    ("--target-mpp", "inf", "--target-mpp inf: must be a finite number greater than 0 and at most 50"),
    ("--overlap", "nan", "--overlap nan: must be a finite number at least 0 and less than 1"),
    ("--min-tissue", "inf", "--min-tissue inf: must be a finite number at least 0 and at most 1"),
    ("--tile-size", "3", "--tile-size 3: must be a whole number at least 16 and at most 4096"),
    ("--mpp", "0", "--mpp 0: must be a finite positive number of µm per level-0 pixel"),
    ("--mpp", "nan", "--mpp nan: must be a finite positive number of µm per level-0 pixel"),
    ("--mpp", "inf", "--mpp inf: must be a finite positive number of µm per level-0 pixel"),
    ("--mpp", "500", "--mpp 500: outside 0.05-80 µm per level-0 pixel"),
])
def test_bad_option_values_are_one_line_before_any_slide(tmp_path, make_slide, option, value, message):
    good, _ = make_slide("tissue_0.5", mpp=0.5)
    for command in ("embed", "run"):  # `run` says it before a server starts
        r = _invoke(command, good, "--out", tmp_path / command, "--model", "random:ViT-B-32", option, value)
        assert r.exit_code == 2, r.output
        assert r.stderr.startswith(f"error: {message}") and r.stderr.count("\n") == 1, r.stderr
        assert not (tmp_path / command).exists()  # no slide was read, nothing written


def test_unknown_random_architecture_names_the_lists(tmp_path, make_slide):
    good, _ = make_slide("tissue_0.5", mpp=0.5)
    for extra in ([], ["--tile-size", "224"]):
        r = _invoke("embed", good, "--out", tmp_path, "--model", "random:ViT-B-23", *extra)
        assert r.exit_code == 2, r.output
        text = r.stderr.strip()
        assert text.startswith("error: model 'random:ViT-B-23': unknown architecture 'ViT-B-23'"), text
        assert "did you mean ViT-B-32" in text and "slide-clip models" in text and "list_models()" in text
        assert "--tile-size" not in text and text.count("\n") == 0


# ----------------------------------------------------------------------------- options declared once
def _command():
    """The whole ``slide-clip`` command (the library's commands and the Prefect ones), as the
    console script builds it."""
    import slide_clip_flows.cli  # noqa: F401  (registers run, serve, deploy, doctor)
    from slide_clip.cli import cli_command

    return cli_command()


def test_every_command_help_has_plain_type_labels(capsys, monkeypatch):
    """Every command's --help parses, and no type shows as <list[...]> (arguments included)."""
    monkeypatch.setenv("COLUMNS", "200")
    command = _command()
    assert {"embed", "run", "serve", "deploy", "zeroshot", "survival", "map"} <= set(command.commands)
    for name in [None, *command.commands]:
        args = [name, "--help"] if name else ["--help"]
        with pytest.raises(SystemExit) as e:
            command.main(args=args, prog_name="slide-clip")
        assert e.value.code == 0, name
        text = capsys.readouterr().out
        assert "Usage: slide-clip" in text, name
        assert "<list[" not in text and "list[" not in text, (name, text)
    command.main(args=["embed", "--help"], prog_name="slide-clip", standalone_mode=False)
    text = capsys.readouterr().out
    assert "SLIDES" in text and "PATH..." in text  # the argument's name and its plain type


def test_shared_options_are_spelled_the_same_in_every_command():
    """A parameter of one name has the same flags (long and short) in every command that has
    it, and a short flag means one long flag everywhere; embed, run and serve share theirs."""
    from collections import defaultdict

    from typer.core import TyperOption

    flags, shorts = defaultdict(set), defaultdict(set)
    command = _command()
    for cmd_name, cmd in command.commands.items():
        for p in cmd.params:
            if isinstance(p, TyperOption):
                flags[p.name].add(tuple(sorted(p.opts + p.secondary_opts)))
                long = [o for o in p.opts if o.startswith("--")]
                for o in p.opts:
                    if not o.startswith("--"):
                        shorts[o].add(long[0])
    assert {k: v for k, v in flags.items() if len(v) > 1} == {}
    assert {k: v for k, v in shorts.items() if len(v) > 1} == {}

    def opts(cmd):
        return {o for p in command.commands[cmd].params for o in p.opts if isinstance(p, TyperOption)}

    shared = {"--out", "-o", "--config", "-c", "--model", "-m", "--models", "--checkpoint", "--device",
              "--workers", "--pattern"}
    for cmd in ("embed", "run", "serve"):
        assert shared <= opts(cmd), cmd
    for cmd in ("embed", "run"):
        assert {"--mpp", "--mpp-csv", "--target-mpp", "--tile-size", "--overlap", "--min-tissue",
                "--batch-size", "--precision", "--overwrite", "--force"} <= opts(cmd), cmd


@pytest.mark.parametrize("cmd", ["embed", "run"])
def test_force_is_a_hidden_alias_of_overwrite(cmd, capsys, monkeypatch):
    """--overwrite is the name; --force (run's old name) still works, sets the same value, and is
    not shown in --help."""
    monkeypatch.setenv("COLUMNS", "200")
    command = _command().commands[cmd]
    base = ["slide.tif", "--out", "out"]
    for extra, expected in (([], False), (["--overwrite"], True), (["--force"], True),
                            (["--force", "--overwrite"], True), (["--overwrite", "--force"], True)):
        assert command.make_context(cmd, base + extra).params["overwrite"] is expected, extra
    with pytest.raises(SystemExit):
        command.main(args=["--help"], prog_name=f"slide-clip {cmd}")
    text = capsys.readouterr().out
    assert "--overwrite" in text and "--force" not in text


def test_survival_names_its_score_sets_with_set_like_the_scoring_commands(capsys, monkeypatch):
    """`survival --set NAME` (repeatable, `-s`), as `heatmap`, `summarize` and `cluster` name a score
    set; the old `--scores` still parses but is not shown."""
    monkeypatch.setenv("COLUMNS", "200")
    surv = _command().commands["survival"]
    ctx = surv.make_context("survival", ["out", "--clinical", "c.csv", "--time", "t", "--event", "e",
                                         "--set", "tumour", "-s", "clusters-k3", "--scores", "old"])
    assert ctx.params["score_set"] == ["tumour", "clusters-k3"] and ctx.params["scores"] == ["old"]
    with pytest.raises(SystemExit):
        surv.main(args=["--help"], prog_name="slide-clip survival")
    text = capsys.readouterr().out
    assert "--set" in text and "--scores" not in text
