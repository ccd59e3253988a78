"""`slide-clip run` and the Prefect commands as a user meets them: the temporary server (its
failures, and its end when the run is killed), no telemetry, refusals without a server, the
run's options and closing lines, and the cohort tables it writes."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from slide_clip.store import SlideStore

BIN = Path(sys.executable).parent
CLI = str(BIN / "slide-clip")
REPO = Path(__file__).resolve().parents[1]
CI_VARS = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "TRAVIS", "CIRCLECI", "BUILDKITE", "TF_BUILD",
           "CODEBUILD_BUILD_ID", "BITBUCKET_COMMIT", "TEAMCITY_VERSION", "DRONE", "SEMAPHORE", "APPVEYOR",
           "BUDDY", "CI_NAME")


def _env(**extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra}
    env.pop("PREFECT_API_URL", None)
    return env


def _in_terminal(cmd, env, cwd=None, timeout=120) -> tuple[int, str]:
    """Run ``cmd`` with a pseudo-terminal as stdout and stderr (Prefect shows its notice only
    to a terminal); returns (exit code, everything printed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=env, cwd=cwd)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout), b"".join(chunks).decode(errors="replace")


def test_no_telemetry_notice_or_telemetry_and_deploy_serve_refuse_without_a_server(tmp_path):
    # A first-time user at a terminal, not in CI, who never heard of DO_NOT_TRACK.
    env = _env(PREFECT_HOME=str(tmp_path / "home"))
    for k in (*CI_VARS, "DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        env.pop(k, None)
    # control: Prefect itself (>= 3.9) shows its telemetry notice there
    code, text = _in_terminal([sys.executable, "-c", "import prefect"], {**env, "PREFECT_HOME": str(tmp_path / "c")})
    assert code == 0 and "anonymous usage data" in text, text
    # our commands: no notice, no telemetry state written, a one-line refusal
    code, text = _in_terminal([CLI, "deploy", "--pool", "gpu"], env)
    assert code == 2, text
    assert text.strip() == ("error: deploy needs a running Prefect server (a deployment on a temporary server is "
                            "lost when the command ends): start one with `prefect server start` and set "
                            "PREFECT_API_URL=http://127.0.0.1:4200/api")
    assert not (tmp_path / "home" / ".sdk_telemetry").exists()
    code, text = _in_terminal([CLI, "serve", "--watch", str(tmp_path), "--out", str(tmp_path / "o"),
                               "--cron", "0 2 * * *"], env)
    assert code == 2 and text.strip().startswith("error: serve needs a running Prefect server"), text
    assert "anonymous" not in text and len(text.strip().splitlines()) == 1
    # the server side: a server started from our commands sends no usage report
    r = subprocess.run([sys.executable, "-c", "import slide_clip_flows.cli; from prefect.settings import "
                        "get_current_settings as s; print(s().server.analytics_enabled)"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr
    # a user's own choice wins
    r = subprocess.run([sys.executable, "-c", "import slide_clip_flows.cli; from prefect.settings import "
                        "get_current_settings as s; print(s().server.analytics_enabled)"],
                       env={**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "true"}, capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.strip() == "True", r.stderr


def test_temporary_server_failures_are_one_line(tmp_path, make_slide, tiny_registry):
    slide, _ = make_slide("tissue_0.5", mpp=0.5)
    args = [CLI, "run", str(slide), "--out", str(tmp_path / "out"), "--models", str(tiny_registry),
            "--model", "tiny", "--device", "cpu"]
    # too slow: the server needs seconds to start, the timeout allows one
    r = subprocess.run(args, capture_output=True, text=True, timeout=300,
                       env=_env(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1"))
    assert r.returncode == 2, r.stderr
    *progress, error = r.stderr.strip().splitlines()  # the error is one line, after what `run` said it was doing
    assert "Traceback" not in r.stderr and progress[-1].startswith("Prefect: starting a temporary server"), r.stderr
    assert error.startswith("error: the temporary Prefect server did not answer within 1 s")
    assert "PREFECT_API_URL" in error and "retry" in error
    # cannot start: its database folder is not writable (PREFECT_HOME/db is a file)
    home = tmp_path / "home"
    home.mkdir()
    db = tmp_path / "not-a-folder"
    db.write_text("x")
    r = subprocess.run(args, capture_output=True, text=True, timeout=300,
                       env=_env(PREFECT_HOME=str(home),
                                PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{db}/prefect.db"))
    assert r.returncode == 2, r.stderr
    *progress, error = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and progress[-1].startswith("Prefect: starting a temporary server"), r.stderr
    assert error.startswith("error: the temporary Prefect server exited at start"), r.stderr
    assert "PREFECT_API_URL" in r.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.zarr"))


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_run_leaves_no_temporary_server(tmp_path, make_slide, tiny_registry):
    slide, _ = make_slide("tissue_0.5", mpp=0.5)
    proc = subprocess.Popen([CLI, "run", str(slide), "--out", str(tmp_path / "out"), "--models", str(tiny_registry),
                             "--model", "tiny", "--device", "cpu"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        url = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and url is None:
            line = proc.stderr.readline()
            assert line, "the run ended before its temporary server started"
            if line.startswith("Prefect: temporary server at "):
                url = line.split()[4]
        assert url
        servers = [c for c in _children(proc.pid)
                   if "slide_clip_flows.temporary_server" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(servers) == 1
        server = servers[0]
        import urllib.request

        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.monotonic() + 30
        while _alive(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server), "the temporary server outlived its killed run"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


@pytest.mark.slow
def test_run_options_closing_lines_and_cohort_tables(tmp_path, make_slide, tiny_registry):
    """A real run from a folder holding a user's tasks.py and flows.py: tiling, mpp and
    precision options reach the store, the last lines say where everything went, `summarize`
    makes a table per score set, and the tables' cells are plain values."""
    slide, _ = make_slide("tissue_0.5", mpp=0.5)
    work = tmp_path / "project"
    work.mkdir()
    (work / "tasks.py").write_text("raise RuntimeError('the user tasks.py was imported')\n")
    (work / "flows.py").write_text("raise RuntimeError('the user flows.py was imported')\n")
    mpp_csv = work / "mpp.csv"
    mpp_csv.write_text(f"slide,mpp\n{slide.name},0.45\n")
    r = subprocess.run([CLI, "run", str(slide), "--out", "out", "--models", str(tiny_registry), "--model", "tiny",
                        "--device", "cpu", "--workers", "0", "--precision", "fp32", "--prompts", "tumour",
                        "--prompts", "tissue_types", "--target-mpp", "1.0", "--tile-size", "112", "--overlap", "0.5",
                        "--min-tissue", "0.5", "--mpp-csv", str(mpp_csv)],
                       cwd=work, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the user" not in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert "Error logging to API" not in r.stderr
    out = work / "out"
    store = SlideStore.open(out / "tissue_0.5.zarr")
    # progress on stderr from the first seconds: the cohort, the server, the slide done; Prefect's own INFO lines only with --verbose
    err = r.stderr.splitlines()
    # after the resampling note, once the options and the inputs are checked, before the server
    first = err.index("1 slide, model tiny on cpu")
    assert first <= 1 and err[first + 1].startswith("Prefect: starting a temporary server"), err
    assert f"[1/1] ok      tissue_0.5  {store.n_tiles} tiles, {store.n_tiles} encoded" in err, err
    assert not any("| INFO" in ln for ln in err), err
    t = store.tiling
    assert (t["target_mpp"], t["tile_size"], t["overlap"], t["min_tissue"]) == (1.0, 112, 0.5, 0.5)
    assert store.slide["mpp_x"] == 0.45 and store.slide["mpp_source"] == "override"
    assert store.embedding_attrs("tiny")["precision"] == "fp32"
    # the closing lines, exactly
    tail = r.stdout.strip().splitlines()[-7:]
    assert tail == [
        f"ok       tissue_0.5  {store.n_tiles} tiles",
        "1 of 1 slide done, 0 failed",
        "store: out/tissue_0.5.zarr (QC picture out/tissue_0.5_qc.png)",
        "heatmaps: out/heatmaps/tiny/tissue_types",
        "heatmaps: out/heatmaps/tiny/tumour",
        "cohort table: out/cohort-tissue_types-tiny.csv (and .parquet)",
        "cohort table: out/cohort-tumour-tiny.csv (and .parquet)",
    ]
    for p in tail[3:5]:
        assert list((work / p.split(": ")[1]).glob("*.png"))
    # the cohort tables: classes as a plain string in the prompt file's order, embed seconds filled
    status = json.loads((out / "status" / "tissue_0.5.json").read_text())
    for name in ("tumour", "tissue_types"):
        df = pd.read_csv(out / f"cohort-{name}-tiny.csv")
        classes = [c["name"] for c in yaml.safe_load((REPO / "configs" / "prompts" / f"{name}.yaml").read_text())["classes"]]
        assert df.loc[0, "classes"] == ";".join(classes)
        assert df.loc[0, "seconds_embed"] == status["extra"]["seconds_embed"] > 0
        assert pd.read_parquet(out / f"cohort-{name}-tiny.parquet").loc[0, "classes"] == ";".join(classes)
    # summarize the folder: one table per score set, instead of an error
    for f in out.glob("cohort-*"):
        f.unlink()
    r = subprocess.run([CLI, "summarize", "out"], cwd=work, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "== tissue_types (tiny): 1 slide" in r.stdout and "== tumour (tiny): 1 slide" in r.stdout
    assert sorted(f.name for f in out.glob("cohort-*")) == [
        "cohort-tissue_types-tiny.csv", "cohort-tissue_types-tiny.parquet",
        "cohort-tumour-tiny.csv", "cohort-tumour-tiny.parquet"]
    r = subprocess.run([CLI, "summarize", "out", "--set", "tumour"], cwd=work, capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0 and "tissue_types" not in r.stdout
    # heatmaps: fixed 0-1 by default, or stretched to the slide's range
    r = subprocess.run([CLI, "heatmap", "out", "--set", "tumour", "--scale", "auto"], cwd=work,
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([CLI, "heatmap", "out", "--set", "tumour", "--scale", "wide"], cwd=work,
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "scale" in r.stderr


@pytest.mark.usefixtures("prefect_harness")
def test_slide_failing_at_scoring_keeps_its_store_and_tiles(tmp_path, make_slide, cfg):
    from slide_clip_flows.process_cohort import process_cohort

    slide, _ = make_slide("tissue_0.5", mpp=0.5)
    bad = tmp_path / "bad_prompts.yaml"
    bad.write_text("name: bad\nclasses: []\n")
    out = tmp_path / "out"
    r = process_cohort(slides=[str(slide)], out=str(out), config=cfg, prompts=["tumour", str(bad)])
    [s] = r["slides"]
    assert s["status"] == "failed" and str(bad) in s["error"]
    store = SlideStore.open(out / "tissue_0.5.zarr")
    assert store.is_complete("tiny")
    status = json.loads((out / "status" / "tissue_0.5.json").read_text())
    assert status["store"] == str(out / "tissue_0.5.zarr") and status["n_tiles"] == store.n_tiles > 0
    assert status["extra"]["seconds_embed"] > 0
    # the table of the set that did score lists the slide with its embedding time
    df = pd.read_csv(r["tables"]["tumour"]["csv"])
    assert df.loc[0, "seconds_embed"] == status["extra"]["seconds_embed"]


def test_heatmap_value_range():
    from slide_clip.heatmap import overlay, value_range

    rng = np.random.default_rng(0)
    vmap = rng.uniform(0.4, 0.45, size=(20, 30))
    vmap[:, :5] = np.nan
    mask = np.ones_like(vmap, bool)
    mask[:3] = False
    vmap[0, 10] = 0.99  # outside tissue: ignored
    inside = vmap[3:, 5:]
    assert value_range(vmap, mask, "fixed") == (0.0, 1.0)
    assert value_range(vmap, mask, "auto") == (float(inside.min()), float(inside.max()))
    lo, hi = value_range(np.full((4, 4), 0.3), np.ones((4, 4), bool), "auto")
    assert lo < 0.3 < hi and hi - lo == pytest.approx(1e-3)
    # stretched: the slide's maximum gets the colormap's top colour
    from matplotlib import colormaps

    thumb = np.full((20, 30, 3), 255, np.uint8)
    img = overlay(thumb, mask, vmap, "viridis", 1.0, *value_range(vmap, mask, "auto"))
    r, c = np.unravel_index(np.nanargmax(np.where(mask, vmap, np.nan)), vmap.shape)
    top = np.asarray(colormaps["viridis"](1.0)[:3]) * 255
    assert np.abs(img[r, c].astype(float) - top).max() <= 1.0
    # and the fixed scale gives that tile a mid-scale colour instead
    img = overlay(thumb, mask, vmap, "viridis", 1.0, 0.0, 1.0)
    assert np.abs(img[r, c].astype(float) - top).max() > 50


def test_qc_picture_title_and_visible_tile_outlines(tmp_path, make_slide, cfg):
    from PIL import Image

    from slide_clip.pipeline import tiles_stage, tissue_stage

    slide, _ = make_slide("tissue_0.5", mpp=0.5)
    store_path = tissue_stage(slide, tmp_path, cfg)
    n = tiles_stage(store_path, cfg)
    store = SlideStore.open(store_path)
    thumb = store.thumbnail()
    qc = np.asarray(Image.open(tmp_path / "tissue_0.5_qc.png").convert("RGB")).astype(int)
    band = qc.shape[0] - thumb.shape[0]
    assert qc.shape[1] == thumb.shape[1] and band >= 15
    title = qc[:band]
    assert (title.sum(axis=2) < 150).sum() > 50, "no dark text in the title band"
    assert (title.sum(axis=2) > 700).mean() > 0.8, "the title band is not white"
    # the title's facts, as the store records them
    from slide_clip.pipeline import grid_from_store, qc_title

    area = store.group["tissue"].attrs["tissue_area_mm2"]
    assert qc_title(store.slide, grid_from_store(store), n, area) == (
        f"tissue_0.5  |  slide 0.5 µm/px (metadata)  |  {n} tiles of 224 px at 0.5 µm/px  |  tissue {area:.2f} mm²")
    # every kept tile's top edge is drawn in a colour far from any stained tissue pixel
    pic = qc[band:]
    t = store.tiling
    ds = store.group["tissue"].attrs["downsample"]
    # stained tissue: the mask less its outermost pixels (the mask reaches the blurred rim of
    # tissue edges, glass-coloured pixels of a few µm; the outline must stand out from the stain)
    from scipy.ndimage import binary_erosion

    tissue_px = thumb[binary_erosion(store.mask(), iterations=4)].astype(int)
    luma = np.array([0.2126, 0.7152, 0.0722])
    for x, y in store.coords()[:: max(1, n // 20)]:
        cx, cy = int((x + t["tile_extent_level0"][0] / 2) / ds[0]), int(y / ds[1])
        edge = pic[cy, cx]
        assert np.abs(tissue_px - edge).sum(axis=1).min() > 200, (edge, (x, y))
        # and brighter than 99% of the (purple and pink) tissue: it never sinks into the stain
        assert edge @ luma > np.percentile(tissue_px @ luma, 99) + 20, (edge, (x, y))


def test_flow_mpp_csv_matches_assigned_slide_ids_like_embed(tmp_path):
    """--mpp-csv rows keyed by an assigned id (``a__x`` for colliding stems) reach the cohort flow's slides."""
    from slide_clip.manifest import CohortSlide
    from slide_clip_flows.process_cohort import _with_mpp

    csv_file = tmp_path / "mpp.csv"
    csv_file.write_text("slide,mpp\na__x,0.25\nb__x,0.5\n")
    cohort = [CohortSlide(str(tmp_path / "a" / "x.svs"), name="a__x"),
              CohortSlide(str(tmp_path / "b" / "x.svs"), name="b__x"),
              CohortSlide(str(tmp_path / "c" / "y.svs"), name="y", mpp=0.3)]
    got = _with_mpp(cohort, None, str(csv_file))
    assert [c.mpp for c in got] == [0.25, 0.5, 0.3]  # y: no row, its manifest mpp stays
    assert [c.mpp for c in _with_mpp(cohort, 1.0, str(csv_file))] == [1.0, 1.0, 1.0]  # --mpp wins
