"""What every dataset reader returns, and the rules every reader follows.

A reader turns a dataset's official layout into a :class:`Collection`: aligned lists of
ids, image paths and texts, optional multi-hot labels, and a :class:`DropReport` that
counts and lists everything it skipped (never silently). Readers never follow a path
outside their dataset root (:func:`inside_root`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import CfrhError


class DatasetError(CfrhError, ValueError):
    """The dataset on disk is not in the layout the reader expects; the message names the file and the fix."""


@dataclass
class DropReport:
    """Items a reader skipped, with the reason for each; stored in the cache's manifest."""

    entries: list[tuple[str, str]] = field(default_factory=list)  # (item id or path, reason)

    def add(self, item: str, reason: str) -> None:
        self.entries.append((str(item), reason))

    def extend(self, other: "DropReport") -> None:
        self.entries.extend(other.entries)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason in self.entries))

    def __len__(self) -> int:
        return len(self.entries)

    def to_dict(self, max_listed: int = 1000) -> dict:
        return {"total": len(self.entries), "by_reason": self.counts,
                "items": [list(e) for e in self.entries[:max_listed]],
                "truncated": len(self.entries) > max_listed}


@dataclass
class Collection:
    """A dataset read from disk: row i of every field describes the same image–text pair.

    ``image_paths`` are absolute paths (None when the dataset ships precomputed image
    features instead, in ``image_features``). ``texts`` are the raw tag lists joined by
    spaces, or captions joined by newlines; ``text_features`` holds a precomputed text
    representation instead when the dataset ships one. ``fixed_splits`` carries splits the
    dataset itself defines (e.g. WIKI's train/test lists) as row-index arrays.
    """

    name: str
    root: Path
    ids: list[str]
    texts: list[str]
    image_paths: list[Path] | None = None
    labels: np.ndarray | None = None  # (N, C) uint8 multi-hot
    label_names: list[str] = field(default_factory=list)
    text_kind: str = "tags"  # "tags" | "captions" | "precomputed"
    image_features: np.ndarray | None = None  # (N, D) float, for precomputed-feature datasets
    text_features: np.ndarray | None = None  # (N, V) float, for precomputed-feature datasets
    vocabulary: list[str] | None = None  # a vocabulary the dataset itself fixes (e.g. MIRFLICKR's 1,386 tags)
    fixed_splits: dict[str, np.ndarray] | None = None
    dropped: DropReport = field(default_factory=DropReport)
    fingerprint_extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name in ("texts", "image_paths", "labels", "image_features", "text_features"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise DatasetError(f"{self.root}: reader bug, {name} has {len(value)} rows for {n} ids")
        if len(set(self.ids)) != n:
            raise DatasetError(f"{self.root}: duplicate item ids; every image–text pair needs a unique id")
        if self.labels is not None:
            self.labels = np.ascontiguousarray(self.labels, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: np.ndarray) -> "Collection":
        """The rows ``rows`` (in that order), e.g. to drop items after a vocabulary filter."""
        rows = np.asarray(rows, dtype=np.int64)
        pick = lambda xs: None if xs is None else [xs[i] for i in rows]  # noqa: E731
        arr = lambda a: None if a is None else a[rows]  # noqa: E731
        splits = None
        if self.fixed_splits is not None:
            new_index = np.full(len(self), -1, dtype=np.int64)
            new_index[rows] = np.arange(len(rows))
            splits = {k: new_index[v][new_index[v] >= 0] for k, v in self.fixed_splits.items()}
        return Collection(name=self.name, root=self.root, ids=pick(self.ids), texts=pick(self.texts),
                          image_paths=pick(self.image_paths), labels=arr(self.labels),
                          label_names=self.label_names, text_kind=self.text_kind,
                          image_features=arr(self.image_features), text_features=arr(self.text_features),
                          vocabulary=self.vocabulary, fixed_splits=splits, dropped=self.dropped,
                          fingerprint_extra=self.fingerprint_extra)


def inside_root(root: Path, relative: str | Path) -> Path | None:
    """``root / relative`` resolved, or None when it escapes ``root`` (``..``, absolute paths, symlinks out)."""
    root = Path(root).resolve()
    p = (root / relative).resolve()
    try:
        p.relative_to(root)
    except ValueError:
        return None
    return p


def require(path: Path, what: str, fix: str) -> Path:
    """Fail with one line naming the missing file/folder and how to fix it."""
    if not Path(path).exists():
        raise DatasetError(f"{path}: {what} not found; {fix}")
    return Path(path)


Reader = Callable[..., Collection]
READERS: dict[str, Reader] = {}


def register(name: str) -> Callable[[Reader], Reader]:
    """Register a reader under the name pipelines use in ``[dataset] reader = ...``."""
    def wrap(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn
    return wrap


def check_reader_options(reader: str, options: dict[str, Any]) -> None:
    """A known reader and only the options it takes (each reader's keyword arguments), so a misspelt
    ``[dataset]`` key is one line listing the known ones, not a TypeError from inside the reader."""
    import inspect

    from . import load_all

    load_all()
    if reader not in READERS:
        raise DatasetError(f"unknown dataset reader {reader!r}; known: {', '.join(sorted(READERS))}")
    params = inspect.signature(READERS[reader]).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = [name for name, p in list(params.items())[1:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DatasetError(f"[dataset] {unknown} not understood by reader {reader!r}; it takes reader, root"
                           + "".join(f", {k}" for k in known))


def read_dataset(reader: str, root: str | Path, **options) -> Collection:
    """Read a dataset with a registered reader; ``options`` come from the pipeline's ``[dataset]`` table."""
    check_reader_options(reader, options)
    root = Path(root).expanduser().resolve()
    require(root, "dataset root", "point [dataset] root (or --root) at the dataset's folder")
    return READERS[reader](root, **options)
