"""Against a real `prefect server start` on loopback: a scheduled watch deployment, and two
workers of one work pool sharing a cohort."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from slide_clip.store import SlideStore

PY = sys.executable
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout, what, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            assert p.poll() is None, f"{p.args[:4]} exited with {p.returncode} while waiting for {what}"
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server on 127.0.0.1 with its own home; yields the env clients need."""
    home = tmp_path_factory.mktemp("prefect_server_home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy():
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        _wait(healthy, 180, "the Prefect server to answer", [proc])
        yield {**env, "PREFECT_API_URL": url, "PREFECT_RUNNER_POLL_FREQUENCY": "2",
               "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    finally:
        _stop(proc)
        log.close()


def _api(env, path, body):
    req = urllib.request.Request(env["PREFECT_API_URL"] + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _status(out: Path, sid: str):
    try:
        return json.loads((out / "status" / f"{sid}.json").read_text())
    except (OSError, ValueError):
        return None


def test_scheduled_watch_processes_a_new_slide_once(server, tmp_path, make_slide, tiny_registry):
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen(
        [PY, "-m", "slide_clip_flows.cli", "serve", "--watch", str(watch), "--out", str(out), "--interval", "15",
         "--name", "watch-test", "--models", str(tiny_registry), "--model", "tiny", "--workers", "0",
         "--device", "cpu", "--settle", "3"],
        env=server, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        src, _ = make_slide("tissue_0.5", mpp=0.5)
        shutil.copy(src, watch / "dropped.tif")
        first = _wait(lambda: (s := _status(out, "dropped")) and s["status"] != "failed" and s,
                      300, "a scheduled run to process the dropped slide", [serve])
        assert first["status"] == "ok" and first["encoded"] > 0, first
        finished = SlideStore.open(out / "dropped.zarr").embedding_attrs("tiny")["finished"]
        # the next scheduled run sees the slide again and leaves it alone
        again = _wait(lambda: (s := _status(out, "dropped")) and
                      s["extra"]["flow_run_id"] != first["extra"]["flow_run_id"] and s,
                      300, "the next scheduled run", [serve])
        assert again["status"] == "skipped" and again["encoded"] == 0, again
        assert SlideStore.open(out / "dropped.zarr").embedding_attrs("tiny")["finished"] == finished
        # both were scheduled runs of the served deployment (the second one's status file is
        # written just before its flow run reaches COMPLETED on the server)
        def completed():
            runs = _api(server, "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
                                                      "deployments": {"name": {"any_": ["watch-test"]}}})
            return runs if len(runs) >= 2 else None

        runs = _wait(completed, 60, "two completed scheduled runs", [serve])
        assert all(r["auto_scheduled"] for r in runs)
    finally:
        _stop(serve)
        log.close()


def test_two_workers_share_a_cohort_in_shards_each_slide_once(server, tmp_path, make_slide, tiny_registry):
    r = subprocess.run([PY, "-m", "slide_clip_flows.cli", "deploy", "--pool", "test-pool"], env=server,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "process-shard/process-shard" in r.stdout
    workers, logs = [], []
    for i in range(2):
        logs.append(open(tmp_path / f"worker{i}.log", "w"))
        workers.append(subprocess.Popen([PREFECT, "worker", "start", "--pool", "test-pool", "--limit", "1",
                                         "--name", f"worker-{i}"], env=server, stdout=logs[-1],
                                        stderr=subprocess.STDOUT, start_new_session=True))
    try:
        src, _ = make_slide("tissue_0.5", mpp=0.5)
        slides = []
        for i in range(4):
            p = tmp_path / "slides" / f"slide{i}.tif"
            p.parent.mkdir(exist_ok=True)
            shutil.copy(src, p)
            slides.append(str(p))
        out = tmp_path / "out"
        r = subprocess.run([PY, "-m", "slide_clip_flows.cli", "run", *slides, "--out", str(out), "--deployment",
                            "process-shard/process-shard", "--shard-slides", "2", "--concurrency", "2",
                            "--models", str(tiny_registry),
                            "--model", "tiny", "--workers", "0", "--device", "cpu", "--no-heatmaps"],
                           env=server, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        statuses = [_status(out, f"slide{i}") for i in range(4)]
        assert all(s["status"] == "ok" for s in statuses), statuses
        for i in range(4):
            assert SlideStore.open(out / f"slide{i}.zarr").is_complete("tiny")
        # both workers took a shard: each shard run's process is a child of the worker that ran it
        assert {s["extra"]["parent_pid"] for s in statuses} == {w.pid for w in workers}
        # one encoder at a time on this machine: the per-host limit (held by a shard run) was
        # created with one slot and the slides' encode windows never overlap, although two
        # workers ran at once
        host = statuses[0]["extra"]["host"]
        limits = _api(server, "/v2/concurrency_limits/filter", {})
        assert {(lim["name"], lim["limit"]) for lim in limits} >= {(f"slide-clip-encoder-{host}", 1)}
        windows = sorted(s["extra"]["encode_window"] for s in statuses)
        assert all(a[1] <= b[0] for a, b in zip(windows, windows[1:])), windows
        # two shard runs of two slides, every slide processed exactly once
        runs = _api(server, "/flow_runs/filter", {"deployments": {"name": {"any_": ["process-shard"]}}})
        assert len(runs) == 2 and len({s["extra"]["flow_run_id"] for s in statuses}) == 2
        per_slide = {}
        for fr in runs:
            for item in fr["parameters"]["slides"]:
                per_slide.setdefault(Path(item["path"]).stem, []).append(fr["state_type"])
        assert per_slide == {f"slide{i}": ["COMPLETED"] for i in range(4)}
    finally:
        for w in workers:
            _stop(w)
        for f in logs:
            f.close()


def test_two_workers_run_an_s3_cohort_from_the_shard_deployment(server, s3, tmp_path, make_slide, tiny_registry):
    """`run --deployment` with slides and output folder at s3:// URLs (the S3 server of
    tests/s3_server.py) on a process pool of two workers that share no folder with the run and
    hold only the credentials in their environment: the endpoint reaches the shard runs in the
    run's config (--storage-options); each worker takes a shard, every slide is encoded once
    into its store at the URL, and the run's progress lines come from the s3 folder."""
    from slide_clip.storage import objects, options

    env = {k: v for k, v in server.items() if k != options.ENV}
    env.update({**s3.credentials(), "AWS_DEFAULT_REGION": "us-east-1"})
    r = subprocess.run([PY, "-m", "slide_clip_flows.cli", "deploy", "--pool", "s3-pool", "--name", "shards-s3"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    workers, logs = [], []
    for i in range(2):
        logs.append(open(tmp_path / f"worker{i}.log", "w"))
        workers.append(subprocess.Popen([PREFECT, "worker", "start", "--pool", "s3-pool", "--limit", "1",
                                         "--name", f"s3-worker-{i}"], env=env, cwd=tmp_path, stdout=logs[-1],
                                        stderr=subprocess.STDOUT, start_new_session=True))
    try:
        src, _ = make_slide("tissue_0.5", mpp=0.5)
        bucket = s3.new_bucket()
        for i in range(2):
            s3.upload(bucket, f"slides/s{i}.tif", src)
        out = f"s3://{bucket}/out"
        r = subprocess.run([PY, "-m", "slide_clip_flows.cli", "--storage-options", f"endpoint_url={s3.endpoint}",
                            "run", f"s3://{bucket}/slides", "--out", out, "--deployment", "process-shard/shards-s3",
                            "--shard-slides", "1", "--concurrency", "2", "--models", str(tiny_registry),
                            "--model", "tiny", "--workers", "0", "--device", "cpu", "--no-heatmaps"],
                           env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        statuses = [json.loads(objects.read_bytes(f"{out}/status/s{i}.json")) for i in range(2)]
        assert [s["status"] for s in statuses] == ["ok", "ok"], statuses
        assert [s["store"] for s in statuses] == [f"{out}/s{i}.zarr" for i in range(2)]
        assert {s["extra"]["parent_pid"] for s in statuses} == {w.pid for w in workers}
        for i, s in enumerate(statuses):
            st = SlideStore.open(f"{out}/s{i}.zarr")
            assert st.is_complete("tiny") and s["encoded"] == st.n_tiles > 0
            assert st.slide["path"] == f"s3://{bucket}/slides/s{i}.tif"
        assert not list(tmp_path.glob("**/*.zarr"))  # nothing written on the workers' disk as a store
        done = sorted(ln.split()[1:3] for ln in r.stderr.splitlines() if ln.startswith("[") and "/2]" in ln)
        assert done == [["ok", "s0"], ["ok", "s1"]], r.stderr[-3000:]
    finally:
        for w in workers:
            _stop(w)
        for f in logs:
            f.close()


def _get(env, path):
    with urllib.request.urlopen(env["PREFECT_API_URL"] + path, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("pool_type", ["kubernetes", "docker"])
def test_deploy_makes_a_gpu_work_pool_and_registers_the_shard_flow_on_it(server, pool_type):
    """`deploy --pool-type kubernetes|docker`: the pool is created with the worker type's own
    job template asking for GPUs, and the shard flow is registered on it by module path."""
    pool = f"gpu-{pool_type}"
    r = subprocess.run([PY, "-m", "slide_clip_flows.cli", "deploy", "--pool", pool, "--pool-type", pool_type,
                        "--gpus", "2", "--image", "registry.example/slide-clip:1", "--name", f"shards-{pool_type}"],
                       env=server, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"deployment process-shard/shards-{pool_type} on new {pool_type} work pool {pool}" in r.stdout
    wp = _get(server, f"/work_pools/{pool}")
    assert wp["type"] == pool_type
    props = wp["base_job_template"]["variables"]["properties"]
    assert props["image"]["default"] == "registry.example/slide-clip:1"
    assert props["env"]["default"]["SLIDE_CLIP_DEVICE"] == "cuda"
    if pool_type == "kubernetes":
        assert props["gpus"]["default"] == 2
        [container] = wp["base_job_template"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
            "containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    else:
        [req] = props["container_create_kwargs"]["default"]["device_requests"]
        assert req["count"] == 2 and req["capabilities"] == [["gpu"]]
    [dep] = _api(server, "/deployments/filter", {"deployments": {"name": {"any_": [f"shards-{pool_type}"]}}})
    assert dep["work_pool_name"] == pool and dep["entrypoint"] == "slide_clip_flows.process_shard.process_shard"
    # a second deploy to the pool with another type is refused in one line
    r = subprocess.run([PY, "-m", "slide_clip_flows.cli", "deploy", "--pool", pool, "--pool-type", "process"],
                       env=server, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and f"work pool '{pool}' exists with type '{pool_type}'" in r.stderr
    assert "Traceback" not in r.stderr
