"""Helpers every reader shares: cheap, guarded image look-up, strict text decoding and the
dataset-contents fingerprint."""
from __future__ import annotations

import codecs
import hashlib
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import numpy as np

from ..cache import fingerprint_files
from .base import Collection, DatasetError, DropReport, inside_root

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


def _codec(encoding: str, path: Path) -> str:
    """The codec for ``dataset.encoding``; UTF-8 reads (and drops) a leading byte-order mark."""
    try:
        name = codecs.lookup(str(encoding)).name
    except LookupError:
        raise DatasetError(f"{path}: dataset.encoding = {encoding!r} is not a text encoding Python knows; use "
                           f"e.g. utf-8, cp1252 or latin-1") from None
    return "utf-8-sig" if name == "utf-8" else name


def _line_of(data: bytes, offset: int, codec: str) -> int:
    """The 1-based line holding byte ``offset`` of ``data``."""
    return data[:offset].decode(codec, errors="replace").count("\n") + 1


def _decode_error(path: Path, err: UnicodeDecodeError, data: bytes, codec: str, fix: str) -> DatasetError:
    line = _line_of(data, err.start, codec)
    return DatasetError(f"{path}:{line}: not valid {codec.replace('-sig', '')} text (byte 0x{data[err.start]:02x}); "
                        f"{fix}")


READ_TEXT_FIX = "re-save the file as UTF-8"
FOLDER_ENCODING_FIX = "set dataset.encoding to the file's encoding (e.g. \"cp1252\") or re-save it as UTF-8"


def read_text(path: Path, encoding: str = "utf-8", fix: str = READ_TEXT_FIX) -> str:
    """A text file as str, decoded strictly (UTF-8 by default, a byte-order mark dropped). A byte that does not
    decode stops the read with one line naming the file, its line and ``fix``: a guessed re-decoding of the
    whole file (Latin-1) would silently turn every correct "café" into "cafÃ©"."""
    path = Path(path)
    data = path.read_bytes()
    codec = _codec(encoding, path)
    try:
        return data.decode(codec)
    except UnicodeDecodeError as err:
        raise _decode_error(path, err, data, codec, fix) from None


ITEM_NOT_UTF8 = "text file not valid UTF-8"


def read_item_text(path: Path) -> str | None:
    """The text of one item's own file (a WIKI article, a MIRFLICKR tag file), or None when it is not valid
    UTF-8: the reader drops that item under :data:`ITEM_NOT_UTF8`, counted, instead of stopping the whole
    dataset for one file."""
    try:
        return read_text(path)
    except DatasetError:
        return None


_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes that did not decode, as surrogateescape keeps them


def read_text_lenient(path: Path, encoding: str = "utf-8") -> str:
    """A text file as str in which each byte that does not decode is kept as a lone surrogate
    (``surrogateescape``), so a reader can drop just the lines holding one (:func:`undecodable`) and keep
    the rest exactly. An encoding that cannot mark bytes so (UTF-16 with a broken pair) stops the read with
    one line naming the first bad byte's line."""
    path = Path(path)
    data = path.read_bytes()
    codec = _codec(encoding, path)
    try:
        return data.decode(codec, errors="surrogateescape")
    except UnicodeDecodeError as err:
        raise _decode_error(path, err, data, codec, FOLDER_ENCODING_FIX) from None


def undecodable(*texts: Any) -> bool:
    """True when any of ``texts`` holds a byte that did not decode (see :func:`read_text_lenient`)."""
    return any(isinstance(t, str) and _UNDECODED.search(t) is not None for t in texts)


def undecodable_reason(encoding: str) -> str:
    """The drop reason of a line with bytes that do not decode (one wording, so the report counts them)."""
    return f"text not valid {encoding} (set dataset.encoding)"


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
