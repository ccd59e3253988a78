"""Faults: kill -9 at random points of `embed` and `run`, a full file system, a read-only
output folder, and concurrent writers on one store. After each, a rerun gives the same
stores as an uninterrupted run; nothing finished is ever lost."""

from __future__ import annotations

import contextlib
import json
import os
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
    from slide_clip.slide import find_slides

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


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_full_disk_gives_a_clear_error_and_a_clean_rerun(fault_inputs, embed_reference, tmp_path):
    from slide_clip.config import load_config
    from slide_clip.pipeline import embed_slides
    from slide_clip.slide import find_slides

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
