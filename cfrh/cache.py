"""The feature cache: one Zarr v3 group per dataset × feature model, immutable once complete.

Layout under a cache root (a local folder or any fsspec URL; addresses: :mod:`cfrh.locations`)::

    <root>/<dataset>/<feature-key>/          zarr group; attrs["cfrh"] is the manifest
        image        (N, D) float16           CLIP image embeddings (or imported features)
        text         (N, V) uint8 | float16  bag-of-words counts (or imported text features)
        labels       (N, C) uint8            multi-hot, evaluation only (absent when unlabelled)
        ids, paths, texts   (N,) str         item id, image path relative to the dataset root, raw text
        vocabulary   (V,) str, label_names (C,) str
        splits/{query,train,database}  int64 row indices
    <root>/<dataset>/<feature-key>.lock      held while an extraction writes (local roots)

The manifest records what was *asked for* (``request``: dataset fingerprint, model,
preprocessing, vectoriser, split) and what was *found* (counts, drop report, versions), and, once
complete, a sha256 digest of every row block of every array (``checksums``) and the cache's
``fingerprint`` (a digest of those digests). Opening an existing cache with a different request
fails and says what differs, so a shared cache can never silently mix two feature sets.

Integrity: every read of a complete cache (:meth:`FeatureCache.read`) reads whole row blocks and
checks each block's digest, so a flipped byte, a deleted chunk or a truncated file stops the stage
with one line naming the array and block; :meth:`FeatureCache.verify` lists every bad block and
never raises. Training runs live elsewhere (:mod:`cfrh.runs`): nothing is ever written into a
complete cache, so it can be shared read-only.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import time
from typing import Any, Iterable, Iterator

import fsspec
import numpy as np
import zarr
from pathlib import Path

from .errors import CfrhError
from .locations import cache_location, cache_root, feature_key, join

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
ROW_ARRAYS = ("image", "text", "labels", "ids", "paths", "texts")
SPLITS = ("query", "train", "database")


class CacheError(CfrhError, RuntimeError):
    """A cache is missing, incomplete or corrupt; the message says which and what to run."""


class CacheMismatch(CacheError):
    """An existing cache was built with settings other than the ones asked for."""


class CacheCorrupt(CacheError):
    """Stored data no longer matches the digests recorded at extraction."""


def default_cache_root() -> str:
    """The cache root when none is given: ``$CFRH_CACHE``, else ``./cache`` (see :mod:`cfrh.locations`)."""
    return cache_root()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def describe_differences(have: dict, want: dict, holder: str = "cache") -> list[str]:
    """One line per setting that differs between what ``holder`` (a cache, a run, a checkpoint) was made with and
    what is asked for (dotted keys)."""
    a, b = _flatten(have), _flatten(want)
    return [f"{k}: {holder} has {a.get(k, '<unset>')!r}, asked for {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def block_digest(block: np.ndarray) -> str:
    """sha256 of one row block's logical content (dtype, shape, values), independent of chunking and codecs:
    the hash of bytes a reader has already decoded, so checking it costs no extra read."""
    h = hashlib.sha256(f"{block.dtype.str if block.dtype.kind not in 'OUT' else 'str'}|{block.shape}".encode())
    if block.dtype.kind in "OUT":
        h.update("\0".join(map(str, block.tolist())).encode() + b"\0")
    else:
        h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()[:32]


def _block_rows(arr: zarr.Array) -> int:
    return max(1, int(arr.chunks[0])) if arr.ndim else 1


def _digests(arr: zarr.Array) -> dict[str, Any]:
    """The per-block digests of a whole array: ``{"rows": block rows, "blocks": [digest, ...]}``."""
    rows = _block_rows(arr)
    n = int(arr.shape[0]) if arr.ndim else 0
    return {"rows": rows, "blocks": [block_digest(np.asarray(arr[s:e])) for _, s, e in iter_row_blocks(n, rows)]}


class FeatureCache:
    """One dataset × feature-model group of the cache. Open with :meth:`open` or :meth:`create`."""

    def __init__(self, url: str, group: zarr.Group):
        self.url = url
        self.group = group
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self._drawn: dict[str, np.ndarray] | None = None   # splits of a [split] other than the stored one
        self._split_settings: dict | None = None

    # -- opening ---------------------------------------------------------------------------
    @staticmethod
    def location(root: str | os.PathLike | None, dataset: str, key: str) -> str:
        return cache_location(root, dataset, key)

    @classmethod
    def exists(cls, root: str | os.PathLike | None, dataset: str, key: str) -> bool:
        fs, path = fsspec.core.url_to_fs(cls.location(root, dataset, key))
        return fs.exists(join(path, "zarr.json"))

    @classmethod
    def at(cls, url: str, mode: str = "r") -> "FeatureCache":
        """The cache group at ``url``, its manifest readable, or one line saying why not."""
        try:
            group = zarr.open_group(url, mode=mode)
            manifest = group.attrs.get("cfrh")
        except (ValueError, KeyError, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheCorrupt(f"{url}: the cache's zarr.json cannot be read ({type(e).__name__}: "
                               f"{str(e)[:120]}); re-extract with `cfrh extract --overwrite`") from None
        if manifest is None:
            raise CacheError(f"{url}: a Zarr group without a cfrh manifest; remove it or pick another --cache")
        return cls(url, group)

    @classmethod
    def open(cls, root: str | os.PathLike | None, dataset: str, key: str, mode: str = "r",
             request: dict | None = None, require_complete: bool = True) -> "FeatureCache":
        url = cls.location(root, dataset, key)
        if not cls.exists(root, dataset, key):
            raise CacheError(f"{url}: no feature cache here; run `cfrh extract {dataset}` first "
                             f"(or pass --cache pointing at a shared cache)")
        cache = cls.at(url, mode)
        if request is not None:
            diff = describe_differences(cache.request, _jsonable(request))
            if diff:
                raise CacheMismatch(f"{url}: built with other settings than asked for — " + "; ".join(diff)
                                    + ". Use another --cache root or re-extract with --overwrite.")
        if require_complete and not cache.is_complete:
            raise CacheError(f"{url}: extraction did not finish; rerun `cfrh extract {dataset}` to resume it")
        return cache

    @classmethod
    def create(cls, root: str | os.PathLike | None, dataset: str, key: str, request: dict,
               overwrite: bool = False) -> tuple["FeatureCache", bool]:
        """Open for writing; returns (cache, resumed). An existing cache with another request fails
        unless ``overwrite`` (which deletes it first). Call it holding :func:`writer_lock`."""
        url = cls.location(root, dataset, key)
        request = _jsonable(request)
        if cls.exists(root, dataset, key):
            if overwrite:
                fs, path = fsspec.core.url_to_fs(url)
                fs.rm(path, recursive=True)
            else:
                cache = cls.open(root, dataset, key, mode="r+", request=request, require_complete=False)
                return cache, True
        group = zarr.open_group(url, mode="w")
        group.attrs["cfrh"] = {"format": FORMAT_VERSION, "request": request, "complete": False,
                               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        return cls(url, group), False

    # -- manifest --------------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        return dict(self.group.attrs["cfrh"])

    @property
    def request(self) -> dict:
        return self.manifest.get("request", {})

    @property
    def is_complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def fingerprint(self) -> str | None:
        """A digest of every stored block (None until complete): what a training run records, so that its
        codes are never scored against another cache's labels or splits."""
        return self.manifest.get("fingerprint")

    @property
    def dataset(self) -> str:
        return self.url.rstrip("/").rsplit("/", 2)[-2]

    @property
    def key(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def warnings(self) -> list[str]:
        """What anyone reading a number derived from this cache must know (e.g. untrained image features)."""
        weights = str(self.request.get("image", {}).get("weights", ""))
        if weights.startswith("random-init"):
            return [f"image features come from an UNTRAINED CLIP ({weights}): retrieval numbers from this cache "
                    f"do not reflect real quality; extract with pretrained weights for real numbers"]
        return []

    def update_manifest(self, **fields: Any) -> None:
        m = self.manifest
        m.update(_jsonable(fields))
        self.group.attrs["cfrh"] = m

    @property
    def n_items(self) -> int:
        return int(self.array("ids").shape[0])

    # -- arrays ----------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        try:
            self.group[name]
            return True
        except KeyError:
            return False

    def array(self, name: str) -> zarr.Array:
        """The Zarr array itself (for its shape and dtype; read data through :meth:`read`, which checks it)."""
        try:
            return self.group[name]
        except KeyError:
            raise CacheError(f"{self.url}: array {name!r} is missing; re-extract with `cfrh extract "
                             f"{self.dataset} --overwrite`") from None
        except (ValueError, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheCorrupt(f"{self.url}: array {name!r} has unreadable metadata ({type(e).__name__}); "
                               f"re-extract with `cfrh extract {self.dataset} --overwrite`") from None

    def require_array(self, name: str, shape: tuple[int, ...], dtype: Any, chunk_rows: int = 1024,
                      shard_rows: int | None = None) -> zarr.Array:
        """Create a row-chunked array, or return the existing one after checking shape and dtype (resume)."""
        if self.has(name):
            arr = self.group[name]
            if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != np.dtype(dtype):
                raise CacheError(f"{self.url}: array {name!r} is {arr.shape} {arr.dtype}, expected {shape} "
                                 f"{np.dtype(dtype)}; the cache is inconsistent, re-extract with --overwrite")
            return arr
        chunk_rows = max(1, min(chunk_rows, shape[0] or 1))
        chunks = (chunk_rows, *shape[1:])
        kwargs: dict[str, Any] = {}
        if shard_rows and shape[0] > shard_rows:
            shard_rows = max(chunk_rows, shard_rows // chunk_rows * chunk_rows)
            kwargs["shards"] = (shard_rows, *shape[1:])
        return self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, **kwargs)

    def write(self, name: str, data: np.ndarray | list, chunk_rows: int = 4096) -> zarr.Array:
        """Write a whole array (replacing one of the same name) into a cache that is not yet complete."""
        if self.is_complete:
            raise CacheError(f"{self.url}: the cache is complete and immutable; re-extract with --overwrite")
        data = np.asarray(data, dtype=str) if isinstance(data, list) else np.asarray(data)
        if data.dtype.kind == "U":
            dtype: Any = str
        else:
            dtype = data.dtype
        if self.has(name):
            del self.group[name]
        arr = self.group.create_array(name, shape=data.shape,
                                      chunks=(max(1, min(chunk_rows, data.shape[0] or 1)), *data.shape[1:]),
                                      dtype=dtype)
        if data.size:
            arr[...] = data
        return arr

    def _block(self, name: str, arr: zarr.Array, b: int, start: int, stop: int,
               digests: list[str] | None) -> np.ndarray:
        """Rows start:stop (one whole storage block) of ``arr``, checked against its recorded digest."""
        try:
            block = np.asarray(arr[start:stop])
        except Exception as e:  # any codec or store failure on corrupt bytes: name the block, not the codec
            raise CacheCorrupt(self._corrupt(name, b, start, stop, f"undecodable: {type(e).__name__}")) from None
        if digests is not None and (b >= len(digests) or block_digest(block) != digests[b]):
            raise CacheCorrupt(self._corrupt(name, b, start, stop, "contents differ from the digest recorded at "
                                                                  "extraction (altered or missing chunk)"))
        return block

    def _corrupt(self, name: str, b: int, start: int, stop: int, why: str) -> str:
        return (f"{self.url}: array {name!r} block {b} (rows {start}–{stop - 1}) is corrupt: {why}; re-extract "
                f"with `cfrh extract {self.dataset} --overwrite` (`cfrh cache verify` lists every bad block)")

    def _recorded(self, name: str, arr: zarr.Array) -> list[str] | None:
        """The digests to check reads of ``name`` against (None while the cache is being written)."""
        entry = self.manifest.get("checksums", {}).get(name) if self.is_complete else None
        if entry is None:
            return None
        if int(entry["rows"]) != _block_rows(arr):
            raise CacheCorrupt(f"{self.url}: array {name!r} changed its chunking since extraction; re-extract "
                               f"with `cfrh extract {self.dataset} --overwrite`")
        return list(entry["blocks"])

    def read(self, name: str, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """A whole array, a slice, or the rows at sorted-or-not integer indices (returned in that order).

        Reads whole storage blocks (Zarr decodes whole chunks anyway) and, in a complete cache, checks
        each against its recorded digest before any row of it is used."""
        arr = self.array(name)
        n = int(arr.shape[0]) if arr.ndim else 0
        if arr.ndim == 0:
            return np.asarray(arr[...])
        if rows is None:
            rows = slice(0, n)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            idx = np.arange(start, stop, step, dtype=np.int64)
        else:
            idx = np.asarray(rows, dtype=np.int64)
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise IndexError(f"{self.url}: rows out of range for {name!r} ({n} rows)")
            idx = np.where(idx < 0, idx + n, idx)
        if idx.size == 0:
            return np.empty((0, *arr.shape[1:]), dtype=arr.dtype if arr.dtype.kind not in "OUT" else object)
        digests, brows = self._recorded(name, arr), _block_rows(arr)
        needed = np.unique(idx // brows)
        if len(needed) == 1 or np.all(np.diff(needed) == 1):  # one contiguous run of blocks: no gather copy
            first, last = int(needed[0]), int(needed[-1])
            parts = [self._block(name, arr, b, b * brows, min(n, (b + 1) * brows), digests)
                     for b in range(first, last + 1)]
            data = parts[0] if len(parts) == 1 else np.concatenate(parts)
            local = idx - first * brows
            if isinstance(rows, slice) and step == 1:
                return data[local[0]:local[-1] + 1]
            return data[local]
        blocks = {int(b): self._block(name, arr, int(b), int(b) * brows, min(n, (int(b) + 1) * brows), digests)
                  for b in needed}
        first = next(iter(blocks.values()))
        out = np.empty((idx.size, *first.shape[1:]), dtype=first.dtype)
        which = idx // brows
        for b, block in blocks.items():
            sel = which == b
            out[sel] = block[idx[sel] - b * brows]
        return out

    def strings(self, name: str) -> list[str]:
        return [str(s) for s in self.read(name).tolist()] if self.has(name) else []

    # -- splits ----------------------------------------------------------------------------
    def use_split(self, settings: dict[str, Any] | None) -> "FeatureCache":
        """Serve the splits of the ``[split]`` table ``settings``: the stored ones when it is the table extraction
        stored, else drawn now over the stored items (seeded: every stage and rerun draws the same rows). Splits
        are cheap and the features do not depend on them, so a changed ``[split]`` needs no re-extraction."""
        stored = self.manifest.get("split")
        wanted = _jsonable(dict(settings)) if settings is not None else stored
        self._drawn = None
        if stored is not None and wanted != stored:
            from .splits import SplitError, make_splits

            labels = self.read("labels") if self.has("labels") else None
            fixed = {name: self.read(f"fixed_splits/{name}").astype(np.int64) for name in self._fixed_lists()}
            try:
                self._drawn = make_splits(self.n_items, wanted, labels=labels, fixed=fixed or None)
            except SplitError as e:
                raise CacheError(f"{self.url}: [split] {e} ({self.n_items:,} items in this cache); fix [split] "
                                 f"or --set split.KEY=VALUE") from None
        self._split_settings = wanted
        return self

    def _fixed_lists(self) -> list[str]:
        return [name.split("/", 1)[1] for name in self.data_arrays() if name.startswith("fixed_splits/")]

    @property
    def split_settings(self) -> dict[str, Any] | None:
        """The ``[split]`` table whose rows :meth:`split` returns (the stored one unless :meth:`use_split`)."""
        return self._split_settings if self._split_settings is not None else self.manifest.get("split")

    @property
    def split_redrawn(self) -> bool:
        return self._drawn is not None

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        if self._drawn is not None:
            return self._drawn[name]
        return self.read(f"splits/{name}").astype(np.int64)

    # -- resumable block-wise writing -----------------------------------------------------
    def blocks_done(self, name: str, n_blocks: int) -> np.ndarray:
        """Per-block completion flags of a block-wise write of ``name`` (all False at first)."""
        flags = self.require_array(f"_progress/{name}", (n_blocks,), bool, chunk_rows=n_blocks)
        return np.asarray(flags[...], dtype=bool)

    def mark_block_done(self, name: str, block: int) -> None:
        # Written only after the block's data is stored: a crash in between redoes that block.
        self.group[f"_progress/{name}"][block] = True

    # -- integrity -------------------------------------------------------------------------
    def data_arrays(self) -> list[str]:
        """Every array of the cache proper (not progress flags), as relative paths."""
        names: list[str] = []

        def walk(group: zarr.Group, prefix: str) -> None:
            for key, member in group.members():
                path = f"{prefix}{key}"
                if isinstance(member, zarr.Group):
                    if key != "_progress":
                        walk(member, path + "/")
                else:
                    names.append(path)
        walk(self.group, "")
        return sorted(names)

    def finalize(self, **manifest_fields: Any) -> None:
        """Record per-block digests, shapes and the fingerprint, drop progress flags, and mark the cache
        complete: the last write of an extraction, so a cache that says complete has every array."""
        checksums = {name: _digests(self.group[name]) for name in self.data_arrays()}
        shapes = {name: list(self.group[name].shape) for name in checksums}
        fingerprint = hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()[:16]
        if "_progress" in self.group:
            del self.group["_progress"]
        self.update_manifest(**manifest_fields, checksums=checksums, shapes=shapes, fingerprint=fingerprint,
                             complete=True, finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def verify(self) -> list[str]:
        """Every problem found, one line each (empty when intact): incompleteness, missing arrays, and each
        block that cannot be decoded or differs from its recorded digest. Never raises for stored data."""
        try:
            m = self.manifest
        except Exception as e:  # noqa: BLE001 - a broken manifest is a finding, not a crash
            return [f"manifest unreadable ({type(e).__name__})"]
        if not m.get("complete"):
            return ["extraction incomplete (rerun `cfrh extract` to resume)"]
        recorded = m.get("checksums", {})
        if m.get("format") != FORMAT_VERSION or not all(isinstance(v, dict) for v in recorded.values()):
            return [f"cache format {m.get('format')!r} has no per-block digests (this cfrh writes "
                    f"{FORMAT_VERSION}); re-extract with --overwrite"]
        problems = []
        try:
            present: set[str] | None = set(self.data_arrays())
        except Exception:  # noqa: BLE001 - one member's broken metadata breaks the listing; each is checked below
            present = None
        for name, entry in sorted(recorded.items()):
            try:
                arr = self.group[name]
            except Exception as e:  # noqa: BLE001 - missing or unreadable metadata
                problems.append(f"{name}: missing" if isinstance(e, KeyError)
                                else f"{name}: metadata unreadable ({type(e).__name__})")
                continue
            n = int(arr.shape[0]) if arr.ndim else 0
            if [n, *arr.shape[1:]] != m.get("shapes", {}).get(name) or int(entry["rows"]) != _block_rows(arr):
                problems.append(f"{name}: shape or chunking differs from the manifest")
                continue
            for b, start, stop in iter_row_blocks(n, int(entry["rows"])):
                try:
                    self._block(name, arr, b, start, stop, entry["blocks"])
                except CacheCorrupt as e:
                    problems.append(f"{name}: block {b} (rows {start}–{stop - 1}) "
                                    + str(e).split(" is corrupt: ", 1)[1].split("; re-extract")[0])
        problems += [f"{name}: not recorded in the manifest" for name in sorted((present or set()) - set(recorded))]
        return problems


# -- finding and locking caches -----------------------------------------------------------------
def cache_keys(root: str | os.PathLike | None, dataset: str) -> list[str]:
    """The feature keys a cache root holds for a dataset (folders with a zarr.json), complete or not."""
    fs, path = fsspec.core.url_to_fs(join(cache_root(root), dataset))
    if not fs.isdir(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)
                  if fs.exists(join(p, "zarr.json")))


def resolve_feature_key(pipeline: Any, root: str | os.PathLike | None = None, model: str | None = None) -> str:
    """Which feature cache of a pipeline the stages after extraction read.

    ``model`` (``--model``) names it; otherwise the only cache the root holds for the pipeline, so a cache
    extracted with ``cfrh extract --model DIR`` is found without repeating the model. With none there,
    it is the pipeline's own model; with several, the error lists them."""
    if model:
        return feature_key(model)
    keys = cache_keys(root, pipeline.name)
    if len(keys) == 1:
        return keys[0]
    own = feature_key(str(pipeline.features.get("image_model", "precomputed")))
    if len(keys) > 1:
        raise CacheError(f"{join(cache_root(root), pipeline.name)}: holds feature caches of several models "
                         f"({', '.join(keys)}); choose one with --model (a model or one of these keys)")
    return own


def open_pipeline_cache(pipeline: Any, cache_root: str | os.PathLike | None = None, mode: str = "r",
                        require_complete: bool = True, model: str | None = None) -> FeatureCache:
    """The cache a pipeline's later stages read (train, evaluate, encode, search, serve): the one lookup
    they all use, so they agree (:func:`resolve_feature_key`), serving the pipeline's ``[split]``."""
    key = resolve_feature_key(pipeline, cache_root, model)
    cache = FeatureCache.open(cache_root, pipeline.name, key, mode=mode, require_complete=require_complete)
    return cache.use_split(pipeline.split) if cache.is_complete else cache


def list_caches(root: str | os.PathLike | None = None) -> list[FeatureCache]:
    """Every cache group (``<dataset>/<feature-key>``) under a cache root."""
    fs, path = fsspec.core.url_to_fs(cache_root(root))
    if not fs.isdir(path):
        return []
    found = []
    for dataset in sorted(fs.ls(path, detail=False)):
        if not fs.isdir(dataset):
            continue
        name = dataset.rstrip("/").rsplit("/", 1)[-1]
        for key in cache_keys(root, name):
            try:
                found.append(FeatureCache.open(root, name, key, require_complete=False))
            except CacheError:
                continue
    return found


@contextlib.contextmanager
def writer_lock(root: str | os.PathLike | None, dataset: str, key: str, timeout: float = -1,
                on_wait: Any = None) -> Iterator[None]:
    """Hold ``<root>/<dataset>/<key>.lock`` while writing one cache: a second extraction of the same cache
    waits (``on_wait`` is called once, to say so), then finds it complete. A lock file (``filelock``: an
    OS lock, released by the kernel when its holder dies) on local roots; other fsspec stores have no
    atomic create, so there one writer at a time is the user's to arrange (the README says so)."""
    url = cache_location(root, dataset, key)
    fs, path = fsspec.core.url_to_fs(url)
    from fsspec.implementations.local import LocalFileSystem

    if not isinstance(fs, LocalFileSystem):
        yield
        return
    import filelock

    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = filelock.FileLock(path + ".lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if on_wait is not None:
            on_wait(path + ".lock")
        t0 = time.monotonic()
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise CacheError(f"{url}: another extraction has held {path}.lock for {time.monotonic() - t0:.0f} s; "
                             f"wait for it to finish, or stop it and rerun") from None
    try:
        yield
    finally:
        lock.release()


def iter_row_blocks(n: int, block_rows: int) -> Iterator[tuple[int, int, int]]:
    """(block index, start, stop) covering rows 0..n in blocks of ``block_rows``."""
    for b, start in enumerate(range(0, n, block_rows)):
        yield b, start, min(n, start + block_rows)


def fingerprint_files(paths: Iterable[os.PathLike], root: os.PathLike) -> str:
    """A fingerprint of a dataset's files: paths relative to ``root`` and sizes. Cheap (contents are not
    read) and equal on every machine holding the same copy, so a shared cache matches across the team."""
    h = hashlib.sha256()
    root = Path(root)
    for p in sorted(Path(x) for x in paths):
        h.update(f"{p.relative_to(root).as_posix()}|{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]
