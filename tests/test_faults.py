"""Faults: kill -9 at random points of `embed` and `run`, a full file system, a read-only
output folder, and concurrent writers on one store. After each, a rerun gives the same
stores as an uninterrupted run; nothing finished is ever lost."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import hostile_inputs as h
from slide_clip.store import SlideStore

LIB = [sys.executable, "-m", "slide_clip.cli"]
FLOWS = [sys.executable, "-m", "slide_clip_flows.cli"]
IDS = ["s1", "s2"]


def _env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": tempfile.mkdtemp(prefix="slide-clip-prefect-"),
            **extra}


@pytest.fixture(scope="session")
def prefect_url(prefect_harness):
    """The session's Prefect test server, for `run` subprocesses (no temporary server per run)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def fault_inputs(tmp_path_factory, tiny_registry):
    """Two small slides and a config that writes embeddings often (8 rows a chunk)."""
    d = tmp_path_factory.mktemp("faults")
    slides = d / "slides"
    slides.mkdir()
    for i, sid in enumerate(IDS):
        from slide_clip.synthetic import write_slide

        write_slide(slides / f"{sid}.tif", h.small_scene(0.5, 1100 + 200 * i, 900), 0.5, levels=2)
    config = d / "cfg.yaml"
    config.write_text(
        "tissue:\n  thumbnail_max_side: 512\n"
        "encode:\n  model: tiny\n  batch_size: 8\n  num_workers: 0\n  device: cpu\n  chunk_rows: 8\n"
        f"  flush_seconds: 0.01\n  registries: [{tiny_registry}]\n")
    return slides, config


def _store_state(out: Path, sid: str) -> tuple[str, int]:
    """(store status, embedding rows written) read straight from the JSON files."""
    try:
        status = json.loads((out / f"{sid}.zarr" / "zarr.json").read_text())["attributes"]["status"]
    except (OSError, ValueError, KeyError):
        status = "none"
    try:
        rows = json.loads((out / f"{sid}.zarr" / "embeddings" / "tiny" / "zarr.json").read_text())
        rows = int(rows["attributes"]["rows_written"])
    except (OSError, ValueError, KeyError):
        rows = 0
    return status, rows


def _kill_at(cmd: list[str], out: Path, reached, rng, timeout=300, env=None) -> bool:
    """Start ``cmd``, wait until ``reached(out)`` holds, wait a random instant more, kill -9 the
    whole process group. True if it was killed before finishing."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env or _env(),
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while not reached(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.05))
    alive = proc.poll() is None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return alive


def _random_point(rng):
    """A random point of the pipeline: a slide, and a stage of it (a store status, or k rows)."""
    sid = IDS[int(rng.integers(0, len(IDS)))]
    stage = ["created", "tissue", "tiled", "rows"][int(rng.integers(0, 4))]
    k = int(rng.integers(1, 40))
    order = {"none": 0, "created": 1, "tissue": 2, "tiled": 3}

    def reached(out):
        status, rows = _store_state(out, sid)
        return rows >= k if stage == "rows" else order.get(status, 0) >= order[stage]

    return reached, f"{sid}:{stage}{k if stage == 'rows' else ''}"


def _assert_same_stores(ref: Path, out: Path, scores: bool = False):
    for sid in IDS:
        a, b = SlideStore.open(ref / f"{sid}.zarr"), SlideStore.open(out / f"{sid}.zarr")
        assert b.is_complete("tiny"), sid
        for read in ("coords", "grid", "tissue_fraction", "mask", "thumbnail"):
            np.testing.assert_array_equal(getattr(a, read)(), getattr(b, read)(), err_msg=f"{sid} {read}")
        # rows resumed mid-batch may be computed in other batch compositions: float tolerance
        np.testing.assert_allclose(a.embeddings("tiny"), b.embeddings("tiny"), rtol=0, atol=1e-5)
        if scores:
            pa, _, _ = a.scores("tiny", "tumour")
            pb, _, _ = b.scores("tiny", "tumour")
            np.testing.assert_allclose(pa, pb, rtol=0, atol=1e-5)


def _rerun_in_process(slides, config, out):
    """The same `embed` again, through the library call the command line makes."""
    from slide_clip.config import load_config
    from slide_clip.pipeline import embed_slides
    from slide_clip.scan import find_slides

    results = embed_slides(find_slides([slides]), out, load_config(config), progress=False)
    assert all(r.status in ("ok", "skipped") for r in results), [r.error for r in results]


def _ok(r):
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="session")
def embed_reference(fault_inputs, tmp_path_factory):
    slides, config = fault_inputs
    ref = tmp_path_factory.mktemp("ref_embed")
    r = subprocess.run([*LIB, "embed", slides, "--config", config, "--out", ref, "--no-progress"],
                       capture_output=True, text=True, env=_env(), timeout=600)
    _ok(r)
    return ref


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_during_embed_then_rerun_equals_an_uninterrupted_run(fault_inputs, embed_reference, tmp_path,
                                                                     seed):
    slides, config = fault_inputs
    rng = np.random.default_rng(seed)
    out = tmp_path / "out"
    cmd = [*LIB, "embed", str(slides), "--config", str(config), "--out", str(out), "--no-progress"]
    reached, where = _random_point(rng)
    assert _kill_at(cmd, out, reached, rng), f"the kill at {where} came after the end"
    _rerun_in_process(slides, config, out)
    _assert_same_stores(embed_reference, out)
    for sid in IDS:
        assert json.loads((out / "status" / f"{sid}.json").read_text())["status"] in ("ok", "skipped")


@pytest.fixture(scope="session")
def run_reference(fault_inputs, tmp_path_factory, prefect_url):
    slides, config = fault_inputs
    ref = tmp_path_factory.mktemp("ref_run")
    r = subprocess.run([*FLOWS, "run", slides, "--config", config, "--out", ref, "--no-heatmaps",
                        "--concurrency", "1"], capture_output=True, text=True,
                       env=_env(PREFECT_API_URL=prefect_url), timeout=600)
    _ok(r)
    return ref


@pytest.mark.parametrize("seed", [11, 12])
def test_kill_9_during_run_then_rerun_equals_an_uninterrupted_run(fault_inputs, run_reference, tmp_path, seed,
                                                                   prefect_url):
    slides, config = fault_inputs
    rng = np.random.default_rng(seed)
    out = tmp_path / "out"
    cmd = [*FLOWS, "run", str(slides), "--config", str(config), "--out", str(out), "--no-heatmaps",
           "--concurrency", "1"]
    env = _env(PREFECT_API_URL=prefect_url)
    reached, where = _random_point(rng)
    assert _kill_at(cmd, out, reached, rng, env=env), f"the kill at {where} came after the end"
    # the same `run` again, through the flow the command line starts (in this process: no new imports)
    from slide_clip.config import load_config
    from slide_clip_flows.process_cohort import process_cohort

    result = process_cohort(slides=[str(slides)], out=str(out), config=load_config(config), heatmaps=False,
                            max_concurrency=1)
    assert result["failed"] == 0, result["slides"]
    _assert_same_stores(run_reference, out, scores=True)
    import pandas as pd

    a = pd.read_csv(run_reference / "cohort-tumour-tiny.csv").set_index("slide_id")
    b = pd.read_csv(out / "cohort-tumour-tiny.csv").set_index("slide_id")
    assert sorted(b.index) == IDS and (b["status"] == "ok").all()
    assert (a.loc[IDS, "predicted"] == b.loc[IDS, "predicted"]).all()


def test_two_device_executors_killed_mid_shard_then_rerun_equals_an_uninterrupted_run(fault_inputs, run_reference,
                                                                                      tmp_path, prefect_url):
    """`run --devices cpu,cpu`: one worker (executor) per device over the pool's queue of shards.
    Each shard's flow-run process is killed (-9) mid-encoding; the cohort reports the slides as
    not processed, and the next run of the cohort picks them up, resumes the partial stores and
    ends bit-identical to an uninterrupted single-process run. The two shards ran in two
    executor processes under two workers."""
    slides, config = fault_inputs
    out = tmp_path / "out"
    cmd = [*FLOWS, "run", str(slides), "--config", str(config), "--out", str(out), "--no-heatmaps",
           "--devices", "cpu,cpu", "--shard-slides", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                       env=_env(PREFECT_API_URL=prefect_url, SLIDE_CLIP_KILL_AT="rows-written:2"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 executors, one per device (cpu, cpu)" in r.stderr, r.stderr
    for sid in IDS:  # each shard run died after its second chunk of 8 rows
        assert _store_state(out, sid) == ("tiled", 16), _store_state(out, sid)
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith("failed") and f" {sid} " in ln)
        assert "run the cohort again" in line, r.stdout
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env(PREFECT_API_URL=prefect_url))
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_same_stores(run_reference, out, scores=True)
    statuses = {sid: json.loads((out / "status" / f"{sid}.json").read_text()) for sid in IDS}
    assert all(st["status"] == "ok" and 0 < st["encoded"] < st["n_tiles"] for st in statuses.values()), statuses
    # two shard runs, each in its own flow-run process, started by two different workers
    assert len({st["extra"]["flow_run_id"] for st in statuses.values()}) == 2
    assert len({st["extra"]["parent_pid"] for st in statuses.values()}) == 2, statuses


# ------------------------------------------------------------------------------ disk faults
@contextlib.contextmanager
def _mounted_tmpfs(where: Path, options: str):
    """A small tmpfs mounted at ``where`` (needs root: the tests run as root in CI)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for a full or read-only file system needs root")
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _pixels(png: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(png) as im:
        return np.asarray(im.convert("RGBA"))


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_full_disk_gives_a_clear_error_and_a_clean_rerun(fault_inputs, embed_reference, tmp_path):
    from slide_clip.config import load_config
    from slide_clip.pipeline import embed_slides
    from slide_clip.scan import find_slides

    slides, config = fault_inputs
    cfg = load_config(config)
    need = _du(embed_reference)
    failures = 0
    with _mounted_tmpfs(tmp_path / "small", f"size={need * 3 // 4096 * 4096 + 64 * 4096}") as disk:
        for fraction in (0.05, 0.4, 0.85):
            out = disk / "out"
            filler = disk / "filler"
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, free - int(need * fraction)))
            results = embed_slides(find_slides([slides]), out, cfg, progress=False)
            for r in results:
                if r.status == "failed":
                    failures += 1
                    assert "cannot write: no space left on the device" in r.error, r.error
                    assert str(disk) in r.error and "run the same command again" in r.error
                    assert "\n" not in r.error and "unexpected" not in r.error
            filler.unlink()  # space freed: the same command again finishes cleanly
            again = embed_slides(find_slides([slides]), out, cfg, progress=False)
            assert [r.status for r in again] != ["failed"] * len(again)
            assert all(r.status in ("ok", "skipped") for r in again), [r.error for r in again]
            _assert_same_stores(embed_reference, out)
            for sid in IDS:
                assert json.loads((out / "status" / f"{sid}.json").read_text())["status"] in ("ok", "skipped")
                # a QC picture lost to the full disk is drawn again, the same picture
                assert _pixels(out / f"{sid}_qc.png").tobytes() == _pixels(embed_reference / f"{sid}_qc.png").tobytes()
            subprocess.run(["rm", "-rf", str(out)], check=True)
        # the command line: a one-line error and exit code 1, never a traceback
        out = disk / "cli"
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * max(0, free - 8192))
        r = subprocess.run([*LIB, "embed", slides, "--config", config, "--out", out, "--no-progress"],
                           capture_output=True, text=True, env=_env(), timeout=600)
        assert r.returncode in (1, 2) and "Traceback" not in r.stdout + r.stderr
        assert "no space left on the device" in r.stdout + r.stderr
    assert failures >= 2, "the file system never filled up"


def test_read_only_out_is_one_line(fault_inputs, tmp_path):
    slides, config = fault_inputs
    with _mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        out = ro / "out"
        r = subprocess.run([*LIB, "embed", slides, "--config", config, "--out", out, "--no-progress"],
                           capture_output=True, text=True, env=_env(), timeout=600)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip() == (f"error: {out}: cannot write: the file system is read-only. "
                                    "Give a writable --out folder.")


# ------------------------------------------------------------------------------ concurrent writers
def test_concurrent_writers_on_one_store(fault_inputs, embed_reference, tmp_path, tiny_registry):
    slides, config = fault_inputs
    out = tmp_path / "out"
    cmd = [*LIB, "embed", str(slides), "--config", str(config), "--out", str(out), "--no-progress"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert "Traceback" not in so + se
        assert p.returncode in (0, 1)
        for line in so.splitlines()[1:]:
            sid, status, _, detail = line.split("\t")
            if status == "failed":  # the other process held that slide's store
                assert "is being written by another process (pid " in detail and " on host " in detail
    _rerun_in_process(slides, config, out)
    _assert_same_stores(embed_reference, out)

    # two zero-shot runs at once: both finish, the scores are whole and right
    zs = [*LIB, "zeroshot", str(out), "--prompts", "tumour", "--models", str(tiny_registry)]
    procs = [subprocess.Popen(zs, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(2)]
    for p in procs:
        so, se = p.communicate(timeout=600)
        assert p.returncode == 0 and "Traceback" not in so + se, so + se
    for sid in IDS:
        st = SlideStore.open(out / f"{sid}.zarr")
        probs, logits, attrs = st.scores("tiny", "tumour")
        clf = st.read("scores/tiny/tumour/classifier")
        expect = attrs["logit_scale"] * st.embeddings("tiny").astype(np.float64) @ clf.T.astype(np.float64)
        expect = np.exp(expect - expect.max(axis=1, keepdims=True))
        expect /= expect.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(probs, expect, atol=1e-5)


# ============================================================================== downstream of `embed`
# Scores, summaries, cohort tables, heatmaps, clusters, search, maps and bags read and write
# the stores embed made: the same faults (kill -9, a full disk, a read-only folder, damaged
# chunk files) must never leave half a score set, a silently wrong table, or a traceback,
# and a rerun must end equal to an uninterrupted run, array for array.

#: The shipped `tumour` prompt set edited (same name, other templates): scoring with it
#: replaces the stores' `tumour` score sets.
PROMPTS_V2 = """name: tumour
description: an edited copy of the shipped set, to replace its score sets
templates: ["a slide of {}.", "histology: {}."]
classes:
  - {name: tumour, synonyms: [tumour, invasive carcinoma]}
  - {name: non-tumour, synonyms: [normal tissue, stroma]}
"""


def _arrays(store: Path) -> dict[str, np.ndarray]:
    """Every array of a store (temporary groups included: a leftover shows), by path."""
    import zarr

    g = zarr.open_group(str(store), mode="r", zarr_format=3)
    return {path: node[...] for path, node in g.members(max_depth=None) if isinstance(node, zarr.Array)}


def _assert_same_arrays(ref: Path, out: Path, prefix: str = ""):
    """The stores of ``out`` hold exactly the arrays of ``ref``'s, bit for bit (NaN where NaN)."""
    for sid in IDS:
        a = {k: v for k, v in _arrays(ref / f"{sid}.zarr").items() if k.startswith(prefix)}
        b = {k: v for k, v in _arrays(out / f"{sid}.zarr").items() if k.startswith(prefix)}
        assert sorted(a) == sorted(b), (sid, sorted(set(a) ^ set(b)))
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), (sid, k)


def _same_table(ref: Path, out: Path):
    import pandas as pd

    a = pd.read_parquet(ref / "cohort-tumour-tiny.parquet").set_index("slide_id")
    b = pd.read_parquet(out / "cohort-tumour-tiny.parquet").set_index("slide_id")
    assert list(b.index) == IDS and (b["status"] == "ok").all(), b[["status", "error"]]
    assert list(b["store"]) == [f"{s}.zarr" for s in IDS]  # relative to the folder: survives moving it
    cols = [c for c in a.columns if c.split("__")[0] in ("mean_prob", "area_fraction", "slide_prob", "topk_logit")]
    assert cols and np.array_equal(a[cols].to_numpy(), b[cols].to_numpy())
    assert (a["predicted"] == b["predicted"]).all()


def _slide_prob(probs, logits, k):
    """The top-k slide probability computed here with numpy (never by the code under test)."""
    top = np.sort(logits.astype(np.float64), axis=0)[-k:].mean(axis=0)
    e = np.exp(top - top.max())
    return e / e.sum()


@pytest.fixture(scope="session")
def downstream(fault_inputs, embed_reference, tmp_path_factory):
    """The embedded stores scored with the shipped `tumour` prompts (``v1``), and a copy
    re-scored with the edited set (``v2``, uninterrupted, summarized): the reference."""
    from types import SimpleNamespace

    from slide_clip.config import load_config
    from slide_clip.prompts import load_prompts
    from slide_clip.scoring import find_stores, summarize, zeroshot

    _, config = fault_inputs
    cfg = load_config(config)
    d = tmp_path_factory.mktemp("downstream")
    prompts = d / "tumour-v2.yaml"
    prompts.write_text(PROMPTS_V2)
    v1, v2 = d / "v1", d / "v2"
    shutil.copytree(embed_reference, v1)
    assert {r["status"] for r in zeroshot(find_stores([v1]), load_prompts("tumour"), cfg)} == {"ok"}
    summarize(v1)
    shutil.copytree(v1, v2)
    assert {r["status"] for r in zeroshot(find_stores([v2]), load_prompts(prompts), cfg)} == {"ok"}
    summarize(v2)
    hashes = {load_prompts("tumour").hash: "v1", load_prompts(prompts).hash: "v2"}
    return SimpleNamespace(cfg=cfg, v1=v1, v2=v2, prompts=prompts, hashes=hashes)


def _assert_every_set_whole(out: Path, d) -> dict[str, str]:
    """After a fault: each store holds one whole `tumour` set (all of v1's arrays or all of v2's),
    no temporary set is listed, the readers (heatmaps, bags) work, and every `ok` row of the
    cohort table has its store's numbers. Returns which version each store holds."""
    from slide_clip.scoring import heatmaps, summarize
    from slide_clip.survival import open_cohort, pooled_tables

    held = {}
    for sid in IDS:
        path = out / f"{sid}.zarr"
        st = SlideStore.open(path)
        assert st.score_sets() == [("tiny", "tumour")]
        _, _, attrs = st.scores("tiny", "tumour")
        held[sid] = d.hashes[attrs["prompt_hash"]]
        ref = _arrays((d.v1 if held[sid] == "v1" else d.v2) / f"{sid}.zarr")
        now = _arrays(path)
        for k in (k for k in ref if k.startswith("scores/tiny/tumour/")):
            assert np.array_equal(now[k], ref[k], equal_nan=True), (sid, k)
        assert heatmaps(path, "tumour", d.cfg)  # never KeyError 'classes'
    assert len(pooled_tables(open_cohort(out))[0]) == len(IDS)
    df, _, _ = summarize(out)
    for _, row in df.iterrows():
        if row["status"] == "ok":
            probs, logits, _ = SlideStore.open(out / row["store"]).scores("tiny", "tumour")
            want = _slide_prob(probs, logits, int(row["k"]))
            got = [row["slide_prob__tumour"], row["slide_prob__non_tumour"]]
            np.testing.assert_allclose(got, want, rtol=1e-6)
    return held


@pytest.mark.parametrize("point", ["scores-written:1", "scores-swapped:1", "scores-written:2"])
def test_kill_9_in_zeroshot_never_leaves_half_a_score_set(downstream, tmp_path, point):
    from slide_clip.prompts import load_prompts
    from slide_clip.scoring import find_stores, summarize, zeroshot

    d = downstream
    out = tmp_path / "out"
    shutil.copytree(d.v1, out)
    r = subprocess.run([*LIB, "zeroshot", out, "--prompts", d.prompts], capture_output=True, text=True,
                       env=_env(SLIDE_CLIP_KILL_AT=point), timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    leftovers = list((out / "s1.zarr" / "scores" / "tiny").glob("~*"))
    assert leftovers if point == "scores-written:1" else True  # the new set was complete beside the old one
    held = _assert_every_set_whole(out, d)
    assert held == {"scores-written:1": {"s1": "v1", "s2": "v1"}, "scores-swapped:1": {"s1": "v2", "s2": "v1"},
                    "scores-written:2": {"s1": "v2", "s2": "v1"}}[point]
    df, _, _ = summarize(out)
    row = df.set_index("slide_id").loc["s1"]
    if point == "scores-swapped:1":  # the set is new, its summary is not: a failed row, never old numbers
        assert row["status"] == "failed" and "another version of score set 'tumour'" in row["error"]
    else:
        assert row["status"] == "ok"
    again = zeroshot(find_stores([out]), load_prompts(d.prompts), d.cfg)
    assert {r["status"] for r in again} == {"ok"}
    summarize(out)
    _assert_same_arrays(d.v2, out)  # leftovers cleaned, every array equal
    _same_table(d.v2, out)


def test_full_disk_during_zeroshot_keeps_finished_scores(downstream, tmp_path, cli):
    """A full disk while a set is replaced leaves the old set whole (not an empty group), the
    error is one line saying what to do (these commands have no --out), and after space is
    freed the same command ends equal to an uninterrupted run."""
    from slide_clip.prompts import load_prompts
    from slide_clip.scoring import find_stores, summarize, zeroshot

    d = downstream
    need = _du(d.v1)
    failures = 0
    with _mounted_tmpfs(tmp_path / "small", f"size={(need * 4 // 4096 + 64) * 4096}") as disk:
        for left in (0, 24 * 1024, 64 * 1024):  # bytes free when scoring starts
            out = disk / "out"
            shutil.copytree(d.v1, out)
            st = os.statvfs(disk)
            with open(disk / "filler", "wb") as f:
                f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - left))
            if left == 0:  # the command line: a line per store, exit 1, never a traceback
                code, stdout, _ = cli("zeroshot", out, "--prompts", d.prompts)
                assert code == 1 and stdout.count("failed ") == len(IDS), stdout
                errors = [ln for ln in stdout.splitlines() if ln.startswith("failed ")]
            else:
                errors = [r["error"] for r in zeroshot(find_stores([out]), load_prompts(d.prompts), d.cfg)
                          if r["status"] == "failed"]
            for e in errors:
                failures += 1
                assert "cannot write: no space left on the device" in e and str(disk) in e, e
                assert "Free space and run the same command again" in e and "--out" not in e, e
            (disk / "filler").unlink()
            _assert_every_set_whole(out, d)
            assert {r["status"] for r in zeroshot(find_stores([out]), load_prompts(d.prompts), d.cfg)} == {"ok"}
            summarize(out)
            _assert_same_arrays(d.v2, out)
            _same_table(d.v2, out)
            subprocess.run(["rm", "-rf", str(out)], check=True)
    assert failures >= 3, "the file system never filled up"


def test_kill_9_in_summarize_then_rerun_equals_an_uninterrupted_run(downstream, tmp_path):
    from slide_clip.scoring import summarize

    out = tmp_path / "out"
    shutil.copytree(downstream.v2, out)
    for f in out.glob("cohort-*"):
        f.unlink()
    r = subprocess.run([*LIB, "summarize", out], capture_output=True, text=True,
                       env=_env(SLIDE_CLIP_KILL_AT="cohort-csv"), timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert not list(out.glob("cohort-*"))  # never half a table: none yet (its files are whole or absent)
    summarize(out)
    _same_table(downstream.v2, out)


# ------------------------------------------------------------------------------ clusters
@pytest.fixture(scope="session")
def clustered(downstream, tmp_path_factory):
    """The v2 stores clustered (k=2) without interruption: the reference for cluster faults."""
    from slide_clip.explore.clusters import cluster

    ref = tmp_path_factory.mktemp("clustered") / "out"
    shutil.copytree(downstream.v2, ref)
    r = cluster([ref], k=2, maps=False, gallery=False)
    assert not r["failed"]
    return ref


def test_kill_9_in_cluster_then_rerun_equals_an_uninterrupted_run(clustered, downstream, tmp_path):
    import pandas as pd

    from slide_clip.explore.clusters import cluster

    out = tmp_path / "out"
    shutil.copytree(downstream.v2, out)
    r = subprocess.run([*LIB, "cluster", out, "--k", "2", "--no-maps", "--no-gallery"], capture_output=True,
                       text=True, env=_env(SLIDE_CLIP_KILL_AT="clusters-stored:1"), timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    # one store has its clusters, whole; the other none; no table yet
    assert [s.score_sets() for s in (SlideStore.open(out / f"{i}.zarr") for i in IDS)] == [
        [("tiny", "clusters-k2"), ("tiny", "tumour")], [("tiny", "tumour")]]
    assert not (out / "tables" / "tiny" / "clusters-k2.parquet").exists()
    assert not cluster([out], k=2, maps=False, gallery=False)["failed"]
    _assert_same_arrays(clustered, out)
    a, b = (pd.read_parquet(p / "tables" / "tiny" / "clusters-k2.parquet") for p in (clustered, out))
    assert a.equals(b)


def test_full_disk_in_summarize_search_cluster_and_map_is_one_line(downstream, clustered, tmp_path, cli):
    """Each command that writes beside the stores says `no space left` in one line (never a
    pyarrow, matplotlib or FAISS traceback); after space is freed, cluster ends equal to an
    uninterrupted run."""
    from slide_clip.explore.clusters import cluster

    d = downstream
    with _mounted_tmpfs(tmp_path / "small", f"size={(_du(d.v2) * 2 // 4096 + 64) * 4096}") as disk:
        out = disk / "out"
        shutil.copytree(d.v2, out)
        for f in out.glob("cohort-*"):
            f.unlink()
        x, y = SlideStore.open(out / "s1.zarr").coords()[0]
        st = os.statvfs(disk)
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize))
        for args in (["summarize", out], ["search", out, "--tile", f"s1:{x}:{y}", "--top", "3"],
                     ["search", out, "--tile", f"s1:{x}:{y}", "--build-index", "--no-gallery"],
                     ["cluster", out, "--k", "2"], ["map", out, "--method", "pca", "--per-slide", "5"],
                     ["bags", out]):
            code, stdout, stderr = cli(*args)
            lines = [ln for ln in (stdout + stderr).splitlines() if "no space left" in ln]
            assert code in (1, 2) and lines, (args, stdout, stderr)
            for ln in lines:
                assert "Free space and run the same command again" in ln and "--out" not in ln, ln
        (disk / "filler").unlink()
        assert not cluster([out], k=2, maps=False, gallery=False)["failed"]
        _assert_same_arrays(clustered, out)


def test_read_only_stores_are_one_line_errors(downstream, clustered, tmp_path, cli):
    """Every command that writes beside the stores, given a read-only folder: one line per
    failure saying the folder is read-only and what to do (no --out to give), never a traceback."""
    d = downstream
    examples = tmp_path / "examples.csv"
    s1 = SlideStore.open(d.v2 / "s1.zarr")
    c1 = s1.coords()
    examples.write_text("slide,x,y,label\n" + "".join(f"{s1.slide['path']},{x},{y},{lab}\n" for (x, y), lab in
                                                     zip(c1[:4], "aabb")))
    with _mounted_tmpfs(tmp_path / "ro", f"size={(_du(clustered) * 2 // 4096 + 64) * 4096}") as disk:
        out = disk / "out"
        shutil.copytree(clustered, out)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        x, y = c1[0]
        for args in (["zeroshot", out, "--prompts", d.prompts], ["fewshot", out, "--examples", examples],
                     ["heatmap", out, "--set", "tumour"], ["summarize", out],
                     ["search", out, "--tile", f"s1:{x}:{y}"], ["cluster", out, "--k", "2"],
                     ["map", out, "--method", "pca", "--per-slide", "5"], ["bags", out]):
            code, stdout, stderr = cli(*args)
            lines = [ln for ln in (stdout + stderr).splitlines() if "read-only" in ln]
            assert code in (1, 2) and lines, (args, stdout, stderr)
            for ln in lines:
                assert "cannot write: the file system is read-only" in ln and "--out" not in ln, ln
                assert "writes beside the stores" in ln, ln


# ------------------------------------------------------------------------------ every product of `run`
@pytest.fixture(scope="session")
def heatmap_run_reference(fault_inputs, tmp_path_factory, prefect_url):
    """`run` of one slide with heatmaps, uninterrupted (the cohort flow, in this process)."""
    from slide_clip.config import load_config
    from slide_clip_flows.process_cohort import process_cohort

    slides, config = fault_inputs
    ref = tmp_path_factory.mktemp("ref_heatmaps") / "out"
    r = process_cohort(slides=[str(slides / "s1.tif")], out=str(ref), config=load_config(config), max_concurrency=1)
    assert r["failed"] == 0
    return ref


def _products(out: Path) -> dict[str, bytes]:
    """The pictures and GeoJSON of one slide's `run` (pixels for PNGs)."""
    files = sorted(out.glob("s1_qc.png")) + sorted((out / "heatmaps").rglob("s1*"))
    return {str(f.relative_to(out)): (_pixels(f).tobytes() if f.suffix == ".png" else f.read_bytes()) for f in files
            if not f.name.endswith(".heatmaps.json")}


def test_kill_9_of_run_between_scores_and_heatmaps_then_rerun_makes_them(fault_inputs, heatmap_run_reference,
                                                                          tmp_path, prefect_url):
    """Skip-done checks every product `run` promises: heatmaps never drawn (a kill after scoring),
    a QC picture or a heatmap lost later, are drawn from the stores on the next run (never
    re-encoding), and the slide is not reported as skipped."""
    from slide_clip.config import load_config
    from slide_clip_flows.process_cohort import process_cohort

    slides, config = fault_inputs
    ref = heatmap_run_reference
    out = tmp_path / "out"
    r = subprocess.run([*FLOWS, "run", slides / "s1.tif", "--config", config, "--out", out, "--concurrency", "1"],
                       capture_output=True, text=True, env=_env(PREFECT_API_URL=prefect_url, SLIDE_CLIP_KILL_AT="scored"),
                       timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert (out / "summaries" / "tiny" / "tumour" / "s1.json").is_file() and not (out / "heatmaps").exists()

    def rerun():
        res = process_cohort(slides=[str(slides / "s1.tif")], out=str(out), config=load_config(config),
                             max_concurrency=1)
        assert res["failed"] == 0
        [s] = res["slides"]
        return s

    s = rerun()
    assert s["status"] == "ok" and s["encoded"] == 0, s  # drawn now; nothing re-encoded
    assert s["extra"]["scores"]["tumour"]["rescored"] is False and s["extra"]["scores"]["tumour"]["heatmaps"]
    assert _products(out) == _products(ref) and len(_products(ref)) == 4  # QC, 2 classes, GeoJSON
    _assert_same_arrays_of(ref, out, "s1")
    assert rerun()["status"] == "skipped"  # everything there: nothing to do
    # pictures lost later (a full disk, a deletion): drawn again, the same
    (out / "s1_qc.png").unlink()
    next((out / "heatmaps").rglob("s1_tumour.png")).unlink()
    s = rerun()
    assert s["status"] == "ok" and s["encoded"] == 0
    assert _products(out) == _products(ref)
    # the set scored again by `zeroshot` (a new version of it): the heatmaps are redrawn from it
    from slide_clip.prompts import load_prompts
    from slide_clip.scoring import zeroshot

    zeroshot([out / "s1.zarr"], load_prompts("tumour"), load_config(config))
    record = next((out / "heatmaps").rglob("s1.heatmaps.json"))
    before = json.loads(record.read_text())["write_id"]
    assert rerun()["status"] == "ok"
    assert json.loads(record.read_text())["write_id"] != before
    assert json.loads(record.read_text())["write_id"] == SlideStore.open(out / "s1.zarr").score_attrs(
        "tiny", "tumour")["write_id"]


def _assert_same_arrays_of(ref: Path, out: Path, sid: str):
    a, b = _arrays(ref / f"{sid}.zarr"), _arrays(out / f"{sid}.zarr")
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k


def test_embed_redraws_a_lost_qc_picture_without_encoding(fault_inputs, embed_reference, tmp_path):
    from slide_clip.config import load_config
    from slide_clip.pipeline import embed_slides
    from slide_clip.scan import find_slides

    slides, config = fault_inputs
    out = tmp_path / "out"
    shutil.copytree(embed_reference, out)
    (out / "s2_qc.png").unlink()
    results = {r.name: r for r in embed_slides(find_slides([slides]), out, load_config(config), progress=False)}
    assert results["s1"].status == "skipped"
    assert results["s2"].status == "ok" and results["s2"].encoded == 0
    assert _pixels(out / "s2_qc.png").tobytes() == _pixels(embed_reference / "s2_qc.png").tobytes()
    _assert_same_arrays(embed_reference, out)


# ------------------------------------------------------------------------------ damaged chunk files
#: damage to s1's store -> (how, what the one-line error says, commands that read that array)
DAMAGE = {
    "truncated embeddings": (lambda s: h.truncate_chunk(s / "embeddings" / "tiny" / "features"),
                             "a chunk file of embeddings/tiny/features cannot be read",
                             ("zeroshot", "fewshot", "search", "cluster", "map", "bags", "survival")),
    "deleted embeddings": (lambda s: h.delete_chunk(s / "embeddings" / "tiny" / "features"),
                           "embeddings for 'tiny' hold missing values", ("zeroshot", "search", "cluster", "bags")),
    "shorter embeddings": (lambda s: h.edit_shape(s / "embeddings" / "tiny" / "features",
                                                  SlideStore.open(s).n_tiles - 10),
                           "embeddings/tiny/features has shape", ("zeroshot", "search", "cluster", "map", "bags")),
    "truncated probs": (lambda s: h.truncate_chunk(s / "scores" / "tiny" / "tumour" / "probs"),
                        "a chunk file of scores/tiny/tumour/probs cannot be read",
                        ("heatmap", "summarize", "map", "bags")),
    "truncated grid": (lambda s: h.truncate_chunk(s / "tiles" / "grid"),
                       "a chunk file of tiles/grid cannot be read", ("zeroshot", "heatmap", "cluster")),
    "shorter grid": (lambda s: h.edit_shape(s / "tiles" / "grid", SlideStore.open(s).n_tiles - 3),
                     "tiles/grid has shape", ("zeroshot", "heatmap", "summarize", "search", "cluster", "map")),
    "score set without zarr.json": (lambda s: h.drop_metadata(s / "scores" / "tiny" / "tumour"),
                                    "is damaged: the score set tiny/tumour has no readable zarr.json",
                                    ("heatmap", "summarize", "map")),
    "emptied score set": (lambda s: h.emptied_score_set(s / "scores" / "tiny" / "tumour"),
                          "is damaged: the score set tiny/tumour is incomplete", ("heatmap", "summarize", "map",
                                                                                  "bags")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_chunk_is_one_line_per_store(downstream, tmp_path, cli, damage):
    """A chunk file deleted, truncated (Blosc cannot decode it) or an array whose zarr.json
    was edited: every command that reads it names the store and the array in one line;
    zero-shot, few-shot and heatmaps go on with the other store; nothing is a result."""
    how, message, readers = DAMAGE[damage]
    d = downstream
    out = tmp_path / "out"
    shutil.copytree(d.v2, out)
    s2 = SlideStore.open(out / "s2.zarr")
    x, y = s2.coords()[0]
    examples = tmp_path / "examples.csv"
    examples.write_text("slide,x,y,label\n" + "".join(f"{s2.slide['path']},{a},{b},{lab}\n" for (a, b), lab in
                                                     zip(s2.coords()[:4], "aabb")))
    clinical = tmp_path / "clinical.csv"
    clinical.write_text("patient_id,time,event\ns1,5,1\ns2,9,1\n")
    how(out / "s1.zarr")
    store = str(out / "s1.zarr")
    commands = {
        "zeroshot": ["zeroshot", out, "--prompts", d.prompts],
        "fewshot": ["fewshot", out, "--examples", examples],
        "heatmap": ["heatmap", out, "--set", "tumour"],
        "summarize": ["summarize", out],
        "search": ["search", out, "--tile", f"s2:{x}:{y}", "--top", "3", "--no-gallery"],
        "cluster": ["cluster", out, "--k", "2", "--no-maps", "--no-gallery"],
        "map": ["map", out, "--method", "pca", "--per-slide", "5", "--colour-by", "tumour"],
        "bags": ["bags", out],
        "survival": ["survival", out, "--clinical", clinical, "--time", "time", "--event", "event", "--baseline",
                     "coxnet", "--folds", "2", "--bootstrap", "5"],
    }
    for name in readers:
        code, stdout, stderr = cli(*commands[name])
        text = stdout + stderr
        hit = [ln for ln in text.splitlines() if message in ln]
        assert hit, (name, text)
        for ln in hit:  # one line naming the store, the array and what to do
            assert store in ln and ("Re-embed the slide" in ln or "Score the slide again" in ln), (name, ln)
        if name in ("zeroshot", "fewshot", "heatmap"):  # per store: the other one goes on
            assert code == 1 and ("ok       s2" in stdout or "s2_tumour.png" in stdout), (name, text)
        elif name == "summarize":  # the table says so: a failed row, never the summary's old numbers
            import pandas as pd

            t = pd.read_parquet(out / "cohort-tumour-tiny.parquet").set_index("slide_id")
            assert t.loc["s1", "status"] == "failed" and message in t.loc["s1", "error"]
            assert t.loc["s2", "status"] == "ok" and np.isnan(t.loc["s1", "slide_prob__tumour"])
        elif name == "search" and "shorter" in damage:  # a store that cannot be read is counted, never skipped
            assert code == 1 and "1 store failed" in stdout, text
        else:
            assert code in (1, 2), (name, text)



# ------------------------------------------------------------------------------ summaries and the stores
def test_summarize_reflects_the_stores_as_they_are(downstream, tmp_path):
    """The cohort table is made from the stores, not from the summary files: a deleted store, a
    lost probability chunk or a set replaced since its summary are failed rows with their
    error; paths are relative to the folder, so a moved folder's table points at its own stores."""
    import pandas as pd

    from slide_clip.scoring import summarize

    moved = tmp_path / "moved"
    shutil.copytree(downstream.v2, moved)
    df, _, _ = summarize(moved)
    assert list(df["store"]) == ["s1.zarr", "s2.zarr"] and (df["status"] == "ok").all()
    for sid in IDS:
        summary = json.loads((moved / "summaries" / "tiny" / "tumour" / f"{sid}.json").read_text())
        assert summary["store"] == f"{sid}.zarr"
    # a lost probability chunk; a deleted store
    h.delete_chunk(moved / "s1.zarr" / "scores" / "tiny" / "tumour" / "probs")
    shutil.rmtree(moved / "s2.zarr")
    df, _, _ = summarize(moved)
    t = df.set_index("slide_id")
    assert (t["status"] == "failed").all(), t
    assert "chunk files of scores/tiny/tumour/probs are missing" in t.loc["s1", "error"]
    assert f"{moved / 's2.zarr'}: is missing" in t.loc["s2", "error"]
    assert t[[c for c in t.columns if c.startswith("slide_prob__")]].isna().all().all()  # never old numbers
    assert list(pd.read_csv(moved / "cohort-tumour-tiny.csv")["status"]) == ["failed", "failed"]


def test_a_store_without_embeddings_says_to_embed(downstream, tmp_path, cli):
    out = tmp_path / "out"
    shutil.copytree(downstream.v2 / "s1.zarr", out / "s1.zarr")
    shutil.rmtree(out / "s1.zarr" / "embeddings")
    code, stdout, _ = cli("zeroshot", out, "--prompts", "tumour")
    assert code == 1 and "has no embeddings (the slide was tiled but never encoded)" in stdout, stdout
    assert "Run `slide-clip embed`" in stdout and "holds 0 models" not in stdout


def test_embeddings_replaced_beside_the_old_group_until_complete(downstream, tmp_path):
    """Embeddings of other weights (or a forced re-encode) are written beside the old group:
    until the last row, readers get the old group; an interrupted replacement resumes; once
    complete it is swapped in, and nothing temporary stays."""
    out = tmp_path / "out"
    shutil.copytree(downstream.v2 / "s1.zarr", out / "s1.zarr")
    st = SlideStore.open(out / "s1.zarr")
    old = st.embeddings("tiny")
    prov = {k: v for k, v in st.embedding_attrs("tiny").items()
            if k not in ("status", "rows_written", "n_tiles", "started", "updated", "finished")}
    new = np.roll(old, 1, axis=0)  # other weights' embeddings (any unit rows do)
    prov = {**prov, "weights_sha256": "0" * 64}
    w = st.begin_embeddings(prov, chunk_rows=8)
    w.append(new[:20])
    w.flush()  # then the process dies: 16 rows on disk beside the old group
    st = SlideStore.open(out / "s1.zarr")
    assert st.models() == ["tiny"] and np.array_equal(st.embeddings("tiny"), old)
    assert st.embedding_attrs("tiny")["weights_sha256"] != prov["weights_sha256"]
    w = st.begin_embeddings(prov, chunk_rows=8)  # a rerun resumes the replacement
    assert w.next_row == 20
    w.append(new[20:])
    w.flush()
    st = SlideStore.open(out / "s1.zarr")
    assert np.array_equal(st.embeddings("tiny"), new) and st.embedding_attrs("tiny")["weights_sha256"] == "0" * 64
    assert sorted(p.name for p in (out / "s1.zarr" / "embeddings").iterdir() if p.is_dir()) == ["tiny"]
