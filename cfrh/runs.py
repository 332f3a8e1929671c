"""Training runs: what ``cfrh train`` writes, apart from the feature cache it read.

A run lives at ``<runs root>/<dataset>/<feature key>/<run>`` (:class:`cfrh.locations.RunLocation`), a
local folder or any fsspec URL::

    run.json                           the cache it was trained on (url, fingerprint), settings, per-bit
                                       completion and loss history
    <bits>/model.safetensors, model.json   the trained model (:meth:`cfrh.CFRH.save` layout)
    <bits>/image_codes.npy, text_codes.npy packed codes of every cache row, uint8 (N, bits/8)
    <bits>/checkpoint.safetensors      while training (model, optimiser, RNG state; removed at the end)
    report/                            what ``cfrh evaluate`` writes

Keeping runs apart lets a team share one read-only cache while each person trains into their own
``--runs``; the recorded fingerprint keeps a run from being scored against another cache.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from .cache import CacheError, FeatureCache
from .errors import CfrhError
from .locations import RunLocation, join, runs_root

MODALITIES = ("image", "text")


class RunError(CfrhError, RuntimeError):
    """A run is missing, incomplete, or belongs to another cache; the message says what to run."""


class RunStore:
    """The files of one training run (see the module docstring)."""

    def __init__(self, location: RunLocation):
        self.location = location
        self.fs, self.path = fsspec.core.url_to_fs(location.url)

    @classmethod
    def of(cls, root: str | os.PathLike | None, cache: FeatureCache, run: str) -> "RunStore":
        """The run ``run`` of ``cache``'s dataset and feature key under the runs root."""
        try:
            return cls(RunLocation.of(root, cache.dataset, cache.key, run))
        except ValueError as e:
            raise RunError(str(e)) from None

    @property
    def url(self) -> str:
        return self.location.url

    @property
    def name(self) -> str:
        return self.location.run

    # -- files ---------------------------------------------------------------------------------
    def _path(self, relpath: str) -> str:
        return join(self.path, relpath)

    def url_of(self, relpath: str) -> str:
        return join(self.url, relpath)

    def exists(self, relpath: str) -> bool:
        return self.fs.exists(self._path(relpath))

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write a file atomically where the filesystem allows (temporary name, then move)."""
        path = self._path(relpath)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.partial-{os.getpid()}"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, path)
        return self.url_of(relpath)

    def read_bytes(self, relpath: str) -> bytes:
        if not self.exists(relpath):
            raise RunError(f"{self.url_of(relpath)}: not found")
        return self.fs.cat_file(self._path(relpath))

    def remove(self, relpath: str) -> None:
        if self.exists(relpath):
            self.fs.rm(self._path(relpath), recursive=True)

    def local_path(self, relpath: str) -> Path | None:
        """A local path for ``relpath`` when the run is on local disk, else None."""
        from fsspec.implementations.local import LocalFileSystem

        return Path(self._path(relpath)) if isinstance(self.fs, LocalFileSystem) else None

    # -- run.json ------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return json.loads(self.read_bytes("run.json")) if self.exists("run.json") else {}

    def update_info(self, **changes: Any) -> dict[str, Any]:
        """Merge ``changes`` into run.json (``history`` and ``complete`` merge key by bit length)."""
        info = self.info()
        for key, value in changes.items():
            if isinstance(value, dict) and key in ("history", "complete"):
                info[key] = {**info.get(key, {}), **value}
            else:
                info[key] = value
        self.write_bytes("run.json", json.dumps(info, indent=1, default=_plain).encode())
        return info

    def complete_bits(self) -> list[int]:
        return sorted(int(b) for b, done in self.info().get("complete", {}).items() if done)

    def check_cache(self, cache: FeatureCache) -> None:
        """Refuse a run trained on another cache than ``cache`` (different content fingerprint)."""
        info = self.info()
        if not info:
            have = list_runs(self.location.root, cache)
            raise RunError(f"{self.url}: no training run {self.name!r} for this cache (runs here: "
                           f"{', '.join(have) or 'none'}); run `cfrh train {cache.dataset}"
                           + (f" --run {self.name}" if self.name != "cfrh" else "") + "` first, or pass --runs")
        trained_on = info.get("cache", {}).get("fingerprint")
        split = info.get("cache", {}).get("split")
        if trained_on == cache.fingerprint and split is not None and split != cache.split_settings:
            raise RunError(f"{self.url}: run {self.name!r} was trained with another [split] ({split}; the pipeline "
                           f"now has {cache.split_settings}); retrain it with `cfrh train {cache.dataset} "
                           f"--no-resume`, or use another --run for this split")
        if trained_on != cache.fingerprint:
            raise RunError(f"{self.url}: run {self.name!r} was trained on another cache (fingerprint {trained_on}, "
                           f"this cache {cache.fingerprint}: {cache.url}); retrain it with `cfrh train "
                           f"{cache.dataset} --no-resume` or point --cache at the cache it was trained on")

    # -- codes ---------------------------------------------------------------------------------
    def write_codes(self, bits: int, modality: str, codes: np.ndarray) -> str:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(codes, dtype=np.uint8), allow_pickle=False)
        return self.write_bytes(f"{int(bits)}/{modality}_codes.npy", buf.getvalue())

    def read_codes(self, bits: int, modality: str, n_items: int | None = None) -> np.ndarray:
        """A bit length's packed codes for every cache row, checked for shape when ``n_items`` is given."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        rel = f"{int(bits)}/{modality}_codes.npy"
        if int(bits) not in self.complete_bits() or not self.exists(rel):
            raise RunError(f"{self.url}: run {self.name!r} has no complete {bits}-bit codes (complete: "
                           f"{', '.join(map(str, self.complete_bits())) or 'none'}); run `cfrh train "
                           f"{self.location.dataset} --bits {bits}"
                           + (f" --run {self.name}" if self.name != "cfrh" else "") + "`")
        try:
            codes = np.load(io.BytesIO(self.read_bytes(rel)), allow_pickle=False)
        except ValueError as e:
            raise RunError(f"{self.url_of(rel)}: unreadable ({e}); retrain with `cfrh train --no-resume`") from None
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != int(bits) // 8 or (
                n_items is not None and codes.shape[0] != n_items):
            raise RunError(f"{self.url_of(rel)}: {codes.dtype} {codes.shape}, expected uint8 "
                           f"({n_items if n_items is not None else 'N'}, {int(bits) // 8}); retrain with "
                           f"`cfrh train --no-resume`")
        return codes

    def model_dir(self, bits: int) -> str:
        """The folder of one bit length's model (``CFRH.save`` / ``CFRH.load``)."""
        return self.url_of(str(int(bits)))


def list_runs(root: str | os.PathLike | None, cache: FeatureCache) -> list[str]:
    """Names of the runs under a runs root for a cache's dataset and feature key."""
    fs, path = fsspec.core.url_to_fs(join(runs_root(root), cache.dataset, cache.key))
    if not fs.isdir(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)
                  if fs.exists(join(p, "run.json")))


def open_run(root: str | os.PathLike | None, cache: FeatureCache, run: str) -> RunStore:
    """A run that exists and was trained on ``cache``: what evaluate, encode, search and serve read."""
    store = RunStore.of(root, cache, run)
    store.check_cache(cache)
    return store


def _plain(obj: Any) -> Any:
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


__all__ = ["RunStore", "RunError", "list_runs", "open_run", "CacheError"]
