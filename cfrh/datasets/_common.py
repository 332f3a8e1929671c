"""Helpers every reader shares: cheap, guarded image look-up and the dataset-contents fingerprint."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import numpy as np

from ..cache import fingerprint_files
from .base import Collection, DropReport, inside_root

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def _listing(folder: Path) -> dict[str, os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return {e.name: e for e in it}
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return {}


def locate_files(root: Path, relpaths: Sequence[str], ids: Sequence[str], dropped: DropReport,
                 what: str = "image") -> tuple[np.ndarray, list[Path | None]]:
    """Resolve ``relpaths`` under ``root``; returns (found mask, absolute paths or None).

    Each folder is listed once (``os.scandir``) instead of one ``stat`` per file, so this stays
    cheap for hundreds of thousands of images. A path that leaves ``root`` (``..``, an absolute
    path, a symlink pointing out) is dropped as "path escapes dataset root" and never followed;
    a path with no regular file behind it is dropped as "missing <what>". Files are not opened.
    """
    root = Path(root).resolve()
    found = np.zeros(len(relpaths), dtype=bool)
    paths: list[Path | None] = [None] * len(relpaths)
    folders: dict[str, tuple[Path | None, dict[str, os.DirEntry]]] = {}
    for i, (rel, item) in enumerate(zip(relpaths, ids)):
        rel = str(rel).replace("\\", "/")
        pure = PurePosixPath(rel)
        if not rel or pure.is_absolute() or ".." in pure.parts or Path(rel).is_absolute():
            target = inside_root(root, rel) if rel else None
            if target is None:
                dropped.add(item, "path escapes dataset root")
                continue
            pure = PurePosixPath(target.relative_to(root).as_posix())
        parent = pure.parent.as_posix()
        if parent not in folders:
            folder = inside_root(root, parent)
            folders[parent] = (folder, _listing(folder) if folder is not None else {})
        folder, entries = folders[parent]
        if folder is None:
            dropped.add(item, "path escapes dataset root")
            continue
        entry = entries.get(pure.name)
        if entry is None:
            dropped.add(item, f"missing {what}")
            continue
        path = folder / pure.name
        if entry.is_symlink():
            resolved = inside_root(root, path.relative_to(root))
            if resolved is None:
                dropped.add(item, "path escapes dataset root")
                continue
            if not resolved.is_file():
                dropped.add(item, f"missing {what}")
                continue
        elif not entry.is_file():
            dropped.add(item, f"missing {what}")
            continue
        found[i] = True
        paths[i] = path
    return found, paths


def ids_digest(ids: Iterable[str]) -> str:
    """A short digest of the kept item ids (in order): equal ids, equal digest."""
    h = hashlib.sha256()
    for item in ids:
        h.update(item.encode() + b"\0")
    return h.hexdigest()[:16]


def with_fingerprint(collection: Collection, files: Iterable[Path], **options) -> Collection:
    """Set ``collection.fingerprint_extra`` to what identifies the dataset's contents for the cache
    manifest: its annotation files (names and sizes, via :func:`cfrh.cache.fingerprint_files`), the
    reader options, and digests of the ids, texts and labels kept (so an edited caption with the same
    file size still changes it). Image files are not stat-ed one by one; their names are in the ids."""
    root = Path(collection.root).resolve()
    files = sorted({Path(f).resolve() for f in files})
    out = {"files": [f.relative_to(root).as_posix() for f in files],
           "files_fingerprint": fingerprint_files(files, root),
           "options": {k: v for k, v in sorted(options.items())},
           "n_items": len(collection), "ids": ids_digest(collection.ids), "texts": ids_digest(collection.texts)}
    if collection.labels is not None:
        out["labels"] = hashlib.sha256(str(collection.labels.shape).encode()
                                       + np.ascontiguousarray(collection.labels).tobytes()).hexdigest()[:16]
    collection.fingerprint_extra = out
    return collection


def one_hot(classes: np.ndarray, n_classes: int) -> np.ndarray:
    """(N,) class indices in 0..n_classes-1 → (N, n_classes) uint8 one-hot rows."""
    out = np.zeros((len(classes), n_classes), dtype=np.uint8)
    out[np.arange(len(classes)), np.asarray(classes, dtype=np.int64)] = 1
    return out


def read_text(path: Path) -> str:
    """A text file as str: UTF-8, falling back to Latin-1 (older benchmark files are not all UTF-8)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def apply_drops(ids: Sequence[str], dropped: DropReport,
                rules: Iterable[tuple[np.ndarray, str]]) -> np.ndarray:
    """Row indices that pass every ``(mask of rows to drop, reason)`` rule; each dropped row is recorded
    once, under the first rule it fails, so the report's counts add up to the rows removed."""
    keep = np.ones(len(ids), dtype=bool)
    for mask, reason in rules:
        for i in np.flatnonzero(keep & mask):
            dropped.add(ids[i], reason)
        keep &= ~np.asarray(mask, dtype=bool)
    return np.flatnonzero(keep)
