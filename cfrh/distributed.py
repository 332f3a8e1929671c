"""Image extraction on a Dask cluster (``cfrh extract PIPELINE --scheduler local:N | tcp://HOST:PORT``).

The unit of work is the cache's row block (``features.block_rows``): one task embeds one block and writes
it straight into the staging array, whose chunks are the blocks, so no two tasks ever write one chunk. The
driver (the ``cfrh extract`` process) does everything cheap and everything that has one writer: it reads
the dataset, holds the cache's writer lock, submits the pending blocks, and as each task returns records
the block's failed images and marks it done (:func:`cfrh.extraction.record_block`, the single-process
rule), then writes text, labels and splits and finalises the cache. So:

* a worker that dies loses nothing: Dask reruns its tasks elsewhere (a task rewrites its whole block);
* a driver that dies leaves the blocks it had marked; the next run submits only the others;
* the arrays equal a single-process extraction's: a task embeds the same batches of the same rows with
  the same model (bit-identical on the CPU in fp32; tested on a 2-worker LocalCluster).

Each worker process loads the model once, on its first task, and keeps it (:func:`_encoder`). Tasks for
a GPU ask for ``resources={"GPU": 1}``, so they run only on workers started with ``--resources GPU=1``,
one at a time each. The cache must be at a path or URL every worker can write (a shared folder, an
object store), and the images where every worker can read them (the same paths, or shards at a URL).

Needs ``pip install cfrh[dask]``.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

from .errors import CfrhError

log = logging.getLogger(__name__)

GPU = "GPU"  # the worker resource a GPU task asks for (dask worker --resources GPU=1)
_ENCODERS: dict[str, Any] = {}   # in each worker process: the one loaded model, by its token
_LOCK = threading.Lock()


class SchedulerError(CfrhError, RuntimeError):
    """The Dask scheduler asked for cannot be used; the message says why and what to give instead."""


def _dask() -> Any:
    try:
        import distributed
    except ImportError:
        raise SchedulerError("--scheduler needs Dask: pip install 'cfrh[dask]' (dask.distributed)") from None
    return distributed


class Cluster:
    """The Dask cluster of one extraction: ``local:N`` (a LocalCluster of N worker processes on this machine,
    one task at a time each, started only when there are images to embed) or a scheduler address
    (``tcp://HOST:PORT``). A context manager: leaving it closes the client and the LocalCluster it started."""

    def __init__(self, scheduler: str):
        _dask()
        self.scheduler = scheduler
        self.local_workers = 0
        if scheduler.startswith("local:"):
            try:
                self.local_workers = int(scheduler.split(":", 1)[1])
            except ValueError:
                pass
            if self.local_workers < 1:
                raise SchedulerError(f"--scheduler {scheduler}: give local:N with N ≥ 1 worker processes")
        elif "://" not in scheduler:
            raise SchedulerError(f"--scheduler {scheduler}: give local:N or a scheduler address tcp://HOST:PORT")
        self._client: Any = None
        self._local: Any = None

    @property
    def local(self) -> bool:
        return self.local_workers > 0

    @property
    def client(self) -> Any:
        """The Dask client, connecting (or starting the LocalCluster) on first use."""
        if self._client is None:
            distributed = _dask()
            if self.local:
                self._local = distributed.LocalCluster(n_workers=self.local_workers, threads_per_worker=1,
                                                       processes=True, dashboard_address=None,
                                                       silence_logs=logging.ERROR)
                self._client = distributed.Client(self._local)
            else:
                try:
                    self._client = distributed.Client(self.scheduler, timeout="10s")
                except OSError as e:
                    raise SchedulerError(f"--scheduler {self.scheduler}: no Dask scheduler answered ({e}); start "
                                         f"one with `dask scheduler` and workers with `dask worker ADDRESS`") from None
        return self._client

    def device(self, asked: str | None) -> str:
        """The device the workers embed on. LocalCluster workers share this machine: its device. A remote
        cluster's: ``cuda`` when asked (or ``auto``) and some worker offers a GPU resource, else ``cpu`` —
        decided from the workers, not the driver, which may have no GPU itself."""
        asked = str(asked or "auto")
        if self.local:
            from .features.image import resolve_device

            return str(resolve_device(asked))
        workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
        gpus = any(float((w.get("resources") or {}).get(GPU, 0)) > 0 for w in workers)
        if asked == "auto":
            return "cuda" if gpus else "cpu"
        if asked.startswith("cuda") and not gpus:
            raise SchedulerError(f"--device {asked}: no worker of the cluster offers a GPU; start workers on the "
                                 f"GPU machines with `dask worker ADDRESS --resources GPU=1`, or use --device cpu")
        return asked

    def extract_images(self, cache: Any, c: Any, plan: Any, on_images: Any = None) -> tuple[dict[int, str], dict]:
        """:func:`extract_images` on this cluster (the image step :func:`cfrh.extraction.extract` calls)."""
        return extract_images(self.client, self.local, cache, c, plan, on_images)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._client is not None:
            self._client.close()
        if self._local is not None:
            self._local.close()


def _torch_threads(client: Any, local: bool) -> int | None:
    """Model threads per worker: a LocalCluster's workers share this machine's cores; remote workers keep
    torch's default (their own cores)."""
    if not local:
        return None
    n = max(1, len(client.scheduler_info(n_workers=-1)["workers"]))
    return max(1, (os.cpu_count() or 1) // n)


def _encoder(spec: Any, device: str, precision: str, threads: int | None) -> Any:
    """This worker process's model, loaded on its first task and kept (one model per worker)."""
    from .features.image import load_clip

    if threads:   # in the calling thread: OpenMP's thread count is a per-thread setting
        import torch

        torch.set_num_threads(threads)
    token = f"{spec.source}|{spec.revision}|{spec.seed}|{device}|{precision}"
    with _LOCK:
        encoder = _ENCODERS.get(token)
        if encoder is None:
            _ENCODERS.clear()
            encoder = _ENCODERS[token] = load_clip(spec, device, precision)
    return encoder


def _warm(spec: Any, device: str, precision: str, threads: int | None) -> float:
    """Load the model on a worker ahead of its first task; returns the seconds it took (0 when loaded)."""
    t0 = time.perf_counter()
    _encoder(spec, device, precision, threads)
    return time.perf_counter() - t0


def _embed_block(spec: Any, device: str, precision: str, threads: int | None, staging_url: str, block: int,
                 start: int, stop: int, sources: list[Any], batch_size: int) -> dict[str, Any]:
    """One task: embed rows start:stop and write them into the staging array (the block is one chunk).
    Returns what the driver records: the block, its failed rows with reasons, and the seconds it took."""
    import zarr

    from .extraction import embed_block_rows
    from .features.image import decode_threads, decoding_overlaps

    t0 = time.perf_counter()
    encoder = _encoder(spec, device, precision, threads)
    # A Dask worker cannot spawn decoding processes: on a GPU, a pool of decoding threads feeds the model.
    rows, failures = embed_block_rows(encoder, spec, sources, start, stop, batch_size,
                                      overlap=decoding_overlaps(encoder.device),
                                      threads=decode_threads(encoder.device))
    zarr.open_array(staging_url, mode="r+")[start:stop] = rows
    return {"block": block, "failures": failures, "images": stop - start, "seconds": time.perf_counter() - t0}


def extract_images(client: Any, local: bool, cache: Any, c: Any, plan: Any, on_images: Any = None,
                   ) -> tuple[dict[int, str], dict[str, Any]]:
    """The image step of :func:`cfrh.extraction.extract` on a cluster: the pending blocks as tasks, each
    recorded and marked done by this process as it returns. Same result as the single-process step:
    (failed row → reason, what this run did)."""
    from .extraction import STAGING, image_blocks, record_block
    from .features.image import QUANTIZATION
    from .locations import join

    distributed = _dask()
    block_rows, batch_size = int(plan.feats["block_rows"]), int(plan.feats["batch_size"])
    _, pending, failures = image_blocks(cache, len(c), plan.spec.dim, block_rows)
    if not pending:
        return failures, {}
    device, precision = str(plan.device), plan.precision
    threads = _torch_threads(client, local)
    resources = {GPU: 1} if plan.device.type == "cuda" and not local else None
    t_load = time.perf_counter()
    if resources is None:   # every worker loads the model now, in parallel, before the clock starts
        client.run(_warm, plan.spec, device, precision, threads)
    load_seconds = time.perf_counter() - t_load
    spec = client.scatter(plan.spec, broadcast=True, hash=False)
    sources = list(c.image_paths or [])
    staging_url = join(cache.url, STAGING)
    run = uuid.uuid4().hex[:8]   # task keys of this run only: a resumed run never meets a dead client's keys
    total = sum(e - s for _, s, e in pending)
    t0 = time.perf_counter()
    futures = [client.submit(_embed_block, spec, device, precision, threads, staging_url, b, s, e, sources[s:e],
                             batch_size, key=f"cfrh-block-{b}-{run}", resources=resources, retries=3, pure=False)
               for b, s, e in pending]
    done = 0
    try:
        for _, result in distributed.as_completed(futures, with_results=True):
            record_block(cache, result["block"], result["failures"])
            failures.update(result["failures"])
            done += result["images"]
            if on_images is not None:
                on_images(done, total, time.perf_counter() - t0)
    finally:
        client.cancel(futures)
    seconds = time.perf_counter() - t0
    n_workers = len(client.scheduler_info(n_workers=-1)["workers"])
    log.info("embedded %d images in %d blocks on %d Dask workers in %.1f s", total, len(pending), n_workers, seconds)
    return failures, {"device": device, "precision": precision,
                      "quantization": QUANTIZATION.get(precision),
                      "scheduler": "local" if local else str(client.scheduler.address), "dask_workers": n_workers,
                      "batch_size": batch_size, "model_load_seconds": round(load_seconds, 3),
                      "throughput": {"images": total, "seconds": round(seconds, 3),
                                     "images_per_s": round(total / seconds, 3) if seconds > 0 else None}}


__all__ = ["Cluster", "SchedulerError", "extract_images", "GPU"]
