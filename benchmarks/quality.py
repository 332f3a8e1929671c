"""Method quality: cfrh against the field's baselines (DJSRH, JDSH, DGCPN) in one harness, on real data.

    python benchmarks/quality.py                                 # every method × dataset × bit length × 3 seeds
    python benchmarks/quality.py --quick                         # one cell: WIKI, 64 bits, seed 0, every method
    python benchmarks/quality.py --dataset wiki --bits 64 --seeds 1 --methods cfrh,djsrh
    python benchmarks/quality.py --jobs 2 --work bench-quality   # two processes; finished cells kept in the folder

Every method is trained by the product's own stage (:func:`cfrh.training.train`, ``method=``) from the same
cached features, with its published settings for a baseline (:mod:`cfrh.trainers`) and the ``[train]``
defaults (:class:`cfrh.estimator.TrainConfig`, no pipeline table) for cfrh unless ``--set`` says otherwise;
codes are scored with :mod:`cfrh.metrics`: mAP@all and mAP@50 under the field's rule (``hits-in-top-k``, the
``calculate_top_map`` of DJSRH/JDSH/DGCPN), image→text and text→image, relevant = shares a label, ties in
database order. Datasets, all real (``--data`` is the folder holding them, default ``../shared/data``):

``wiki``
    WIKI's shipped features (128-d SIFT BoVW images, 10-d LDA texts) through the ``wiki-mat`` reader: the 693
    listed test pairs are the queries, the 2,173 training pairs the training set and the database.
``wiki-480``
    the small-data regime: the same queries and database, training on 480 of the 2,173 training pairs
    (``default_rng(0).choice`` without replacement, the same rows for every method and seed).
``uci-mfeat``
    UCI Multiple Features through the ``mfeat`` reader: ``pix`` (240 pixel averages) as the image, ``fou``
    (76 Fourier coefficients) as the text; 400 queries, 1,600 training pairs = the database.
``mirflickr-tags``
    MIRFLICKR-25K's real tags as a two-view set (there are no image features here): the 1,386 tags of the
    cleaned 20,015-item set (``YAll``) split at random into two disjoint halves of 693 (``default_rng(0)
    .permutation(1386)``, first half = "image", second = "text"), the 24 labels ``LAll``; the field's protocol
    drawn with ``[split] method = "random", query = 2000, train = 5000, seed = 0``: 2,000 queries, 5,000
    training pairs from the database, the other 18,015 items the database.

The table gives, per dataset, method and bit length, the mean ± standard deviation over the seeds (train.seed;
the splits stay fixed) of each score and the training seconds (wall clock of the stage, one thread each); a
random-projection row (sign of a seeded Gaussian projection of the centred features) for scale. Finished cells
are appended to ``<work>/cells.jsonl`` and reused by a rerun with the same settings, so an interrupted run
continues. Before it, ``cfrh_cpu_vs_cheapest_baseline_max: <max over cells of cfrh's mean training CPU seconds ÷
the cheapest baseline's>`` (below 1: cfrh trains cheaper everywhere); last line: ``cfrh_vs_best_baseline_min:
<min over cells and both directions of cfrh's mean mAP@all ÷ the best baseline's>``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("wiki", "wiki-480", "uci-mfeat", "mirflickr-tags")
METHODS = ("cfrh", "djsrh", "jdsh", "dgcpn")
BASELINES = ("djsrh", "jdsh", "dgcpn")
BITS = (16, 32, 64, 128)
MIRFLICKR_SPLIT = {"method": "random", "query": 2000, "train": 5000, "seed": 0}
WIKI_SMALL_TRAIN = 480


# -- datasets: caches built once under <work>/cache ---------------------------------------------------------
def _copy_cache(root: Path, name: str, arrays: dict[str, np.ndarray], splits: dict[str, np.ndarray],
                request: dict):
    from cfrh.cache import FeatureCache

    if FeatureCache.exists(root, name, "precomputed"):
        cache = FeatureCache.open(root, name, "precomputed", require_complete=False)
        if cache.is_complete and cache.request == request:
            return
    cache, _ = FeatureCache.create(root, name, "precomputed", request=request, overwrite=True)
    for key, value in arrays.items():
        cache.write(key, value)
    for part, rows in splits.items():
        cache.write(f"splits/{part}", np.asarray(rows, dtype=np.int64))
    cache.finalize()


def prepare(dataset: str, data: Path, root: Path):
    """The dataset's pipeline (an in-memory one for the derived sets), its cache built under ``root`` if missing."""
    from cfrh.cache import FeatureCache, open_pipeline_cache
    from cfrh.config import Pipeline, load_pipeline
    from cfrh.extraction import extract

    if dataset in ("wiki", "uci-mfeat", "wiki-480"):
        folder = data / ("wiki" if dataset.startswith("wiki") else "uci-mfeat")
        pipe = load_pipeline(dataset.replace("-480", ""), [f"dataset.root='{folder.resolve()}'"])
        pipe.train = {}   # no [train] table: every method at its defaults
        if not FeatureCache.exists(root, pipe.name, "precomputed") or \
                not FeatureCache.open(root, pipe.name, "precomputed", require_complete=False).is_complete:
            extract(pipe, cache_root=root)
        if dataset != "wiki-480":
            return pipe
        wiki = open_pipeline_cache(pipe, root)
        train = np.sort(np.random.default_rng(0).choice(wiki.split("train"), WIKI_SMALL_TRAIN, replace=False))
        _copy_cache(root, dataset, {k: wiki.read(k) for k in ("image", "text", "labels", "ids")},
                    {"query": wiki.split("query"), "train": train, "database": wiki.split("database")},
                    request={"benchmark": dataset, "from": wiki.fingerprint, "train": WIKI_SMALL_TRAIN, "seed": 0})
        return Pipeline(name=dataset, path=None, dataset={"reader": "wiki-mat"})
    if dataset == "mirflickr-tags":
        from scipy.io import loadmat

        from cfrh.splits import make_splits

        folder = data / "mirflickr25k"
        tags = loadmat(folder / "mirflickr25k-yall.mat")["YAll"].astype(np.uint8)
        labels = loadmat(folder / "mirflickr25k-lall.mat")["LAll"].astype(np.uint8)
        order = np.random.default_rng(0).permutation(tags.shape[1])
        half = tags.shape[1] // 2
        arrays = {"image": tags[:, order[:half]], "text": tags[:, order[half:]], "labels": labels,
                  "ids": [str(i) for i in range(len(tags))]}
        request = {"benchmark": dataset, "tags": list(tags.shape), "tag_split_seed": 0, "split": MIRFLICKR_SPLIT,
                   "yall_sha256": hashlib.sha256(tags.tobytes()).hexdigest()[:16]}
        _copy_cache(root, dataset, arrays, make_splits(len(tags), MIRFLICKR_SPLIT, labels), request)
        return Pipeline(name=dataset, path=None, dataset={"reader": "mat"})
    raise SystemExit(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")


# -- one cell: train one method at one bit length and seed, score it ---------------------------------------
def score_codes(cache, codes: dict[str, np.ndarray]) -> dict[str, float]:
    from cfrh.metrics import retrieval_metrics

    labels, q, db = cache.read("labels"), cache.split("query"), cache.split("database")
    out = {}
    for direction, (src, dst) in (("i2t", ("image", "text")), ("t2i", ("text", "image"))):
        result = retrieval_metrics(codes[src][q], codes[dst][db], labels[q], labels[db], map_ks=[50])
        out[f"{direction}_map_all"] = result.mean_average_precision()
        out[f"{direction}_map50"] = result.mean_average_precision(50, rule="hits-in-top-k")
    return out


def code_digest(method: str) -> str:
    """A digest of the code that decides a method's codes, so a rerun never reuses cells of older code (the
    settings it runs with are compared as data, :func:`cell_settings`)."""
    import inspect

    from cfrh import data, estimator, model, trainers

    parts = [inspect.getsource(f) for f in (data.PairBatches, estimator.epoch_batches, model._mlp,
                                            model.ModalityAutoencoder, trainers.Trainer.spec)]
    if method == "cfrh":
        from cfrh import loss, similarity

        parts += [inspect.getsource(m) for m in (similarity, loss, model, trainers.Trainer, trainers.cfrh_step)]
    elif method != "random-projection":
        b, d = trainers.BaselineTrainer, trainers.DGCPNTrainer
        parts += [(REPO / "cfrh" / "methods" / f).read_text() for f in ("_common.py", f"{method}.py")]
        parts += [inspect.getsource(f) for f in (b.spec, b.alpha, b.target, b.codes, b.step, d.init_model, d.begin,
                                                 d.target, d.step, trainers._only)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def cell_settings(cell: dict) -> dict:
    """The settings that decide the cell's codes: TrainConfig.result_config of the method with the overrides, and
    what the loop runs with (a baseline's published settings, the epochs and batch it trains)."""
    if cell["method"] == "random-projection":
        return {}
    from cfrh.config import Pipeline, apply_overrides
    from cfrh.estimator import TrainConfig
    from cfrh.trainers import trainer_for

    pipe = apply_overrides(Pipeline(name="x", path=None), cell["overrides"])
    config = TrainConfig.from_dict({**pipe.train, "method": cell["method"], "seed": cell["seed"]})
    trainer = trainer_for(config)
    if cell["method"] == "cfrh":
        return config.result_config()
    loop = ("optimizer", "lr_image", "lr_text", "momentum", "weight_decay", "lr_schedule", "batch_size", "epochs",
            "max_steps", "image_hidden", "text_hidden", "dropout", "image_preprocess", "text_preprocess", "precision")
    return {**config.result_config(), "loop": {k: getattr(trainer.config, k) for k in loop}, **trainer.describe()}


def cell_key(cell: dict) -> str:
    if "settings" not in cell:
        cell["settings"], cell["code"] = cell_settings(cell), code_digest(cell["method"])
    return json.dumps({k: cell[k] for k in ("dataset", "method", "bits", "seed", "settings", "code")},
                      sort_keys=True)


def run_cell(cell: dict) -> dict:
    """Train and score one (dataset, method, bits, seed); returns the cell with its numbers."""
    import torch

    from cfrh.cache import open_pipeline_cache
    from cfrh.config import apply_overrides
    from cfrh.evaluation import load_codes, random_projection_codes
    from cfrh.runs import open_run
    from cfrh.training import train

    torch.set_num_threads(1)
    root, runs = Path(cell["work"]) / "cache", Path(cell["work"]) / "runs"
    pipe = prepare(cell["dataset"], Path(cell["data"]), root)
    cache = open_pipeline_cache(pipe, root)
    t0, c0 = time.perf_counter(), time.process_time()
    if cell["method"] == "random-projection":
        codes = random_projection_codes(cache, cell["bits"], cache.split("train"), seed=cell["seed"])
    else:
        overrides = [f"train.seed={cell['seed']}", "train.threads=1", *cell["overrides"]]
        pipe = apply_overrides(pipe, overrides)
        run = f"{cell['method']}-seed{cell['seed']}-{hashlib.sha256(cell_key(cell).encode()).hexdigest()[:8]}"
        train(pipe, root, bits=[cell["bits"]], run=run, runs_root=runs, method=cell["method"], resume=False)
        codes = load_codes(open_run(runs, cache, run), cache, cell["bits"])
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {**{k: v for k, v in cell.items() if k not in ("work", "data")}, **score_codes(cache, codes),
            "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "n_train": int(len(cache.split("train")))}


# -- the table ----------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict]) -> dict:
    """{(dataset, method, bits): {score: (mean, std), "n": seeds}}."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["method"], r["bits"]), []).append(r)
    out = {}
    for key, rows in groups.items():
        out[key] = {name: mean_std([r[name] for r in rows])
                    for name in ("i2t_map_all", "t2i_map_all", "i2t_map50", "t2i_map50", "seconds", "cpu_seconds")}
        out[key]["n"] = len(rows)
    return out


def markdown(summary: dict, datasets: list[str], methods: list[str], bits: list[int]) -> list[str]:
    lines = []
    for dataset in datasets:
        lines += [f"### {dataset}", "",
                  "| method | bits | mAP@all i→t | mAP@all t→i | mAP@50 i→t | mAP@50 t→i | train s | CPU s | seeds |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for method in [*methods, "random-projection"]:
            for b in bits:
                s = summary.get((dataset, method, b))
                if s is None:
                    continue
                cells = [f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in ("i2t_map_all", "t2i_map_all", "i2t_map50",
                                                                     "t2i_map50")]
                lines.append(f"| {method} | {b} | " + " | ".join(cells)
                             + f" | {s['seconds'][0]:.1f} | {s['cpu_seconds'][0]:.1f} | {s['n']} |")
        lines.append("")
    return lines


def ratios(summary: dict, datasets: list[str], bits: list[int]) -> list[tuple[str, int, str, float, str]]:
    """(dataset, bits, direction, cfrh mean ÷ best baseline mean, the best baseline) for every cell with both."""
    out = []
    for dataset in datasets:
        for b in bits:
            mine = summary.get((dataset, "cfrh", b))
            others = {m: summary[(dataset, m, b)] for m in BASELINES if (dataset, m, b) in summary}
            if mine is None or not others:
                continue
            for direction in ("i2t", "t2i"):
                key = f"{direction}_map_all"
                best = max(others, key=lambda m: others[m][key][0])
                out.append((dataset, b, direction, mine[key][0] / others[best][key][0], best))
    return out


def cpu_ratios(summary: dict, datasets: list[str], bits: list[int]) -> list[float]:
    """cfrh's mean training CPU seconds ÷ the cheapest baseline's, for every cell with both."""
    out = []
    for dataset in datasets:
        for b in bits:
            others = [summary[(dataset, m, b)]["cpu_seconds"][0] for m in BASELINES if (dataset, m, b) in summary]
            if (dataset, "cfrh", b) in summary and others:
                out.append(summary[(dataset, "cfrh", b)]["cpu_seconds"][0] / min(others))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder with wiki/, uci-mfeat/, "
                    "mirflickr25k/ (default ../shared/data)")
    ap.add_argument("--dataset", default=",".join(DATASETS), help=f"comma-separated, from {', '.join(DATASETS)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--bits", default=",".join(map(str, BITS)))
    ap.add_argument("--seeds", type=int, default=3, help="train.seed 0 .. N-1 (default 3)")
    ap.add_argument("--quick", action="store_true", help="one cell: --dataset wiki --bits 64 --seeds 1")
    ap.add_argument("--no-random-projection", action="store_true", help="leave out the random-projection rows")
    ap.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE",
                    help="overrides for the cfrh runs (repeatable); baselines keep their published settings")
    ap.add_argument("--work", default=None, help="keep caches, runs and finished cells here (default: a temporary "
                    "folder, removed at the end)")
    ap.add_argument("--jobs", type=int, default=1, help="cells trained in parallel, one process and thread each")
    ap.add_argument("--out", default=None, help="also write the Markdown table to this file")
    ap.add_argument("--table-only", action="store_true", help="train nothing: the table of the cells already "
                    "finished under --work (a cell's seeds column counts the seeds it has)")
    args = ap.parse_args()
    if args.quick:
        args.dataset, args.bits, args.seeds = "wiki", "64", 1
    datasets = [d for d in args.dataset.split(",") if d]
    methods = [m for m in args.methods.split(",") if m]
    bits = [int(b) for b in args.bits.split(",")]
    for d in datasets:
        if d not in DATASETS:
            sys.exit(f"unknown dataset {d!r}; choose from {', '.join(DATASETS)}")
    for m in methods:
        if m not in METHODS:
            sys.exit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")

    import tempfile

    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="cfrh-quality-")
        work = Path(tmp.name)
    else:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    for d in datasets:               # build every cache once, before any worker starts
        prepare(d, Path(args.data), work / "cache")
    cells = [{"dataset": d, "method": m, "bits": b, "seed": s,
              "overrides": list(args.set) if m == "cfrh" else [],
              "work": str(work), "data": str(args.data)}
             for d in datasets for m in [*methods, *([] if args.no_random_projection else ["random-projection"])]
             for b in bits for s in range(args.seeds)]
    for c in cells:
        cell_key(c)
    done_file = work / "cells.jsonl"
    done = {}
    if done_file.exists():
        for line in done_file.read_text().splitlines():
            row = json.loads(line)
            done[cell_key(row)] = row
    todo = [c for c in cells if cell_key(c) not in done]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already done in {done_file}; "
          + (f"{len(todo)} not trained (--table-only)" if args.table_only else
             f"training {len(todo)} with {args.jobs} job(s)"), file=sys.stderr, flush=True)
    if args.table_only:
        todo = []
    results = [done[cell_key(c)] for c in cells if cell_key(c) in done]
    pool = multiprocessing.get_context("spawn").Pool(args.jobs) if args.jobs > 1 else None
    try:
        for row in (pool.imap_unordered(run_cell, todo) if pool else map(run_cell, todo)):
            results.append(row)
            with done_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"  {row['dataset']:15s} {row['method']:17s} {row['bits']:4d} bits seed {row['seed']}: "
                  f"i→t {row['i2t_map_all']:.3f} t→i {row['t2i_map_all']:.3f} "
                  f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.close()
            pool.join()
    summary = summarise(results)
    lines = [f"mAP@all and mAP@50 (rule hits-in-top-k), mean ± std over the seeds (train.seed 0..{args.seeds - 1}; "
             f"the seeds column counts those finished); train s = wall seconds "
             f"of one training run (one thread; {os.cpu_count()} CPUs seen, shared with other work, so wall times "
             f"vary), CPU s = its CPU seconds", "",
             *markdown(summary, datasets, methods, bits)]
    cells_ratio = ratios(summary, datasets, bits)
    if cells_ratio:
        lines += ["cfrh mean ÷ best baseline mean, mAP@all:", "",
                  "| dataset | bits | direction | ratio | best baseline |", "|---|---:|---|---:|---|"]
        lines += [f"| {d} | {b} | {direction} | {r:.3f} | {best} |" for d, b, direction, r, best in cells_ratio]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(f"whole run {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    cost = cpu_ratios(summary, datasets, bits)
    if cost:
        print(f"cfrh_cpu_vs_cheapest_baseline_max: {max(cost):.3f}")
    if cells_ratio:
        print(f"cfrh_vs_best_baseline_min: {min(r for _, _, _, r, _ in cells_ratio):.3f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
