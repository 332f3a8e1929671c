"""Addresses: the one place that turns names into locations.

Two roots, each a local folder or any fsspec URL, kept apart so that a shared, read-only feature
cache can serve many people who each write their own runs (nanoGPT's ``out_dir`` idea)::

    <cache root>/<dataset>/<feature key>/                 one feature cache (Zarr group), written by extract
    <runs root>/<dataset>/<feature key>/<run>/            one training run: run.json
    <runs root>/<dataset>/<feature key>/<run>/<bits>/     model.safetensors, model.json, {image,text}_codes.npy
    <runs root>/<dataset>/<feature key>/<run>/report/     report.json, report.md, plots

Defaults follow the working directory: ``./cache`` (``$CFRH_CACHE``) and ``./runs`` (``$CFRH_RUNS``).
The feature key names the image model (``openai--clip-vit-base-patch32``, ``precomputed``), so caches of
one dataset from two models live side by side, and a run says which one it was trained on.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

CACHE_ENV = "CFRH_CACHE"
RUNS_ENV = "CFRH_RUNS"
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


def cache_root(root: str | os.PathLike | None = None) -> str:
    """The cache root: as given, else ``$CFRH_CACHE``, else ``./cache`` under the working directory."""
    return str(root or os.environ.get(CACHE_ENV) or os.path.abspath("cache"))


def runs_root(root: str | os.PathLike | None = None) -> str:
    """The runs root: as given, else ``$CFRH_RUNS``, else ``./runs`` under the working directory."""
    return str(root or os.environ.get(RUNS_ENV) or os.path.abspath("runs"))


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for folders and URLs alike (no ``os.path``: URLs keep their ``/``)."""
    return "/".join([str(root).rstrip("/"), *[p.strip("/") for p in parts if p]])


def feature_key(model: str) -> str:
    """A folder name for a feature model: hub ids keep org and name, local dirs their last two parts."""
    if model == "precomputed":
        return model
    parts = [p for p in re.split(r"[\\/]+", str(model)) if p and p not in (".", "..")]
    key = "--".join(parts[-2:]) if parts else "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", key)


def check_name(value: str, what: str) -> str:
    """Names that become folder names (runs, datasets): letters, digits, '.', '_' and '-' only."""
    if not NAME_RE.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"{what} {value!r}: use letters, digits, '.', '_' or '-' (it becomes a folder name)")
    return value


def cache_location(root: str | os.PathLike | None, dataset: str, key: str) -> str:
    """Where the feature cache of (dataset, feature key) lives under a cache root."""
    return join(cache_root(root), dataset, key)


@dataclass(frozen=True)
class RunLocation:
    """Where one training run's files live: ``<runs root>/<dataset>/<feature key>/<run>``."""

    root: str
    dataset: str
    key: str
    run: str

    @classmethod
    def of(cls, root: str | os.PathLike | None, dataset: str, key: str, run: str) -> "RunLocation":
        return cls(runs_root(root), dataset, key, check_name(run, "run name"))

    @property
    def url(self) -> str:
        return join(self.root, self.dataset, self.key, self.run)

    def path(self, *parts: str) -> str:
        """A file or folder of the run (``run.json``, ``64/model.json``, ``report/report.md``)."""
        return join(self.url, *parts)

    def bits(self, bits: int, name: str) -> str:
        """A file of one bit length: ``model.safetensors``, ``model.json``, ``image_codes.npy``, ..."""
        return self.path(str(int(bits)), name)
