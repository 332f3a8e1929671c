"""The feature cache: one Zarr v3 group per dataset × feature model.

Layout under a cache root (a local folder or any fsspec URL)::

    <root>/<dataset>/<feature-key>/          zarr group; attrs["cfrh"] is the manifest
        image        (N, D) float16           CLIP image embeddings (or imported features)
        text         (N, V) uint8 | float16  bag-of-words counts (or imported text features)
        labels       (N, C) uint8            multi-hot, evaluation only (absent when unlabelled)
        ids, paths, texts   (N,) str         item id, image path relative to the dataset root, raw text
        vocabulary   (V,) str, label_names (C,) str
        splits/{query,train,database}  int64 row indices
        runs/<run>/<bits>/{image_codes,text_codes}  packed codes; model.safetensors, model.json beside them

The manifest records what was *asked for* (``request``: dataset fingerprint, model,
preprocessing, vectoriser, split) and what was *found* (counts, drop report, versions,
per-array checksums). Opening an existing cache with a different request fails and says
what differs, so a shared cache can never silently mix two feature sets.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import fsspec
import numpy as np
import zarr

from .errors import CfrhError

FORMAT_VERSION = 1
ROW_ARRAYS = ("image", "text", "labels", "ids", "paths", "texts")
SPLITS = ("query", "train", "database")


class CacheError(CfrhError, RuntimeError):
    """A cache is missing, incomplete or corrupt; the message says which and what to run."""


class CacheMismatch(CacheError):
    """An existing cache was built with settings other than the ones asked for."""


def default_cache_root() -> str:
    return os.environ.get("CFRH_CACHE") or os.path.abspath("cache")


def feature_key(model: str) -> str:
    """A folder name for a feature model: hub ids keep org and name, local dirs their last two parts."""
    if model in ("precomputed",):
        return model
    parts = [p for p in re.split(r"[\\/]+", str(model)) if p and p not in (".", "..")]
    key = "--".join(parts[-2:]) if parts else "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", key)


def _join(root: str, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *[p.strip("/") for p in parts if p]])


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def describe_differences(have: dict, want: dict) -> list[str]:
    """One line per setting that differs between two requests (dotted keys)."""
    a, b = _flatten(have), _flatten(want)
    return [f"{k}: cache has {a.get(k, '<unset>')!r}, asked for {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def array_checksum(arr: zarr.Array, block_rows: int | None = None) -> str:
    """sha256 of an array's logical content (dtype, shape, values), independent of chunking and codecs."""
    h = hashlib.sha256(f"{arr.dtype}|{arr.shape}".encode())
    if arr.ndim == 0 or arr.shape[0] == 0:
        return h.hexdigest()
    step = block_rows or max(1, arr.chunks[0])
    for start in range(0, arr.shape[0], step):
        block = arr[start:start + step]
        if block.dtype.kind in "OUT":
            h.update("\0".join(map(str, block.tolist())).encode() + b"\0")
        else:
            h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()


class FeatureCache:
    """One dataset × feature-model group of the cache. Open with :meth:`open` or :meth:`create`."""

    def __init__(self, url: str, group: zarr.Group):
        self.url = url
        self.group = group
        self.fs, self.path = fsspec.core.url_to_fs(url)

    # -- opening ---------------------------------------------------------------------------
    @staticmethod
    def location(root: str | os.PathLike | None, dataset: str, key: str) -> str:
        return _join(str(root or default_cache_root()), dataset, key)

    @classmethod
    def exists(cls, root: str | os.PathLike | None, dataset: str, key: str) -> bool:
        url = cls.location(root, dataset, key)
        fs, path = fsspec.core.url_to_fs(url)
        return fs.exists(_join(path, "zarr.json"))

    @classmethod
    def open(cls, root: str | os.PathLike | None, dataset: str, key: str, mode: str = "r",
             request: dict | None = None, require_complete: bool = True) -> "FeatureCache":
        url = cls.location(root, dataset, key)
        if not cls.exists(root, dataset, key):
            raise CacheError(f"{url}: no feature cache here; run `cfrh extract {dataset}` first "
                             f"(or pass --cache pointing at a shared cache)")
        cache = cls(url, zarr.open_group(url, mode=mode))
        if "cfrh" not in cache.group.attrs:
            raise CacheError(f"{url}: a Zarr group without a cfrh manifest; remove it or pick another --cache")
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
        unless ``overwrite`` (which deletes it first)."""
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
        return int(self.group["ids"].shape[0])

    # -- arrays ----------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        try:
            self.group[name]
            return True
        except KeyError:
            return False

    def array(self, name: str) -> zarr.Array:
        try:
            return self.group[name]
        except KeyError:
            raise CacheError(f"{self.url}: array {name!r} is missing; rerun `cfrh extract` for this cache") from None

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
        """Write a whole array (replacing one of the same name)."""
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

    def read(self, name: str, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """A whole array, a slice, or the rows at sorted-or-not integer indices (returned in that order)."""
        arr = self.array(name)
        if rows is None:
            return arr[...]
        if isinstance(rows, slice):
            return arr[rows]
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
        order = np.argsort(rows, kind="stable")
        uniq, inverse = np.unique(rows[order], return_inverse=True)
        block = arr.get_orthogonal_selection((uniq,) + (slice(None),) * (arr.ndim - 1))
        out = np.empty_like(block, shape=(rows.size, *block.shape[1:]))
        out[order] = block[inverse]
        return out

    def strings(self, name: str) -> list[str]:
        return [str(s) for s in self.read(name).tolist()] if self.has(name) else []

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
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
        """Every array of the cache proper (not runs, not progress flags), as relative paths."""
        names: list[str] = []

        def walk(group: zarr.Group, prefix: str) -> None:
            for key, member in group.members():
                path = f"{prefix}{key}"
                if isinstance(member, zarr.Group):
                    if key not in ("runs", "_progress"):
                        walk(member, path + "/")
                else:
                    names.append(path)
        walk(self.group, "")
        return sorted(names)

    def finalize(self, **manifest_fields: Any) -> None:
        """Record checksums and counts, drop progress flags, and mark the cache complete."""
        checksums = {name: array_checksum(self.group[name]) for name in self.data_arrays()}
        shapes = {name: list(self.group[name].shape) for name in checksums}
        if "_progress" in self.group:
            del self.group["_progress"]
        self.update_manifest(**manifest_fields, checksums=checksums, shapes=shapes, complete=True,
                             finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def verify(self) -> list[str]:
        """Problems found (empty when the cache is intact): incompleteness, missing or altered arrays."""
        m = self.manifest
        if not m.get("complete"):
            return ["extraction incomplete (rerun `cfrh extract` to resume)"]
        problems = []
        recorded = m.get("checksums", {})
        present = set(self.data_arrays())
        for name, digest in recorded.items():
            if name not in present:
                problems.append(f"{name}: missing")
            elif array_checksum(self.group[name]) != digest:
                problems.append(f"{name}: checksum mismatch (contents changed since extraction)")
        problems += [f"{name}: not recorded in the manifest" for name in sorted(present - set(recorded))]
        return problems

    # -- files next to the arrays (checkpoints, reports) ----------------------------------
    def file_path(self, relpath: str) -> str:
        return _join(self.path, relpath)

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write a file atomically where the filesystem allows (temp name, then move)."""
        path = self.file_path(relpath)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = path + ".partial"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, path)
        return path

    def read_bytes(self, relpath: str) -> bytes:
        path = self.file_path(relpath)
        if not self.fs.exists(path):
            raise CacheError(f"{self.url}: {relpath} not found")
        return self.fs.cat_file(path)

    def file_exists(self, relpath: str) -> bool:
        return self.fs.exists(self.file_path(relpath))

    def local_path(self, relpath: str) -> Path | None:
        """A local filesystem path for ``relpath`` when the cache is on local disk (for plots), else None."""
        from fsspec.implementations.local import LocalFileSystem

        return Path(self.file_path(relpath)) if isinstance(self.fs, LocalFileSystem) else None

    # -- training runs ---------------------------------------------------------------------
    def runs(self) -> list[str]:
        if "runs" not in self.group:
            return []
        return sorted(k for k, _ in self.group["runs"].groups())

    def run_group(self, run: str, create: bool = False) -> zarr.Group:
        if create:
            return self.group.require_group(f"runs/{run}")
        try:
            return self.group[f"runs/{run}"]
        except KeyError:
            raise CacheError(f"{self.url}: no training run {run!r} (have: {', '.join(self.runs()) or 'none'}); "
                             f"run `cfrh train` first") from None


def open_pipeline_cache(pipeline: Any, cache_root: str | os.PathLike | None = None, mode: str = "r",
                        require_complete: bool = True) -> FeatureCache:
    """The cache a pipeline reads and writes: folder ``pipeline.name``, key from ``features.image_model``.

    The one lookup every stage after extraction uses (train, evaluate, search), so they agree."""
    key = feature_key(pipeline.features.get("image_model", "precomputed"))
    return FeatureCache.open(cache_root, pipeline.name, key, mode=mode, require_complete=require_complete)


def list_caches(root: str | os.PathLike | None = None) -> list[FeatureCache]:
    """Every cache group (``<dataset>/<feature-key>``) under a cache root."""
    root = str(root or default_cache_root())
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(path):
        return []
    found = []
    for dataset in sorted(fs.ls(path, detail=False)):
        if not fs.isdir(dataset):
            continue
        for key in sorted(fs.ls(dataset, detail=False)):
            if fs.exists(_join(key, "zarr.json")):
                ds, k = dataset.rstrip("/").rsplit("/", 1)[-1], key.rstrip("/").rsplit("/", 1)[-1]
                try:
                    found.append(FeatureCache.open(root, ds, k, require_complete=False))
                except CacheError:
                    continue
    return found


def iter_row_blocks(n: int, block_rows: int) -> Iterator[tuple[int, int, int]]:
    """(block index, start, stop) covering rows 0..n in blocks of ``block_rows``."""
    for b, start in enumerate(range(0, n, block_rows)):
        yield b, start, min(n, start + block_rows)


def fingerprint_files(paths: Iterable[Path], root: Path) -> str:
    """A fingerprint of a dataset's files: paths relative to ``root`` and sizes. Cheap (contents are not
    read) and equal on every machine holding the same copy, so a shared cache matches across the team."""
    h = hashlib.sha256()
    root = Path(root)
    for p in sorted(Path(x) for x in paths):
        h.update(f"{p.relative_to(root).as_posix()}|{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]
