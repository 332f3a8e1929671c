"""Stage 2, ``cfrh train``: a pipeline's feature cache → a training run (models and codes), kept apart.

Reads only the cache (never images), and never writes into it, so it is cheap to rerun and works on a
shared read-only cache. For each requested bit length:

1. build a :class:`cfrh.estimator.CFRH` from the pipeline's ``[train]`` table (``train.method``, or ``method=``:
   CFRH or a baseline with its published settings, :mod:`cfrh.trainers`), or resume it from the run's checkpoint (model, optimiser and RNG state: an interrupted run ends with the same codes as an
   uninterrupted one);
2. train it over batches streamed from the cache (:class:`cfrh.data.PairBatches`), writing a checkpoint
   and the loss history into the run every ``train.checkpoint_every`` epochs (0: every epoch, or every few of a run with more than 100);
3. hash every item of the cache (image codes from image features, text codes from text features) into
   the run's ``<bits>/{image,text}_codes.npy``, save the model, mark the bit length complete.

Where a run lives: :class:`cfrh.runs.RunStore` (``<runs root>/<dataset>/<feature key>/<run>``, the run named
after its method unless given a name); the run records the fingerprint of the cache it was trained on and the
method, so ``cfrh evaluate`` can put every method's run side by side.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable

import numpy as np

from .cache import FeatureCache, describe_differences, open_pipeline_cache
from .config import Pipeline
from .data import PairBatches, feature_blocks, feature_stats
from .estimator import CFRH, RunMismatch, TrainConfig, TrainError
from .model import FeatureStats
from .runs import RunError, RunStore

log = logging.getLogger(__name__)

# (task, batches advanced, batches in the task, running mean loss terms or None): the CLI draws a bar.
ProgressCallback = Callable[[str, int, int, "dict[str, float] | None"], None]
CHECKPOINT = "checkpoint.safetensors"


def estimator_for(config: TrainConfig, bits: int) -> CFRH:
    """The estimator of one bit length with a pipeline's validated ``[train]`` settings."""
    return CFRH(bits=bits, **{k: v for k, v in dataclasses.asdict(config).items() if k != "bits"})


def save_checkpoint(store: RunStore, bits: int, data: bytes) -> None:
    store.write_bytes(f"{bits}/{CHECKPOINT}", data)


def emit_codes(cache: FeatureCache, store: RunStore, est: CFRH, block_rows: int = 65536) -> None:
    """Hash every item of the cache (not only the training split) into the run's code files."""
    for modality, hash_fn in (("image", est.hash_image), ("text", est.hash_text)):
        n = cache.array(modality).shape[0]
        out = np.empty((n, est.bits // 8), dtype=np.uint8)
        for start, block in feature_blocks(cache, modality, block_rows):
            out[start:start + block.shape[0]] = hash_fn(block)
        store.write_codes(est.bits, modality, out)


def _mismatch(store: RunStore, what: str, have: dict, want: dict) -> RunMismatch:
    return RunMismatch(f"{store.url}: {what} with other settings — {'; '.join(describe_differences(have, want, 'run'))}. "
                      f"Pass --no-resume to start over, or --run NAME for a separate run.")


def train_bits(cache: FeatureCache, store: RunStore, data: PairBatches,
               feature_stats: tuple[FeatureStats, FeatureStats], config: TrainConfig, bits: int, resume: bool,
               on_batch: Callable[[int, dict[str, float] | None], None] | None = None) -> dict:
    """Train one bit length to completion (or resume it), emit its codes, return its summary."""
    est = estimator_for(config, bits)
    want = est.get_params()
    files = {m: store.url_of(f"{bits}/{m}_codes.npy") for m in ("image", "text")}

    # Finished before: keep it if it was trained with these settings, refuse to mix otherwise.
    if resume and bits in store.complete_bits() and store.exists(f"{bits}/model.json"):
        done = json.loads(store.read_bytes(f"{bits}/model.json"))
        if done.get("train_config") != want:
            raise _mismatch(store, f"run {store.name!r} ({bits} bits) was trained", done.get("train_config", {}), want)
        history = done.get("history", [])
        return {"skipped": True, "epochs": len(history), "seconds": sum(h["seconds"] for h in history),
                "loss": history[-1] if history else {}, "image_codes": files["image"], "text_codes": files["text"],
                "model": store.model_dir(bits)}

    checkpoint = store.read_bytes(f"{bits}/{CHECKPOINT}") if resume and store.exists(f"{bits}/{CHECKPOINT}") else None
    start_epoch = 0
    if checkpoint is not None:
        from .estimator import read_checkpoint

        header, _ = read_checkpoint(checkpoint, store.url_of(f"{bits}/{CHECKPOINT}"))
        if header["config"] != want:
            raise _mismatch(store, f"the checkpoint of run {store.name!r} ({bits} bits) was made", header["config"],
                            want)
        start_epoch = header["epoch"] + 1
        log.info("run %s, %d bits: resuming after epoch %d", store.name, bits, start_epoch)
    store.update_info(complete={str(bits): False})

    def on_epoch(epoch: int, make_checkpoint: Callable[[], bytes], history: list[dict], save: bool) -> None:
        if save:
            store.update_info(history={str(bits): history})
            save_checkpoint(store, bits, make_checkpoint())

    est.fit_batches(data, feature_stats, resume_from=checkpoint, on_batch=on_batch, on_epoch=on_epoch)
    emit_codes(cache, store, est)
    est.save(store.model_dir(bits), extra={"run": store.name,
                                           "cache": {"url": cache.url, "fingerprint": cache.fingerprint}})
    store.update_info(complete={str(bits): True}, history={str(bits): est.history_})
    store.remove(f"{bits}/{CHECKPOINT}")
    history = est.history_
    return {"skipped": False, "resumed_from_epoch": start_epoch, "epochs": len(history),
            "seconds": round(sum(h["seconds"] for h in history), 3), "loss": history[-1] if history else {},
            "image_codes": files["image"], "text_codes": files["text"], "model": store.model_dir(bits)}


def train(pipeline: Pipeline, cache_root: str | os.PathLike | None = None, bits: list[int] | None = None,
          run: str | None = None, resume: bool = True, *, runs_root: str | os.PathLike | None = None,
          model: str | None = None, method: str | None = None, on_progress: ProgressCallback | None = None) -> dict:
    """Train every requested bit length of a pipeline from its cache into a run; returns a per-bit summary.

    ``method`` (default ``train.method``, "cfrh") trains CFRH or a baseline (``djsrh``, ``jdsh``, ``dgcpn``) with its
    published settings; ``run`` defaults to the method's name. ``model`` picks the feature cache when the root
    holds several (:func:`cfrh.cache.resolve_feature_key`); ``on_progress`` receives batch counts and running
    losses (nothing is drawn without it)."""
    where = f"{pipeline.path or pipeline.name} [train]"
    config = TrainConfig.from_dict(pipeline.train, where)
    if bits or method:
        config = dataclasses.replace(config, **({"bits": [int(b) for b in bits]} if bits else {}),
                                     **({"method": method} if method else {}))
        config.check(where)
    run = run or config.method
    cache = open_pipeline_cache(pipeline, cache_root, model=model)
    try:
        store = RunStore.of(runs_root, cache, run)
    except RunError as e:
        raise TrainError(str(e)) from None
    info = store.info()
    trained_on = info.get("cache", {})
    if resume and info and (trained_on.get("fingerprint"), trained_on.get("split", cache.split_settings)) != (
            cache.fingerprint, cache.split_settings):
        raise RunMismatch(f"{store.url}: run {run!r} was trained on another cache or [split] "
                         f"({trained_on.get('url')}); pass --no-resume to retrain it on {cache.url} with this "
                         f"[split], or --run NAME for a separate run")
    if not resume and info:
        for b in config.bits:
            store.remove(str(b))
        store.update_info(complete={str(b): False for b in config.bits})
    train_rows = cache.split("train")
    batch_size = estimator_for(config, config.bits[0]).batch_size
    if len(train_rows) < batch_size and config.drop_last:
        key = "train.batch_size" if config.method == "cfrh" else f"train.{config.method}.batch_size"
        raise TrainError(f"{cache.url}: {len(train_rows)} training rows are fewer than {key} = {batch_size}; "
                         f"lower it with --set {key}=N")
    data = PairBatches(cache, train_rows, batch_size, seed=config.seed, in_memory_mb=config.in_memory_mb,
                       window_blocks=config.window_blocks, drop_last=config.drop_last)
    if data.in_memory:
        stats = (FeatureStats.of(data.image), FeatureStats.of(data.text))
    else:
        stats = (feature_stats(cache, "image", data.rows), feature_stats(cache, "text", data.rows))
    store.update_info(run=run, pipeline=pipeline.name, method=config.method,
                      cache={"url": cache.url, "fingerprint": cache.fingerprint, "dataset": cache.dataset,
                             "key": cache.key, "split": cache.split_settings},
                      config=estimator_for(config, config.bits[0]).get_params(),
                      bits=sorted(set(info.get("bits", [])) | set(config.bits)))
    summary: dict[str, Any] = {"run": run, "method": config.method, "cache": cache.url, "runs": store.url,
                               "train_rows": int(len(train_rows)), "streamed": not data.in_memory, "bits": {}}
    for b in config.bits:
        task, total = f"{b} bits", estimator_for(config, b).trainer.epochs(len(data)) * len(data)

        def on_batch(advance: int, terms: dict[str, float] | None, task=task, total=total) -> None:
            if on_progress is not None:
                on_progress(task, advance, total, terms)

        summary["bits"][str(b)] = train_bits(cache, store, data, stats, config, b, resume, on_batch)
    return summary


__all__ = ["train", "train_bits", "emit_codes", "TrainConfig", "TrainError", "RunMismatch", "CFRH"]
