"""Training throughput of the 64-bit CFRH model on a MIRFLICKR-sized cache, against the machine's sgemm.

    python benchmarks/train.py              # 3 epochs of the mirflickr25k pipeline's [train] settings, 64 bits
    python benchmarks/train.py --sweep      # also: threads, batch size, precision, fused vs unfused optimiser

The cache (in a temporary folder) has MIRFLICKR-25K's 20,015 items: 512-d random unit vectors as image
features (CLIP ViT-B/32's width; compute does not depend on the values), the real 1,386-d tag BoW rows of
``../shared/data/mirflickr25k/mirflickr25k-yall.mat`` as text, and the pipeline's own split (5,000 training
pairs). Everything below is measured in the same run, with the same threads:

* ``cfrh.training.train`` for --epochs epochs: seconds per epoch (the median; the time of the batches alone,
  from the run history) and training pairs/s; the wall time of the whole call (checkpoints, code emission) too;
* matmul FLOPs of one training step, forward and backward (``torch.utils.flop_counter``), hence GFLOP/s;
* sgemm GFLOP/s: ``torch.matmul`` of 4,096² float32 matrices, best of --reps.

The last line is ``train_vs_sgemm: <achieved matmul GFLOP/s / sgemm GFLOP/s>``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.io as sio
import torch
from torch.utils.flop_counter import FlopCounterMode

from cfrh.cache import FeatureCache, feature_key
from cfrh.config import load_pipeline
from cfrh.loss import LossWeights
from cfrh.model import CFRHModel, FeatureStats, ModelSpec
from cfrh.runs import RunStore
from cfrh.splits import make_splits
from cfrh.estimator import TrainConfig, auto_threads, available_threads, make_optimizer, training_step
from cfrh.training import train

YALL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mirflickr25k" / "mirflickr25k-yall.mat"
BITS = 64


def sgemm_gflops(n: int = 4096, reps: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def build_cache(root: str, pipeline, tags: np.ndarray) -> FeatureCache:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((len(tags), 512)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    key = feature_key(pipeline.features.get("image_model", "precomputed"))
    cache, _ = FeatureCache.create(root, pipeline.name, key, request={"benchmark": "train"})
    cache.write("image", image.astype(np.float16))
    cache.write("text", tags.astype(np.uint8))
    cache.write("ids", [str(i) for i in range(len(tags))])
    for name, rows in make_splits(len(tags), pipeline.split).items():
        cache.write(f"splits/{name}", rows)
    cache.finalize()
    return FeatureCache.open(root, pipeline.name, key)


def step_setup(config: TrainConfig, image: torch.Tensor, text: torch.Tensor):
    torch.manual_seed(0)
    model = CFRHModel(ModelSpec(image.shape[1], text.shape[1], BITS, config.image_hidden, config.text_hidden,
                                config.dropout, config.image_preprocess, config.text_preprocess))
    model.set_feature_stats(FeatureStats.of(image), FeatureStats.of(text))
    weights = LossWeights(config.w_intra, config.w_cross, config.w_recon, config.w_pair)
    return model, make_optimizer(model, config), weights


def step_flops(config: TrainConfig, image: torch.Tensor, text: torch.Tensor) -> int:
    """Matmul FLOPs (forward + backward, similarity included) of one training step of a full batch."""
    model, optimizer, weights = step_setup(config, image, text)
    b = config.batch_size
    with FlopCounterMode(display=False) as counter:
        training_step(model, optimizer, image[:b], text[:b], 1.0, config, weights)
    return counter.get_total_flops()


def step_pairs_per_second(config: TrainConfig, image: torch.Tensor, text: torch.Tensor, steps: int = 12,
                          fused: bool = True) -> float:
    """Training pairs/s of the bare step loop (median step), for the --sweep table."""
    model, optimizer, weights = step_setup(config, image, text)
    if not fused:  # the same optimiser with its per-formula (unfused) implementation
        groups = [{**g, "fused": False, "foreach": False} for g in optimizer.param_groups]
        optimizer = type(optimizer)(groups, lr=config.lr_image)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(len(image), config.batch_size, replace=False))
        times.append(_timed(lambda: training_step(model, optimizer, image[idx], text[idx], 1.0, config, weights)))
    return config.batch_size / statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: as cfrh train picks them, the idle cores this process may use)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="train.KEY=VALUE")
    ap.add_argument("--sweep", action="store_true", help="also compare threads, batch sizes, precision, optimiser")
    args = ap.parse_args()
    if not YALL.exists():
        sys.exit(f"{YALL}: the MIRFLICKR-25K tag matrix is needed (the benchmark reads it from ../shared)")

    threads = args.threads or auto_threads()
    pipeline = load_pipeline("mirflickr25k", [*args.overrides, f"train.epochs={args.epochs}",
                                              f"train.threads={threads}", f"train.bits=[{BITS}]"])
    config = TrainConfig.from_dict(pipeline.train)
    tags = sio.loadmat(str(YALL))["YAll"]
    torch.set_num_threads(threads)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"threads {threads} (load average before: {load}; other busy processes slow multi-threaded torch a lot)")
    print(f"model: image 512→{config.image_hidden}→{BITS}, text {tags.shape[1]}→"
          f"{config.text_hidden}→{BITS} (+ mirrored decoders), batch {config.batch_size}, {config.optimizer}, "
          f"{config.precision}")

    with tempfile.TemporaryDirectory(prefix="cfrh-bench-train-") as root:
        cache = build_cache(root, pipeline, tags)
        rows = cache.split("train")
        image = torch.from_numpy(cache.read("image", rows).astype(np.float32))
        text = torch.from_numpy(cache.read("text", rows).astype(np.float32))
        sgemm_before = sgemm_gflops(reps=args.reps)
        t0 = time.perf_counter()
        summary = train(pipeline, root, bits=[BITS], run="bench", resume=False, runs_root=f"{root}/runs")
        wall = time.perf_counter() - t0
        sgemm = max(sgemm_before, sgemm_gflops(reps=args.reps))
        history = RunStore.of(f"{root}/runs", cache, "bench").info()["history"][str(BITS)]

    epoch_s = statistics.median(h["seconds"] for h in history)
    steps = len(rows) // config.batch_size
    flops = step_flops(config, image, text)
    achieved = flops * steps / epoch_s / 1e9
    print(f"training pairs {len(rows):,} ({steps} steps of {config.batch_size}); cache items {len(tags):,}")
    per_epoch = ", ".join(f"{h['seconds']:.3f}" for h in history)
    print(f"seconds/epoch {epoch_s:.3f} (epochs: {per_epoch})")
    print(f"pairs/s {len(rows) / epoch_s:,.0f}")
    print(f"train() wall {wall:.2f} s for {args.epochs} epochs (with per-epoch checkpoints and hashing "
          f"{len(tags):,} items)")
    print(f"matmul GFLOP/step {flops / 1e9:.2f}; achieved {achieved:.1f} GFLOP/s; sgemm {sgemm:.1f} GFLOP/s")
    loss = summary["bits"][str(BITS)]["loss"]
    print("final loss terms: " + " ".join(f"{k} {loss[k]:.4f}" for k in ("intra", "cross", "recon", "pair", "total")))

    if args.sweep:
        print("\nstep loop pairs/s (median of 10 steps):")
        variants = [("as configured", {}, True), ("unfused Adam", {}, False)]
        variants += [(f"batch {b}", {"batch_size": b}, True) for b in (64, 256, 512) if b != config.batch_size]
        variants += [(f"precision {p}", {"precision": p}, True) for p in ("float32", "bfloat16")
                     if p != config.precision]
        for label, change, fused in variants:
            cfg = dataclasses.replace(config, **change)
            print(f"  {label:<22} {step_pairs_per_second(cfg, image, text, fused=fused):8.0f}")
        for n in sorted({1, threads, available_threads()}):
            torch.set_num_threads(n)
            print(f"  threads {n:<14} {step_pairs_per_second(config, image, text):8.0f}   "
                  f"(sgemm {sgemm_gflops(reps=args.reps):.1f} GFLOP/s)")
        torch.set_num_threads(threads)

    print(f"train_vs_sgemm: {achieved / sgemm:.3f}")


if __name__ == "__main__":
    main()
