"""`cfrh extract --scheduler local:N` (Dask) against the single-process `cfrh extract`, same cores, same run.

Both are the real CLI (a subprocess each) over the 159 real MS-COCO JPEGs of ../shared/data/coco-mini with
the real ViT-B/32 architecture (random weights: compute does not depend on the weight values) on the CPU,
fp32, the fast pixel rule, blocks of 16 rows (10 tasks) and batches of 16 in both. The single process runs
the model on every core; the LocalCluster runs N worker processes with cores / N model threads each, one
block at a time. Each side's images/s is the one its manifest records for the image loop: the single
process's after its model has loaded, the cluster's after every worker has loaded its model (the load is
reported apart, as it is paid once per worker however many images follow). The two alternate, twice,
and the better of each counts, so other load on a shared machine can only make a side look worse.

    python benchmarks/extract_dask.py [--workers 2] [--rounds 2]

Last line: ``dask_vs_single: <Dask images/s ÷ single-process images/s>`` (target ≥ 0.9).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO = SHARED / "data" / "coco-mini"
VIT = SHARED / "models" / "clip-vit-base-patch32"


def pipeline_toml(folder: Path) -> Path:
    toml = folder / "coco-mini.toml"
    toml.write_text(f"""name = "coco-mini"
[dataset]
reader = "coco"
root = "{COCO}"
[features]
image_model = "{VIT}"
random_init = true
local_files_only = true
precision = "fp32"
batch_size = 16
block_rows = 16
workers = 0
text = "captions"
[split]
method = "random"
query = 20
train = 80
seed = 0
""")
    return toml


def run(toml: Path, cache: Path, *extra: str) -> tuple[dict, float]:
    """(the manifest's image run, wall seconds of the whole command)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from cfrh.cli import main; main()", "extract", str(toml),
                           "--cache", str(cache), *extra], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"cfrh extract {' '.join(extra)} failed:\n{proc.stdout}\n{proc.stderr}")
    manifest = json.loads(next((cache / "coco-mini").glob("*/zarr.json")).read_text())
    return manifest["attributes"]["cfrh"]["found"]["image"], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    for p in (COCO, VIT):
        if not p.exists():
            sys.exit(f"benchmark data not found: {p} (the benchmark reads ../shared)")
    single, dask = [], []
    with tempfile.TemporaryDirectory(prefix="cfrh-bench-dask-") as tmp:
        toml = pipeline_toml(Path(tmp))
        for r in range(args.rounds):
            s, s_wall = run(toml, Path(tmp) / f"single-{r}")
            d, d_wall = run(toml, Path(tmp) / f"dask-{r}", "--scheduler", f"local:{args.workers}")
            single.append(s["throughput"]["images_per_s"])
            dask.append(d["throughput"]["images_per_s"])
            print(f"round {r}: single process {single[-1]:.2f} images/s (command {s_wall:.1f} s); Dask "
                  f"{d['dask_workers']} workers {dask[-1]:.2f} images/s (command {d_wall:.1f} s, model load on "
                  f"the workers {d['model_load_seconds']:.1f} s); load average {os.getloadavg()[0]:.1f} on "
                  f"{os.cpu_count()} cores", flush=True)
    print(f"dask_vs_single: {max(dask) / max(single):.3f}")


if __name__ == "__main__":
    main()
