"""Extraction on a Dask cluster (`cfrh extract --scheduler`): the same arrays as a single process, a killed
worker's blocks rerun, a killed client resumed with the pending blocks only. Real worker processes (a
2-worker LocalCluster), the tiny random CLIP, a folder collection with one file that is not an image."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from cfrh.cache import FeatureCache
from cfrh.config import load_pipeline
from cfrh.distributed import SchedulerError
from cfrh.extraction import FLAGS, extract
from clip_fixtures import make_tiny_clip

distributed = pytest.importorskip("distributed")

N = 48
BLOCK = 4
BROKEN = 9


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict:
    """N images (JPEG and PNG, 300-400 px: a few ms each to decode), one of them not an image; a pipeline."""
    base = tmp_path_factory.mktemp("dask")
    root = base / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = ["sky", "sea", "dog", "cat", "tree", "car", "road", "sun"]
    lines = ["image,text,labels"]
    for i in range(N):
        name = f"images/{i:03d}." + ("png" if i % 2 else "jpg")
        if i == BROKEN:
            (root / name).write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (300 + i, 400, 3), dtype=np.uint8)).save(root / name)
        lines.append(f"{name},{' '.join(rng.choice(words, 3))},{'a|b' if i % 3 else 'c'}")
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    model = make_tiny_clip(base / "tiny-clip")
    toml = base / "dask.toml"
    toml.write_text(f"""name = "dask"
[dataset]
reader = "folder"
root = "{root}"
[features]
image_model = "{model}"
batch_size = 3
block_rows = {BLOCK}
workers = 0
[split]
method = "random"
query = 4
train = 10
seed = 0
""")
    single = extract(load_pipeline(toml), base / "single")
    return {"toml": toml, "single": single.cache, "dropped": single.dropped}


@pytest.fixture(scope="module")
def cluster():
    """A 2-worker LocalCluster (worker processes with nannies, which restart a killed worker)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc:
        with distributed.Client(lc) as client:
            yield lc, client


def _same_arrays(cache: FeatureCache, reference: FeatureCache) -> None:
    assert cache.data_arrays() == reference.data_arrays()
    for name in reference.data_arrays():
        np.testing.assert_array_equal(cache.read(name), reference.read(name), err_msg=name)
    assert cache.manifest["checksums"] == reference.manifest["checksums"]
    assert cache.fingerprint == reference.fingerprint


def test_a_local_cluster_gives_the_single_process_arrays(collection, tmp_path):
    result = extract(load_pipeline(collection["toml"]), tmp_path / "cache", scheduler="local:2")
    _same_arrays(result.cache, collection["single"])
    assert result.dropped == collection["dropped"]
    assert result.dropped["by_reason"] == {"image decode failed: UnidentifiedImageError": 1}
    run = result.found["image"]
    assert run["dask_workers"] == 2 and run["device"] == "cpu" and run["throughput"]["images"] == N
    assert result.cache.request["image"]["preprocess"] == "fast" and "_progress" not in result.cache.group
    assert extract(load_pipeline(collection["toml"]), tmp_path / "cache", scheduler="local:2").already_complete


def test_a_killed_worker_has_its_blocks_rerun(collection, cluster, tmp_path):
    lc, client = cluster
    killed: list[int] = []

    def kill_a_busy_worker(done: int, total: int, seconds: float) -> None:
        if killed:
            return
        busy = [addr for addr, keys in client.processing().items() if keys]
        if busy:
            pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    result = extract(load_pipeline(collection["toml"]), tmp_path / "cache", scheduler=lc.scheduler_address,
                     on_images=kill_a_busy_worker)
    assert killed, "no worker was busy after the first block"
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)
    _same_arrays(result.cache, collection["single"])
    assert result.dropped == collection["dropped"]
    client.wait_for_workers(2, timeout=60)   # the nanny restarted it


def test_a_killed_client_resumes_with_the_pending_blocks_only(collection, cluster, tmp_path):
    lc, _ = cluster
    cache_root = tmp_path / "cache"
    driver = subprocess.Popen([sys.executable, "-c", "from cfrh.cli import main; main()", "extract",
                               str(collection["toml"]), "--cache", str(cache_root), "--scheduler",
                               lc.scheduler_address], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    flags_url = None
    done = 0
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            if flags_url is None:
                found = list(cache_root.glob(f"dask/*/{FLAGS}/zarr.json"))
                flags_url = str(found[0].parent) if found else None
            if flags_url is not None:
                try:
                    done = int(np.asarray(zarr.open_array(flags_url, mode="r")[...]).sum())
                except Exception:  # noqa: BLE001 - read while the driver rewrites it
                    continue
                if done >= 2:
                    break
            time.sleep(0.01)
        assert driver.poll() is None, driver.stderr.read().decode()
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    n_blocks = -(-N // BLOCK)
    assert 2 <= done < n_blocks

    key = collection["single"].key
    stopped = FeatureCache.open(cache_root, "dask", key, require_complete=False)
    marked = int(np.asarray(stopped.group[FLAGS][...]).sum())
    result = extract(load_pipeline(collection["toml"]), cache_root, scheduler=lc.scheduler_address)
    assert result.resumed
    assert result.found["image"]["throughput"]["images"] == N - marked * BLOCK < N   # N is whole blocks
    _same_arrays(result.cache, collection["single"])
    assert result.dropped == collection["dropped"]


def test_scheduler_settings_that_cannot_work_are_one_line(collection, tmp_path):
    pipe = load_pipeline(collection["toml"])
    with pytest.raises(SchedulerError, match=r"give local:N with N ≥ 1"):
        extract(pipe, tmp_path / "c", scheduler="local:0")
    with pytest.raises(SchedulerError, match=r"give local:N or a scheduler address"):
        extract(pipe, tmp_path / "c", scheduler="somewhere")
    with pytest.raises(SchedulerError, match=r"no Dask scheduler answered"):
        extract(pipe, tmp_path / "c", scheduler="tcp://127.0.0.1:9")
