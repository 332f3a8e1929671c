"""Exhaustive Hamming top-k: cfrh's HammingIndex against faiss IndexBinaryFlat and a memory-bandwidth bound.

    python benchmarks/search.py            # 1,000,000 random codes, 1,000 queries, top-100, 64 and 128 bits

Everything is measured in the same run, with the same threads (all cores unless --threads):

* read bandwidth: a parallel sum over a 1 GiB array (larger than any cache), best of --reps;
* the bound: bandwidth / bytes the database occupies, i.e. the queries/s if each query had to stream the
  whole database from memory once. A batch can beat it by reusing what is in cache: cfrh's kernel reads
  the database once per tile of QUERY_TILE queries, so its bound is QUERY_TILE times higher (printed too);
* exact top-k queries/s of both indexes (best of --reps, interleaved, one batch of --queries queries);
  faiss runs in both of its modes (heap and counting, ``use_heap``) and the faster one is the baseline.
  Their distances are checked equal.
* approximate search (cfrh's IVF and HNSW kinds, both faiss underneath): queries/s and recall@k against
  exact search, on clustered codes (random codes have no neighbourhoods for an index to find).

The last line is ``search_vs_faiss_flat: <cfrh qps / faiss qps at 128 bits>``.
"""
from __future__ import annotations

import argparse
import time

import faiss
import numba
import numpy as np

from cfrh.index import QUERY_TILE, HammingIndex, recall_at_k


@numba.njit(parallel=True, cache=True)
def _parallel_sum(a: np.ndarray) -> int:
    s = np.uint64(0)
    for i in numba.prange(a.shape[0]):
        s += a[i]
    return s


def read_bandwidth(gib: float, reps: int) -> float:
    """Bytes/s of a parallel read over ``gib`` GiB (best of ``reps``)."""
    a = np.ones(int(gib * 2**30) // 8, dtype=np.uint64)
    _parallel_sum(a[:1024])
    best = min(_timed(lambda: _parallel_sum(a)) for _ in range(reps))
    return a.nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def clustered_codes(n: int, bits: int, clusters: int, flip: float, rng: np.random.Generator) -> np.ndarray:
    """Codes around ``clusters`` random centres, each bit flipped with probability ``flip``."""
    centres = rng.integers(0, 2, (clusters, bits), dtype=np.uint8)
    bitsarr = centres[rng.integers(0, clusters, n)] ^ (rng.random((n, bits)) < flip)
    return np.packbits(bitsarr, axis=1)


def exact(args: argparse.Namespace, bits: int, bandwidth: float, rng: np.random.Generator) -> float:
    db = rng.integers(0, 256, (args.n, bits // 8), dtype=np.uint8)
    queries = rng.integers(0, 256, (args.queries, bits // 8), dtype=np.uint8)
    ours = HammingIndex(bits, threads=args.threads)
    ours.add(db)
    flat = faiss.IndexBinaryFlat(bits)
    flat.add(db)
    ours.search(queries[:8], args.k)  # compile / warm up
    flat.search(queries[:8], args.k)

    times: dict[str, float] = {"cfrh": np.inf, "faiss heap": np.inf, "faiss count": np.inf}
    results = {}
    for _ in range(args.reps):
        t = time.perf_counter()
        results["cfrh"] = ours.search(queries, args.k)
        times["cfrh"] = min(times["cfrh"], time.perf_counter() - t)
        for mode, heap in (("faiss heap", True), ("faiss count", False)):
            flat.use_heap = heap
            t = time.perf_counter()
            results[mode] = flat.search(queries, args.k)
            times[mode] = min(times[mode], time.perf_counter() - t)
    for mode in ("faiss heap", "faiss count"):
        if not np.array_equal(results["cfrh"][0], results[mode][0]):
            raise SystemExit(f"{bits} bits: cfrh and {mode} distances differ; the benchmark is invalid")

    qps = {name: args.queries / t for name, t in times.items()}
    faiss_best = max(qps["faiss heap"], qps["faiss count"])
    db_bytes = db.nbytes
    print(f"\n{bits} bits, {args.n:,} codes ({db_bytes / 2**20:.1f} MiB), {args.queries:,} queries, top-{args.k}")
    print(f"  cfrh HammingIndex (flat)            {qps['cfrh']:>12,.0f} queries/s")
    print(f"  faiss IndexBinaryFlat, heap         {qps['faiss heap']:>12,.0f} queries/s")
    print(f"  faiss IndexBinaryFlat, counting     {qps['faiss count']:>12,.0f} queries/s")
    print(f"  bandwidth bound, database read once per query       {bandwidth / db_bytes:>12,.0f} queries/s")
    print(f"  bandwidth bound, once per {QUERY_TILE}-query tile (cfrh's kernel) "
          f"{QUERY_TILE * bandwidth / db_bytes:>12,.0f} queries/s")
    print(f"  cfrh / faiss (faster mode)          {qps['cfrh'] / faiss_best:>12.2f}x")
    return qps["cfrh"] / faiss_best


def approximate(args: argparse.Namespace, rng: np.random.Generator) -> None:
    bits, k = 128, args.k
    for kind, n, settings in (("ivf", args.n, [{"nprobe": p} for p in (4, 16, 64)]),
                              ("hnsw", args.hnsw_n, [{"ef_search": e} for e in (128, 512)])):
        if n <= 0:
            continue
        db = clustered_codes(n, bits, clusters=max(16, n // 250), flip=0.12, rng=rng)
        queries = clustered_codes(args.queries, bits, clusters=max(16, n // 250), flip=0.12, rng=rng)
        truth = HammingIndex(bits, threads=args.threads)
        truth.add(db)
        t_exact = _timed(lambda: truth.search(queries, k))
        exact_d, _ = truth.search(queries, k)
        ann = HammingIndex(bits, kind, threads=args.threads, seed=0)
        ann.add(db)
        build = _timed(lambda: ann.search(queries[:1], k))
        print(f"\napproximate, {kind}: {n:,} clustered 128-bit codes, top-{k}; built in {build:.1f} s "
              f"(exact: {args.queries / t_exact:,.0f} queries/s)")
        for setting in settings:
            ann.params.update(setting)
            ann.search(queries[:8], k)
            t = min(_timed(lambda: ann.search(queries, k)) for _ in range(args.reps))
            approx_d, _ = ann.search(queries, k)
            name = ", ".join(f"{a}={b}" for a, b in setting.items())
            print(f"  {name:<16} {args.queries / t:>10,.0f} queries/s   recall@{k} {recall_at_k(exact_d, approx_d):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="database codes")
    parser.add_argument("--queries", type=int, default=1000, help="queries per batch")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--bits", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: all cores)")
    parser.add_argument("--hnsw-n", type=int, default=100_000, help="codes for the HNSW run (0: skip; builds slowly)")
    parser.add_argument("--no-approx", action="store_true", help="skip the approximate-search part")
    args = parser.parse_args()

    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    faiss.omp_set_num_threads(threads)
    numba.set_num_threads(threads)
    rng = np.random.default_rng(0)
    bandwidth = read_bandwidth(1.0, args.reps)
    print(f"threads {threads}; read bandwidth {bandwidth / 1e9:.1f} GB/s (parallel sum over 1 GiB)")
    ratios = {bits: exact(args, bits, bandwidth, rng) for bits in args.bits}
    if not args.no_approx:
        approximate(args, rng)
    key = 128 if 128 in ratios else args.bits[-1]
    print(f"search_vs_faiss_flat: {ratios[key]:.2f}")


if __name__ == "__main__":
    main()
