"""Host-side image feeding: how many images/s the decoding of `cfrh extract` hands to a model, per thread count.

On a GPU the model waits on the host, so the CPU cost per image is the ceiling of end-to-end images/s: this
measures the path a GPU takes when no worker processes decode (a Dask worker, a small job): the prefetch
thread with a pool of decoding threads (``cfrh.features.image.start_decoding(threads=N)``), the fast pixel
rule (DCT-scaled JPEGs, 8-bit torch resize, uint8 crops), over the 159 real COCO-MINI JPEGs (read from
../shared/data/coco-mini, each pass over them 4 times), no model. The baseline is the same decoding in one
thread, measured in the same run.

    python benchmarks/decode.py [--threads 1,2,4] [--repeat 4]

Prints images/s and CPU ms per image for each thread count, the projected ceiling for 16 cores, and last
``decode_threads_vs_one: <images/s with the most threads ÷ with one>``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO = SHARED / "data" / "coco-mini"
VIT = SHARED / "models" / "clip-vit-base-patch32"


def feed(spec, files: list[str], batch_size: int, threads: int) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of decoding every file once, in batches, through start_decoding."""
    from cfrh.features.image import start_decoding

    batches = [np.arange(s, min(s + batch_size, len(files))) for s in range(0, len(files), batch_size)]
    t0, c0 = time.perf_counter(), time.process_time()
    decoded = start_decoding(spec, files, batches, overlap=True, threads=threads)
    n = 0
    try:
        for rows, _pixels, _errors in decoded:
            n += len(rows)
    finally:
        decoded.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n / wall, cpu / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default=f"1,{os.cpu_count() or 2}", help="comma-separated thread counts")
    ap.add_argument("--repeat", type=int, default=4, help="passes over the 159 images per measurement")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    for p in (COCO, VIT):
        if not p.exists():
            sys.exit(f"benchmark data not found: {p} (the benchmark reads ../shared)")

    from cfrh.datasets import read_dataset
    from cfrh.features.image import resolve_clip

    spec = resolve_clip(str(VIT), random_init=True, local_files_only=True, preprocess="fast")
    files = [str(p) for p in read_dataset("coco", COCO).image_paths] * args.repeat
    counts = [int(t) for t in args.threads.split(",")]
    feed(spec, files[:64], args.batch_size, 1)   # warm the page cache and the imports
    rates = {}
    for threads in counts:
        best = max((feed(spec, files, args.batch_size, threads) for _ in range(2)), key=lambda r: r[0])
        rates[threads] = best
        print(f"{threads:3d} decoding thread(s): {best[0]:7.1f} images/s, {best[1] * 1e3:.2f} CPU ms per image")
    one_cpu = rates[counts[0]][1]
    print(f"{len(files)} images ({len(files) // args.repeat} COCO-MINI JPEGs × {args.repeat}), fast pixel rule, "
          f"{os.cpu_count()} CPUs seen, load average {os.getloadavg()[0]:.1f}; at {one_cpu * 1e3:.2f} CPU ms per "
          f"image, 15 decoding cores feed at most {15 / one_cpu:,.0f} images/s")
    most = max(counts)
    print(f"decode_threads_vs_one: {rates[most][0] / rates[min(counts)][0]:.2f}")


if __name__ == "__main__":
    main()
