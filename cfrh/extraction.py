"""Stage 1, ``cfrh extract``: a dataset on disk → one feature cache group (done once, shareable).

Order of work, chosen so that a failed image never leaves a bad row behind:

1. read the dataset (``read_dataset``); work out the request (dataset fingerprint, image model and
   revision, preprocessing, precision, vectoriser), check the split against the items read, and
   create or resume the cache;
2. image features in row blocks into a staging array (``_progress/image_rows``); each block is
   flagged done only after its rows are stored, so an interrupted run redoes at most one block
   per interruption and the result equals an uninterrupted run's. Images that fail to decode
   are remembered with the reason (staging attrs), never stored as features;
3. the items whose image failed are dropped (counted in the drop report, reason ``image decode
   failed: <error>``); the splits are drawn over the items that remain; the vocabulary is fitted
   on their texts; ``image`` is copied from the staging rows that remain;
4. text, labels, ids, paths, texts, names, vocabulary, splits and the dataset's own lists are
   written; ``finalize``
   records checksums and the manifest's ``found`` part and drops the staging data.

Datasets that ship features (WIKI, the DCMH/DJSRH ``.mat`` releases) are imported as they are
(feature key ``precomputed``); nothing is extracted.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .cache import SPLITS, FeatureCache, feature_key, iter_row_blocks, writer_lock
from .config import Pipeline
from .datasets.base import Collection, DropReport, read_dataset
from .errors import CfrhError
from .features.text import BowVectoriser
from .splits import SplitError, make_splits

log = logging.getLogger(__name__)

STAGING = "_progress/image_rows"
FLAGS = "_progress/image"  # per-block done flags (FeatureCache.blocks_done("image", ...)); attrs: failures by block
FEATURE_DEFAULTS: dict[str, Any] = {
    "image_model": "precomputed", "random_init": False, "seed": 0, "local_files_only": "auto",
    "device": "auto", "precision": "auto", "batch_size": 32, "workers": "auto", "block_rows": 1024,
    "text": "auto", "min_df": 1, "max_features": 0,
    "max_image_pixels": 178_956_970, "background": "white", "preprocess": "auto",
}
AUTO_WORKERS_MIN_IMAGES = 2000  # below this, spawning workers costs more than it saves
VERSIONED = ("cfrh", "torch", "transformers", "zarr", "numpy", "scikit-learn", "pillow", "fsspec")

ImagesCallback = Callable[[int, int, float], None]  # (images done this run, images to do this run, seconds)
StatusCallback = Callable[[str], None]  # what extraction is doing while no image is being embedded


class ExtractError(CfrhError, RuntimeError):
    """The pipeline and the dataset do not fit together (e.g. features asked for that the dataset lacks)."""


@dataclass
class ExtractResult:
    """What an extraction did: the cache, whether it resumed or was already complete, and the manifest's
    ``found`` part (counts, drop report, throughput, versions)."""

    cache: FeatureCache
    resumed: bool
    already_complete: bool
    found: dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, Any]:
        return self.found.get("counts", {})

    @property
    def dropped(self) -> dict[str, Any]:
        return self.found.get("dropped", {})

    @property
    def images_per_s(self) -> float | None:
        return (self.found.get("image", {}).get("throughput") or {}).get("images_per_s")


def feature_settings(pipeline: Pipeline, **overrides: Any) -> dict[str, Any]:
    """The pipeline's ``[features]`` over the defaults, with non-None keyword overrides (CLI flags) on top."""
    feats = {**FEATURE_DEFAULTS, **pipeline.features}
    feats.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(feats) - set(FEATURE_DEFAULTS) - {"binary", "stop_words", "model_location"}
    if unknown:
        raise ExtractError(f"{pipeline.path}: unknown [features] keys {sorted(unknown)}; known: "
                           f"{', '.join(sorted(set(FEATURE_DEFAULTS) | {'binary', 'stop_words'}))}")
    for key in ("batch_size", "block_rows"):
        if not isinstance(feats[key], int) or feats[key] < 1:
            raise ExtractError(f"features.{key} = {feats[key]!r}; it must be a positive integer")
    return feats


def model_location(pipeline: Pipeline, model: str, from_pipeline: bool = True) -> str:
    """Where to load an image model from: a hub id as is; a path (``./``, ``../``, ``~``, ``/``, or an existing
    directory) made absolute, relative to the repository of the pipeline (like every pipeline path) or, for a
    value given on the command line, to the working directory."""
    if model == "precomputed":
        return model
    if from_pipeline:
        resolved = pipeline.resolve_path(model)
        if model.startswith((".", "~", "/")) or resolved.is_dir():
            return str(resolved)
    elif model.startswith((".", "~", "/")) or os.path.isdir(model):
        return os.path.abspath(os.path.expanduser(model))
    return model


def check_pipeline(pipeline: Pipeline) -> dict[str, Any]:
    """Every section of a pipeline checked at once, before anything expensive: the reader and its options,
    ``[features]``, the keys of ``[split]``, ``[train]`` and ``[evaluate]`` (types and choices). Extraction is
    the one expensive step, so nothing a later stage reads may fail only after it. Returns the features."""
    from .datasets.base import check_reader_options
    from .estimator import TrainConfig
    from .evaluation import EvaluateConfig
    from .splits import check_split_keys

    where = pipeline.path or pipeline.name
    if "reader" not in pipeline.dataset:
        raise ExtractError(f"{where}: [dataset] needs a 'reader' (e.g. reader = \"coco\")")
    try:
        check_reader_options(pipeline.dataset["reader"],
                             {k: v for k, v in pipeline.dataset.items() if k not in ("reader", "root")})
        check_split_keys(pipeline.split)
    except CfrhError as e:
        raise ExtractError(f"{where}: {e}") from None
    TrainConfig.from_dict(pipeline.train, f"{where} [train]")
    EvaluateConfig.from_dict(pipeline.evaluate, f"{where} [evaluate]")
    return feature_settings(pipeline)


def read_pipeline_dataset(pipeline: Pipeline) -> Collection:
    """The pipeline's dataset, read by its ``[dataset] reader`` with the table's other keys as options. A root
    that is an fsspec URL goes as it is to a reader that reads URLs (``webdataset``)."""
    from .datasets.base import READERS, check_reader_options

    options = {k: v for k, v in pipeline.dataset.items() if k not in ("reader", "root")}
    root = pipeline.dataset.get("root")
    reader = pipeline.dataset["reader"]
    if not root:
        raise ExtractError(f"{pipeline.path}: [dataset] needs a 'root' (or pass --set dataset.root=DIR)")
    if "://" not in str(root):
        return read_dataset(reader, pipeline.resolve_path(root), **options)
    check_reader_options(reader, options)
    if not getattr(READERS[reader], "reads_urls", False):
        raise ExtractError(f"{pipeline.path or pipeline.name}: [dataset] root = {root!r} is a URL, but the {reader} "
                           f"reader reads local folders only; copy the dataset to a folder (the webdataset reader "
                           f"reads shards at a URL)")
    return READERS[reader](str(root), **options)


def dataset_fingerprint(c: Collection) -> str:
    """A digest of everything extraction reads from a Collection (ids, texts, relative image paths, labels,
    shipped features and vocabulary, fixed splits, the reader's own fingerprint), equal on every machine
    holding the same copy of the dataset."""
    h = hashlib.sha256()

    def add(tag: str, data: bytes) -> None:
        h.update(f"{tag}:{len(data)}:".encode() + data)

    add("ids", "\0".join(c.ids).encode())
    add("texts", "\0".join(c.texts).encode())
    if c.image_paths is not None:
        add("paths", "\0".join(relative_paths(c)).encode())
    for name in ("labels", "image_features", "text_features"):
        arr = getattr(c, name)
        if arr is not None:
            arr = np.ascontiguousarray(arr)
            add(name, f"{arr.dtype}{arr.shape}".encode() + arr.tobytes())
    add("label_names", "\0".join(c.label_names).encode())
    add("vocabulary", "\0".join(c.vocabulary or []).encode())
    for k, v in sorted((c.fixed_splits or {}).items()):
        add(f"split:{k}", np.asarray(v, dtype=np.int64).tobytes())
    add("extra", json.dumps(c.fingerprint_extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def relative_paths(c: Collection) -> list[str]:
    """Image paths relative to the dataset root (what the cache stores; absolute paths differ per machine); an
    image inside a shard is ``<shard>/<member>``."""
    from .features.image import ImageMember

    members = [p for p in c.image_paths or [] if isinstance(p, ImageMember)]
    if members:
        return [m.relative_to(c.root) for m in members]
    root = Path(c.root).resolve()
    out = []
    for p in c.image_paths or []:
        try:
            out.append(os.path.relpath(p, root).replace(os.sep, "/"))
        except ValueError:  # another drive on Windows
            out.append(str(p))
    bad = [p for p in out if p.startswith("../")]
    if bad:
        raise ExtractError(f"{c.root}: reader returned image paths outside the dataset root (e.g. {bad[0]})")
    return out


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def _workers(setting: Any, n_images: int, gpu: bool) -> int:
    """Decoding worker processes for ``auto``. A spawned worker costs seconds of CPU to start (it imports
    torch and transformers), so small jobs decode in a background thread of this process instead. On a GPU
    decoding is the bottleneck: every core but one (at most 16). On the CPU the model is (decoding and
    preprocessing cost ~5% of a ViT-B/32 forward pass), and a worker only takes cores from it, so one
    worker per 4 cores (none on a small machine), at most 4."""
    if setting not in ("auto", None):
        return max(0, int(setting))
    cores = os.cpu_count() or 2
    if n_images < AUTO_WORKERS_MIN_IMAGES:
        return 0
    return min(16, max(1, cores - 1)) if gpu else min(4, cores // 4)


@dataclass
class _Plan:
    """What the pipeline asks of this dataset, resolved before the cache is opened."""

    feats: dict[str, Any]
    spec: Any = None  # ClipSpec for images to extract; None for shipped features
    device: Any = None
    precision: str | None = None
    vectoriser: BowVectoriser | None = None

    def request(self, pipeline: Pipeline, c: Collection) -> dict[str, Any]:
        dataset = {"name": pipeline.name, "reader": pipeline.dataset["reader"],
                   "options": {k: v for k, v in pipeline.dataset.items() if k not in ("reader", "root")},
                   "fingerprint": dataset_fingerprint(c)}
        if self.spec is not None:
            from .features.image import PIXEL_RULE, QUANTIZATION

            image = {**self.spec.describe(), "preprocess": self.spec.preprocess, "precision": self.precision,
                     "quantization": QUANTIZATION.get(self.precision or "")}
            if self.spec.preprocess == "fast":
                image["pixel_rule"] = PIXEL_RULE
        else:
            image = {"model": "precomputed", "shape": list(c.image_features.shape), "dtype": "float32"}
        text = self.vectoriser.settings() if self.vectoriser is not None else {
            "kind": "precomputed", "shape": list(c.text_features.shape)}
        # The split is not part of the request: features do not depend on it (the stored one is the manifest's
        # "split"; another one is drawn over the features when a stage opens the cache).
        return {"dataset": dataset, "image": image, "text": text}


def _plan(pipeline: Pipeline, c: Collection, feats: dict[str, Any], device_here: bool = True) -> _Plan:
    """What to extract. ``device_here=False``: the device was chosen for a cluster's workers, not this machine."""
    model = str(feats["image_model"])
    plan = _Plan(feats=feats)
    if c.image_features is not None:
        if model != "precomputed":
            raise ExtractError(f"{pipeline.path}: the {c.name} reader ships precomputed image features; set "
                               f"features.image_model = \"precomputed\" (not {model!r})")
    elif c.image_paths is None:
        raise ExtractError(f"{c.root}: the dataset gives neither image files nor image features")
    elif model == "precomputed":
        raise ExtractError(f"{pipeline.path}: the dataset has image files, so features.image_model must name a "
                           f"CLIP model (a hub id such as openai/clip-vit-base-patch32, or a local directory)")
    else:
        from torch import device as torch_device

        from .features.image import resolve_clip, resolve_device, resolve_precision

        lfo = feats["local_files_only"]
        plan.spec = resolve_clip(feats["model_location"], local_files_only=None if lfo == "auto" else bool(lfo),
                                 random_init=bool(feats["random_init"]), seed=int(feats["seed"]),
                                 max_image_pixels=feats["max_image_pixels"], background=feats["background"],
                                 preprocess=str(feats["preprocess"]))
        plan.device = resolve_device(feats["device"]) if device_here else torch_device(str(feats["device"]))
        plan.precision = resolve_precision(feats["precision"], plan.device)
    if c.text_features is None:
        plan.vectoriser = BowVectoriser.from_settings(feats, c.text_kind, c.vocabulary)
    return plan


def image_blocks(cache: FeatureCache, n: int, dim: int, block_rows: int) -> tuple[Any, list[tuple[int, int, int]],
                                                                                  dict[int, str]]:
    """The staging array (created, or found on resume), the row blocks still to embed, and the failures of
    the blocks already done. One chunk per block, so writers of two blocks never touch one chunk."""
    staging = cache.require_array(STAGING, (n, dim), np.float16, chunk_rows=block_rows)
    blocks = list(iter_row_blocks(n, block_rows))
    done = cache.blocks_done("image", len(blocks))
    return staging, [blk for blk in blocks if not done[blk[0]]], _failures(cache, done)


def _failures(cache: FeatureCache, done: np.ndarray) -> dict[int, str]:
    """Failed rows of the done blocks: per block in the flags' attrs (written by the one process that marks
    blocks done, never by a worker), and the staging attrs of caches staged before (one dict for all rows)."""
    out = {int(k): str(v) for k, v in dict(cache.array(STAGING).attrs.get("failures", {})).items()}
    for b, rows in dict(cache.array(FLAGS).attrs.get("failures", {})).items():
        if done[int(b)]:
            out.update({int(k): str(v) for k, v in dict(rows).items()})
    return out


def record_block(cache: FeatureCache, block: int, failures: dict[int, str]) -> None:
    """Mark a stored block done, with its failed rows (keyed by block, so a redone block replaces its record).
    The record is written before the flag: a crash in between redoes the block."""
    if failures:
        flags = cache.array(FLAGS)
        record = dict(flags.attrs.get("failures", {}))
        record[str(block)] = {str(k): v for k, v in sorted(failures.items())}
        flags.attrs["failures"] = record
    cache.mark_block_done("image", block)


def _batches(pending: list[tuple[int, int, int]], batch_size: int) -> list[np.ndarray]:
    """Row batches of the pending blocks. Batches never cross a block boundary, so a redone block sees exactly
    the batches it saw before."""
    return [np.arange(s, min(s + batch_size, e)) for _, start, e in pending for s in range(start, e, batch_size)]


def embed_block_rows(encoder: Any, spec: Any, sources: list[Any], start: int, stop: int, batch_size: int,
                     workers: int = 0, overlap: bool = False, threads: int = 1) -> tuple[np.ndarray, dict[int, str]]:
    """One block's rows embedded: (float16 rows, zero where an image failed; failed row → reason). What a
    distributed task computes; the single-process loop embeds the same batches in the same order."""
    from .features.image import embed_decoded, start_decoding

    out = np.zeros((stop - start, spec.dim), dtype=np.float16)
    failures: dict[int, str] = {}
    decoded = start_decoding(spec, sources, _batches([(0, 0, stop - start)], batch_size), workers,
                             pin_memory=encoder.device.type == "cuda", overlap=overlap, threads=threads)
    try:
        for rows, emb, reasons in embed_decoded(encoder, decoded):
            out[rows] = emb
            bad = reasons != ""
            failures.update(zip((rows[bad] + start).tolist(), reasons[bad].tolist()))
    finally:
        decoded.close()
    return out, failures


def _extract_images(cache: FeatureCache, c: Collection, plan: _Plan, on_images: ImagesCallback | None,
                    ) -> tuple[dict[int, str], dict[str, Any]]:
    """Image embeddings of every row into the staging array, block by block (resumable).
    Returns (failed row → reason, what this run did: device, precision, throughput)."""
    from .features.image import decode_threads, decoding_overlaps, embed_decoded, load_clip, start_decoding

    n, dim = len(c), plan.spec.dim
    block_rows, batch_size = int(plan.feats["block_rows"]), int(plan.feats["batch_size"])
    staging, pending, failures = image_blocks(cache, n, dim, block_rows)
    if not pending:
        return failures, {}
    batches = _batches(pending, batch_size)
    total = sum(e - s for _, s, e in pending)
    workers = _workers(plan.feats["workers"], total, gpu=plan.device.type == "cuda")
    # Decoding starts now (worker processes, or the prefetch thread), while the weights load.
    overlap = decoding_overlaps(plan.device)
    decoded = start_decoding(plan.spec, c.image_paths or [], batches, workers,
                             pin_memory=plan.device.type == "cuda", overlap=overlap,
                             threads=decode_threads(plan.device))
    try:
        encoder = load_clip(plan.spec, plan.device, plan.precision)
        log.info("extracting %d images in %d blocks (%s, %s, %d workers)", total, len(pending), encoder.device,
                 encoder.precision, workers)
        t0, cpu0 = time.perf_counter(), time.process_time()
        n_done = 0
        block_iter = iter(pending)
        b, start, stop = next(block_iter)
        buf = np.zeros((stop - start, dim), dtype=np.float16)
        filled, block_failures = 0, {}
        for rows, emb, reasons in embed_decoded(encoder, decoded):
            bad = reasons != ""
            buf[rows - start] = emb
            block_failures.update(zip(rows[bad].tolist(), reasons[bad].tolist()))
            filled += len(rows)
            n_done += len(rows)
            if filled == stop - start:
                staging[start:stop] = buf
                record_block(cache, b, block_failures)
                failures.update(block_failures)
                nxt = next(block_iter, None)
                if nxt is not None:
                    b, start, stop = nxt
                    buf = np.zeros((stop - start, dim), dtype=np.float16)
                    filled, block_failures = 0, {}
            if on_images is not None:
                on_images(n_done, total, time.perf_counter() - t0)
    finally:
        decoded.close()  # stops the prefetch thread and the worker processes, also when interrupted
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    # cpu_seconds: this process's CPU time in the image loop (all its threads; not worker processes).
    return failures, {**encoder.info, "workers": workers, "batch_size": batch_size,
                      "decoding": "worker processes" if workers else "beside the model" if overlap
                      else "between model calls",
                      "throughput": {"images": n_done, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                                     "images_per_s": round(n_done / seconds, 3) if seconds > 0 else None}}


def _write_image(cache: FeatureCache, kept: np.ndarray, dim: int, block_rows: int) -> None:
    """``image`` = the staging rows of the kept items (all of them when nothing failed), block by block."""
    out = cache.require_array("image", (len(kept), dim), np.float16, chunk_rows=block_rows)
    for _, s, e in iter_row_blocks(len(kept), block_rows):
        rows = kept[s:e]
        contiguous = rows[-1] - rows[0] == len(rows) - 1
        out[s:e] = cache.read(STAGING, slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows)


def _shipped(arr: np.ndarray, name: str, root: Any) -> np.ndarray:
    """Shipped features as stored: uint8 when they are small non-negative integers (binary tag vectors),
    else float32 (exact for the .mat releases' float32/float64 data at feature precision)."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ExtractError(f"{root}: the dataset's {name} contain NaN or infinite values; fix the file")
    if arr.dtype.kind in "biu" or (arr.size and np.array_equal(arr, np.round(arr))):
        if arr.size == 0 or (arr.min() >= 0 and arr.max() <= 255):
            return arr.astype(np.uint8)
    return arr.astype(np.float32)


def _write_text(cache: FeatureCache, c: Collection, vec: BowVectoriser | None, block_rows: int) -> dict[str, Any]:
    if vec is None:
        data = _shipped(c.text_features, "text features", c.root)
        cache.write("text", data, chunk_rows=block_rows)
        return {"text_dim": int(data.shape[1]), "empty_text_rows": int((data == 0).all(axis=1).sum())}
    vec.fit(c.texts)
    counts = vec.transform(c.texts)
    out = cache.require_array("text", counts.shape, np.uint8, chunk_rows=block_rows)
    for _, s, e in iter_row_blocks(counts.shape[0], block_rows):
        out[s:e] = counts[s:e].toarray().astype(np.uint8)
    cache.write("vocabulary", list(vec.vocabulary or []))
    empty = int((counts.getnnz(axis=1) == 0).sum())
    if empty:
        log.warning("%d items have no in-vocabulary word; their text rows are all zero", empty)
    return {"text_dim": int(counts.shape[1]), "empty_text_rows": empty}


def extract(pipeline: Pipeline, cache_root: str | os.PathLike | None = None, overwrite: bool = False, *,
            model: str | None = None, device: str | None = None, precision: str | None = None,
            batch_size: int | None = None, workers: int | str | None = None, scheduler: str | None = None,
            preprocess: str | None = None, on_images: ImagesCallback | None = None,
            on_status: StatusCallback | None = None) -> ExtractResult:
    """Extract (or import) a pipeline's features into ``<cache_root>/<pipeline.name>/<feature key>``.

    Resumes an interrupted extraction with the same request; a cache built with another request fails
    with the differing settings unless ``overwrite``. Keyword arguments override ``[features]``.
    A complete cache is only read (so a shared read-only one answers "already complete"); writing holds
    the cache's lock (:func:`cfrh.cache.writer_lock`), so a concurrent extraction of the same cache waits
    and then finds it complete instead of writing beside it. ``scheduler`` (``local:N`` or a Dask scheduler
    address) embeds the images on a Dask cluster (:mod:`cfrh.distributed`); everything else stays here.
    """
    def status(message: str) -> None:
        log.info("%s", message)
        if on_status is not None:
            on_status(message)

    check_pipeline(pipeline)
    feats = feature_settings(pipeline, image_model=model, device=device, precision=precision,
                             batch_size=batch_size, workers=workers, preprocess=preprocess)
    feats["model_location"] = model_location(pipeline, str(feats["image_model"]), from_pipeline=model is None)
    if scheduler is None:
        return _extract(pipeline, cache_root, overwrite, feats, status, on_images)
    from .distributed import Cluster

    with Cluster(scheduler) as cluster:
        feats["device"] = cluster.device(feats["device"])
        return _extract(pipeline, cache_root, overwrite, feats, status, on_images, images=cluster.extract_images)


def _extract(pipeline: Pipeline, cache_root: str | os.PathLike | None, overwrite: bool, feats: dict[str, Any],
             status: StatusCallback, on_images: ImagesCallback | None, images: Callable[..., Any] | None = None,
             ) -> ExtractResult:
    """:func:`extract` once the settings are known: ``images`` embeds the pending blocks (default: here)."""
    c = read_pipeline_dataset(pipeline)
    if len(c) == 0:
        raise ExtractError(f"{c.root}: the reader found no usable items (dropped: {c.dropped.counts})")
    try:   # cheap, so before any image is embedded (image failures can only lower the count later)
        make_splits(len(c), pipeline.split, labels=c.labels, fixed=c.fixed_splits)
    except SplitError as e:
        raise ExtractError(f"{pipeline.path or pipeline.name} [split]: {e} (the reader kept {len(c):,} items); "
                           f"fix [split] or --set split.KEY=VALUE") from None
    plan = _plan(pipeline, c, feats, device_here=images is None)
    key = feature_key(str(feats["image_model"]))
    request = plan.request(pipeline, c)
    done = None if overwrite else _complete(cache_root, pipeline.name, key, request, pipeline.split)
    if done is not None:
        return done
    with writer_lock(cache_root, pipeline.name, key,
                     on_wait=lambda lock: status(f"waiting for another extraction of this cache ({lock})")):
        done = None if overwrite else _complete(cache_root, pipeline.name, key, request, pipeline.split)
        if done is not None:   # the other extraction finished it while this one waited
            return done
        cache, resumed = FeatureCache.create(cache_root, pipeline.name, key, request, overwrite)
        status(f"{'resuming' if resumed else 'writing'} {cache.url}")
        return _extract_into(cache, resumed, pipeline, c, plan, feats, on_images, images or _extract_images)


def _complete(cache_root: str | os.PathLike | None, dataset: str, key: str, request: dict[str, Any],
              split: dict[str, Any]) -> ExtractResult | None:
    """The result for a cache that is already complete with this request (read-only), else None. A ``[split]``
    other than the stored one is drawn over the stored features (checked here, used by every later stage)."""
    if not FeatureCache.exists(cache_root, dataset, key):
        return None
    cache = FeatureCache.open(cache_root, dataset, key, mode="r", request=request, require_complete=False)
    if not cache.is_complete:
        return None
    cache.use_split(split)
    found = dict(cache.manifest.get("found", {}))
    if cache.split_redrawn:
        found["counts"] = {**found.get("counts", {}), **{p: int(len(cache.split(p))) for p in SPLITS}}
        log.info("%s: [split] differs from the stored one; later stages draw it over these features", cache.url)
    log.info("%s is complete; nothing to do (use --overwrite to re-extract)", cache.url)
    return ExtractResult(cache, resumed=True, already_complete=True, found=found)


def _extract_into(cache: FeatureCache, resumed: bool, pipeline: Pipeline, c: Collection, plan: _Plan,
                  feats: dict[str, Any], on_images: ImagesCallback | None, images: Callable[..., Any],
                  ) -> ExtractResult:
    """Everything after the cache is open for writing (the caller holds its lock)."""
    block_rows = int(feats["block_rows"])
    failures: dict[int, str] = {}
    image_run: dict[str, Any] = {}
    if plan.spec is not None:
        failures, image_run = images(cache, c, plan, on_images)
    dropped = DropReport(list(c.dropped.entries))
    for row, reason in sorted(failures.items()):
        dropped.add(c.ids[row], reason)
    kept = np.setdiff1d(np.arange(len(c)), np.fromiter(failures, dtype=np.int64, count=len(failures)))
    if kept.size == 0:
        raise ExtractError(f"{c.root}: no image could be decoded ({dropped.counts}); check the image files")
    items = c.subset(kept) if failures else c

    splits = make_splits(len(items), pipeline.split, labels=items.labels, fixed=items.fixed_splits)
    if plan.spec is not None:
        _write_image(cache, kept, plan.spec.dim, block_rows)
        image_dim = plan.spec.dim
    else:
        data = _shipped(items.image_features, "image features", c.root).astype(np.float32)
        cache.write("image", data, chunk_rows=block_rows)
        image_dim = int(data.shape[1])
    text_counts = _write_text(cache, items, plan.vectoriser, block_rows)
    cache.write("ids", list(items.ids))
    cache.write("texts", list(items.texts))
    if items.image_paths is not None:
        cache.write("paths", relative_paths(items))
    if items.labels is not None:
        cache.write("labels", items.labels, chunk_rows=block_rows)
    if items.label_names:
        cache.write("label_names", list(items.label_names))
    for part, rows in splits.items():
        cache.write(f"splits/{part}", rows)
    for name, rows in (items.fixed_splits or {}).items():   # the dataset's own lists, for other fixed splits
        cache.write(f"fixed_splits/{name}", np.asarray(rows, dtype=np.int64))

    found = {
        "counts": {"items": len(items), "image_dim": image_dim, **text_counts,
                   "labels": int(items.labels.shape[1]) if items.labels is not None else 0,
                   **{part: int(len(rows)) for part, rows in splits.items()},
                   "dropped": len(dropped), "image_failures": len(failures)},
        "dropped": dropped.to_dict(),
        "dataset": {"root": str(c.root), "reader_fingerprint": c.fingerprint_extra},
        "image": {"model_source": plan.spec.source, "processor_class": type(plan.spec.processor).__name__,
                  **image_run} if plan.spec is not None else {"source": "shipped with the dataset"},
        "versions": package_versions(),
    }
    cache.finalize(found=found, split=dict(pipeline.split))
    log.info("finished %s: %d items", cache.url, len(items))
    return ExtractResult(cache, resumed=resumed, already_complete=False, found=found)
