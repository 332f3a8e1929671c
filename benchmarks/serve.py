"""Load test of `cfrh serve` on 127.0.0.1: concurrent clients sending text queries to a million-code index.

    python benchmarks/serve.py              # 16 clients, 2,000 text queries, top 10 of 1,000,000 64-bit image codes

Set-up, in a temporary folder: the demo's generated scenes (--items) extracted with the demo's offline model
(the ViT-B/32 architecture with seeded random weights) and trained at 64 bits; then the image database is
replaced by --n random codes whose ids are cache rows (``SearchService(indexes=...)``), so every answer is
described from the cache as in real use. The server is a child process running the app of ``cfrh serve``
under uvicorn (the same ``create_app``, loopback only); the clients are threads with persistent HTTP/1.1
connections, in this process. Measured in the same run:

* direct: the same queries through ``SearchService.search_text`` in this process, one at a time (text →
  BoW → codes, index search, results described): what a query costs without HTTP;
* served: --clients clients sending all queries at once: queries/s, p50 and p99 latency, and errors (any
  non-200 answer), which must be 0.

On a small machine the clients take CPU from the server; the figures include that. The last line is
``serve_vs_direct: <served queries/s ÷ direct queries/s>``.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np

from cfrh.config import load_pipeline
from cfrh.datasets.shapes import generate_shapes
from cfrh.demo import vit_b32_config_dir
from cfrh.extraction import extract
from cfrh.index import HammingIndex
from cfrh.serve import SearchService
from cfrh.serve.service import SEARCH_THREADS
from cfrh.training import train

BITS = 64
START_S = 300  # bound on the server's start (imports, model, a million codes)


def build_collection(folder: Path, items: int) -> tuple[list[str], str, str]:
    """Scenes → cache → a 64-bit run; returns (pipeline overrides, cache root, runs root)."""
    scenes = generate_shapes(folder / "scenes", n=items)
    model = vit_b32_config_dir(folder)
    overrides = [f"dataset.root={json.dumps(str(scenes))}", f"features.image_model={json.dumps(str(model))}",
                 "features.random_init=true", "features.local_files_only=true", f"split.query={items // 10}",
                 f"train.bits=[{BITS}]", "train.epochs=10"]
    pipe = load_pipeline("demo", overrides)
    cache, runs = str(folder / "cache"), str(folder / "runs")
    extract(pipe, cache)
    train(pipe, cache, runs_root=runs)
    return overrides, cache, runs


def open_service(overrides: list[str], cache: str, runs: str, n: int) -> SearchService:
    """The service with its image database replaced by ``n`` random codes (ids: cache rows, in turn)."""
    pipe = load_pipeline("demo", overrides)
    service = SearchService.open(pipe, cache, runs, bits=BITS, device="cpu")
    rng = np.random.default_rng(0)
    index = HammingIndex(BITS, threads=SEARCH_THREADS)
    index.add(rng.integers(0, 256, (n, BITS // 8), dtype=np.uint8), ids=np.arange(n) % len(service.ids))
    service.indexes["image"] = index
    service.warm_up()
    return service


def serve_child(args: argparse.Namespace) -> None:
    """The server process: the app of `cfrh serve` on 127.0.0.1 under uvicorn."""
    import uvicorn

    from cfrh.serve.app import LOOPBACK_HOSTS, create_app

    service = open_service(json.loads(args.child_overrides), args.cache, args.runs, args.n)
    uvicorn.run(create_app(service, allowed_hosts=LOOPBACK_HOSTS), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)


def make_queries(vocabulary: list[str], count: int) -> list[str]:
    rng = np.random.default_rng(1)
    return [" ".join(rng.choice(vocabulary, rng.integers(1, 4), replace=False)) for _ in range(count)]


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.array(latencies) * 1e3, q))


def direct(service: SearchService, queries: list[str], k: int) -> tuple[float, list[float]]:
    """(queries/s, latencies) of the queries through the service in this process, one at a time."""
    latencies = []
    t0 = time.perf_counter()
    for q in queries:
        t = time.perf_counter()
        service.search_text(q, k)
        latencies.append(time.perf_counter() - t)
    return len(queries) / (time.perf_counter() - t0), latencies


def load(port: int, queries: list[str], k: int, clients: int) -> tuple[float, list[float], list[str], float]:
    """(queries/s, latencies, errors, cores the clients used) of ``clients`` threads sending the queries over
    keep-alive connections."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    shares = [queries[i::clients] for i in range(clients)]

    def client(share: list[str]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine, bad = [], []
        for q in share:
            t = time.perf_counter()
            try:
                conn.request("GET", f"/api/search?text={quote(q)}&k={k}")
                response = conn.getresponse()
                body = response.read()
                if response.status != 200 or len(json.loads(body)["results"]) != k:
                    bad.append(f"{response.status} {body[:100]!r}")
            except (OSError, http.client.HTTPException, ValueError) as e:
                bad.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            mine.append(time.perf_counter() - t)
        conn.close()
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    t0, cpu0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return len(queries) / wall, latencies, errors, (time.process_time() - cpu0) / wall


def start_server(args: argparse.Namespace, overrides: list[str], cache: str, runs: str) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child-port", str(args.port), "--child-overrides", json.dumps(overrides),
           "--cache", cache, "--runs", runs, "--n", str(args.n)]
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not answer within {START_S} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="image codes in the searched database")
    parser.add_argument("--queries", type=int, default=2000, help="text queries sent")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--items", type=int, default=200, help="generated scenes behind the model and vocabulary")
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 for the server")
    parser.add_argument("--child-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-overrides", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--runs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_port:
        args.port = args.child_port
        serve_child(args)
        return

    with tempfile.TemporaryDirectory(prefix="cfrh-serve-bench-") as tmp:
        t = time.perf_counter()
        overrides, cache, runs = build_collection(Path(tmp), args.items)
        service = open_service(overrides, cache, runs, args.n)
        queries = make_queries(service.cache.strings("vocabulary"), args.queries)
        print(f"set-up {time.perf_counter() - t:.0f} s: {args.items} scenes, {len(service.ids)} items, "
              f"{len(service.indexes['image']):,} {BITS}-bit image codes; {args.queries:,} text queries, k={args.k}; "
              f"{os.cpu_count()} cores")
        direct(service, queries[:50], args.k)
        direct_qps, direct_lat = direct(service, queries, args.k)
        print(f"direct (in process, one at a time): {direct_qps:8,.0f} queries/s   p50 "
              f"{percentile_ms(direct_lat, 50):6.2f} ms   p99 {percentile_ms(direct_lat, 99):6.2f} ms")
        del service
        server = start_server(args, overrides, cache, runs)
        try:
            load(args.port, queries[:100], args.k, args.clients)  # warm: connections, thread pool
            served_qps, served_lat, errors, client_cores = load(args.port, queries, args.k, args.clients)
        finally:
            server.terminate()
            server.wait(30)
    print(f"served (HTTP, {args.clients} clients):      {served_qps:8,.0f} queries/s   p50 "
          f"{percentile_ms(served_lat, 50):6.2f} ms   p99 {percentile_ms(served_lat, 99):6.2f} ms   "
          f"errors {len(errors)}   (the clients used {client_cores:.2f} cores)")
    for e in errors[:5]:
        print(f"  error: {e}")
    print(f"serve_vs_direct: {served_qps / direct_qps:.2f}")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
