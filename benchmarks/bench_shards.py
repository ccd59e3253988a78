"""Flow overhead per slide and encoder idle time between slides, by orchestration mode.

A cohort of small synthetic JPEG slides goes through ``slide-clip run`` with the tiny test
encoder (weights saved to a file). Every slide's status file records the wall-clock window in
which it held the device (``extra.encode_window``); the encoder's idle time between slides is
the gap from one slide's window end to the next window's start, in start order.

Modes (``--modes``):

* ``inprocess``: ``slide-clip run`` as it is (shards as in-process flow runs; before issue 21:
  one per-slide subflow per slide);
* ``deployment``: a real ``prefect server``, a process work pool with one ``prefect worker``,
  ``slide-clip deploy`` and ``slide-clip run --deployment`` (shard runs on the pool);
* ``embed``: ``slide-clip embed`` (no Prefect at all), the floor.

``--device cuda`` (when a GPU machine is lent) runs the same cohort on the GPU and adds tiles/s
and GPU busy % (nvidia-smi), for one device and for ``--devices all``.

Results are printed as JSON (and written to ``--json``); docs/BENCHMARKS.md records them with
the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_datapath as bd  # noqa: E402 - synthetic JPEG slides, the tiny registry
import bench_embed as be  # noqa: E402 - machine info


def cohort(work: Path, n: int, tiles: tuple[int, int]) -> Path:
    cx, cy = tiles
    cw, ch = (9 + cx + 2) * be.TILE_L0, (7 + cy + 2) * be.TILE_L0
    folder = work / "slides" / f"shards_{n}_t{cx}x{cy}"
    for k in range(n):
        bd.make_jpeg_slide(work, cw, ch, cx, cy, f"shards_{n}_t{cx}x{cy}/s{k:03d}")
    return folder


def _env(home: Path, api: str | None = None) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    if api:
        env["PREFECT_API_URL"] = api
    return env


def windows(out: Path) -> list[tuple[float, float, str, float]]:
    """(start, end, slide, ready_at) of every slide's device window, from the status files
    (``ready_at``: when the slide's preparation ended; the window's start if not recorded)."""
    got = []
    for p in sorted((out / "status").glob("*.json")):
        d = json.loads(p.read_text())
        extra = d.get("extra") or {}
        w = extra.get("encode_window")
        if w:
            got.append((float(w[0]), float(w[1]), d.get("name"), float(extra.get("ready_at") or w[0])))
    return sorted(got)


def _stats(name: str, xs: list[float]) -> dict:
    return {f"{name}_median_s": round(statistics.median(xs), 3) if xs else None,
            f"{name}_mean_s": round(statistics.fmean(xs), 3) if xs else None,
            f"{name}_max_s": round(max(xs), 3) if xs else None}


def summarise(out: Path, wall: float, n: int) -> dict:
    ws = windows(out)
    gaps = [b[0] - a[1] for a, b in zip(ws, ws[1:])]
    # the gap split: waiting for the next slide's preparation (tissue, grid, store), then the
    # executor's own hand-off from one slide to the next, which was ready
    waiting = [max(0.0, b[3] - a[1]) for a, b in zip(ws, ws[1:])]
    handoff = [g - w for g, w in zip(gaps, waiting)]
    busy = sum(w[1] - w[0] for w in ws)
    span = (ws[-1][1] - ws[0][0]) if ws else float("nan")
    return {"slides": n, "windows": len(ws), "wall_s": round(wall, 2),
            "encoder_span_s": round(span, 2), "encoder_busy_s": round(busy, 2),
            **_stats("idle_between_slides", gaps), **_stats("waiting_for_preparation", waiting),
            **_stats("handoff", handoff),
            "next_slide_ready_share": round(sum(w == 0 for w in waiting) / len(waiting), 3) if waiting else None,
            "overhead_per_slide_s": round((wall - busy) / n, 3),
            "encoding_per_slide_s": round(busy / max(1, len(ws)), 3)}


def run_cli(args: list[str], env: dict, log: Path) -> float:
    exe = Path(sys.executable).with_name("slide-clip")
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        r = subprocess.run([str(exe), *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"slide-clip {' '.join(args)} failed:\n{log.read_text()[-4000:]}")
    return wall


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mode_inprocess(folder: Path, out: Path, tiny: list[str], extra: list[str]) -> dict:
    wall = run_cli(["run", str(folder), "--out", str(out), *tiny, "--no-heatmaps", *extra],
                   _env(out.parent / f"{out.name}_home"), out.parent / f"{out.name}.log")
    return summarise(out, wall, len(list(folder.glob("*.tif"))))


def mode_embed(folder: Path, out: Path, tiny: list[str]) -> dict:
    wall = run_cli(["embed", str(folder), "--out", str(out), *tiny, "--no-progress"],
                   _env(out.parent / f"{out.name}_home"), out.parent / f"{out.name}.log")
    res = summarise(out, wall, len(list(folder.glob("*.tif"))))
    return res


def mode_deployment(folder: Path, out: Path, tiny: list[str], extra: list[str], deployment: str) -> dict:
    """A real server, a process pool with one worker, the shard deployment, `run --deployment`."""
    home = out.parent / f"{out.name}_home"
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env(home, api)
    prefect = str(Path(sys.executable).with_name("prefect"))
    procs = []
    try:
        procs.append(subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                      env={**env, "PREFECT_API_URL": ""}, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        import urllib.request

        for _ in range(240):
            try:
                urllib.request.urlopen(f"{api}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        run_cli(["deploy", "--pool", "bench-pool"], env, out.parent / f"{out.name}.deploy.log")
        procs.append(subprocess.Popen([prefect, "worker", "start", "--pool", "bench-pool", "--limit", "1"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wall = run_cli(["run", str(folder), "--out", str(out), *tiny, "--no-heatmaps", "--deployment",
                        deployment, *extra], env, out.parent / f"{out.name}.log")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
    return summarise(out, wall, len(list(folder.glob("*.tif"))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/slideclip-bench-shards"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--modes", default="embed,inprocess,deployment")
    ap.add_argument("--slides", type=int, default=50)
    ap.add_argument("--tiles", default="4x3", help="tissue block of each slide, tiles")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--extra", default="", help="more options for `run`, e.g. '--concurrency 3'")
    ap.add_argument("--deployment", default="process-shard/process-shard",
                    help="the deployment `slide-clip deploy` registers")
    a = ap.parse_args(argv)
    w = a.workdir
    w.mkdir(parents=True, exist_ok=True)
    folder = cohort(w, a.slides, tuple(map(int, a.tiles.split("x"))))
    reg = bd.tiny_registry(w)
    tiny = ["--models", str(reg), "--model", "tiny", "--device", a.device, "--precision", "fp32", "--workers", "0"]
    extra = a.extra.split() if a.extra else []
    res: dict = {"machine": be.machine_info(2), "load_before": os.getloadavg(), "args": vars(a) | {"workdir": str(w)}}
    for mode in a.modes.split(","):
        out = w / f"out_{mode}"
        if out.exists():
            shutil.rmtree(out)
        if mode == "embed":
            res[mode] = mode_embed(folder, out, tiny)
        elif mode == "inprocess":
            res[mode] = mode_inprocess(folder, out, tiny, extra)
        elif mode == "deployment":
            res[mode] = mode_deployment(folder, out, tiny, extra, a.deployment)
        else:
            raise SystemExit(f"unknown mode {mode}")
        res[mode]["load_after"] = os.getloadavg()
        print(mode, json.dumps(res[mode], indent=1), flush=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
