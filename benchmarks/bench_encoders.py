"""Encoder-only throughput of registry entries (tiles/s), with seeded random weights.

Random weights cost the same compute as trained ones. Tiles are random pixels at each
model's own input size, already preprocessed: this measures the model, not slide reading.

    python benchmarks/bench_encoders.py --models plip uni phikon-v2 --device cpu --batch 16 --batches 3

Prints one Markdown table row per model (paste into docs/BENCHMARKS.md with the machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def main(argv=None) -> None:
    from slide_clip.encoders import load_encoder, load_registry, model_input_size, resolve_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None, help="registry names (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=3, help="timed batches after one warm-up batch")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on a CPU")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    names = a.models or list(load_registry())
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, device {a.device}, batch {a.batch}")
    print("| model | backend | input px | embed dim | build s | tiles/s |")
    print("|---|---|---|---|---|---|")
    for name in names:
        spec = resolve_model(f"random:{name}")
        size = model_input_size(spec)
        t0 = time.perf_counter()
        enc = load_encoder(spec, device=a.device, precision=a.precision)
        build = time.perf_counter() - t0
        x = torch.rand(a.batch, 3, size, size)
        enc.encode_images(x)  # warm-up
        if enc.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.batches):
            enc.encode_images(x)
        if enc.device.type == "cuda":
            torch.cuda.synchronize()
        rate = a.batch * a.batches / (time.perf_counter() - t0)
        print(f"| {name} | {spec.backend} | {size} | {enc.embed_dim} | {build:.1f} | {rate:.1f} |", flush=True)
        del enc


if __name__ == "__main__":
    main()
