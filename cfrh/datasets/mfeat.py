"""Multi-view CSV folders: UCI Multiple Features (van Breukelen et al. 1998) and any set in its layout.

Layout (``reader = "mfeat"``): one file per view, ``<prefix><view>.csv`` (prefix ``mfeat-``), each
with a header row and one row per item — the same items in the same order in every file — and a
label column (a header named ``label``, else the last column; ``label_column`` names another). UCI
Multiple Features ships six such views of 2,000 handwritten digits (200 per class): ``pix`` (240
pixel averages), ``fou`` (76 Fourier coefficients), ``fac``, ``kar``, ``zer``, ``mor``.

Two views become the two modalities, as precomputed features (like the WIKI ``.mat`` release):
``image_view`` (default ``pix``) and ``text_view`` (default ``fou``), the protocol the shared copy's
README gives for cross-modal hashing. Labels are single-class, one-hot over the distinct label values
(sorted numerically when they are all integers); both views must give the same label on every row.

Splits (fixed, so the ``[split]`` table picks them with ``method = "fixed"``): the order
``numpy.random.default_rng(seed).permutation(N)``; its first ``query`` rows are ``"test"`` (the
queries), the others ``"train"`` (training set and database). The split lists keep that order.
Ids are the row numbers ``"0" … "N-1"``.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._common import one_hot, read_text, with_fingerprint
from .base import Collection, DatasetError, register

_FIX_ROWS = "every view file must list the same items, one row each, in the same order"


@dataclass
class View:
    """One view file: its features, the label of every row, and the file line of every row (for messages)."""

    path: Path
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray    # (N,) str
    lines: np.ndarray     # (N,) 1-based line numbers in the file


def view_path(root: Path, view: str, prefix: str = "mfeat-") -> Path:
    """The file of ``view``, or a one-line error listing the views the folder has."""
    path = Path(root) / f"{prefix}{view}.csv"
    if not path.is_file():
        have = sorted(p.name[len(prefix):-len(".csv")] for p in Path(root).glob(f"{prefix}*.csv"))
        raise DatasetError(f"{path}: view {view!r} not found (views here: {', '.join(have) or 'none'}); set "
                           f"dataset.image_view / dataset.text_view to one of them, or dataset.prefix to the "
                           f"files' prefix")
    return path


def _label_index(header: list[str], label_column: str, path: Path) -> int:
    names = [h.strip() for h in header]
    if label_column == "auto":
        return next((i for i, h in enumerate(names) if h.lower() == "label"), len(names) - 1)
    if label_column == "last":
        return len(names) - 1
    if label_column not in names:
        raise DatasetError(f"{path}: no column {label_column!r} in the header; set dataset.label_column to one "
                           f"of its names, \"last\" or \"auto\" (a column named label, else the last)")
    return len(names) - 1 - names[::-1].index(label_column)


def _first_bad_cell(path: Path, cells: np.ndarray, lines: np.ndarray, header: list[str]) -> DatasetError:
    """The first cell that is not a finite number, as a one-line error naming the file, line and column."""
    for r in range(cells.shape[0]):
        for c in range(cells.shape[1]):
            try:
                ok = np.isfinite(float(cells[r, c]))
            except ValueError:
                ok = False
            if not ok:
                return DatasetError(f"{path}:{lines[r]}: column {header[c].strip()!r} holds {str(cells[r, c])!r}, "
                                    f"not a finite number; fix or remove that row in every view file")
    return DatasetError(f"{path}: unreadable numbers; check the file")  # not reached: the caller saw a bad cell


def read_view(path: Path, label_column: str = "auto") -> View:
    """Parse one view file: header, then one row of numbers per item plus its label; a malformed file fails
    with one line naming the file, the line and the fix."""
    text = read_text(path).lstrip("\ufeff")
    numbered = [(no, row) for no, row in enumerate(csv.reader(text.splitlines()), 1) if any(c.strip() for c in row)]
    if len(numbered) < 2:
        raise DatasetError(f"{path}: {'empty' if not numbered else 'a header but no rows'}; it needs a header row "
                           f"and one row per item")
    (_, header), body = numbered[0], numbered[1:]
    for no, row in body:
        if len(row) != len(header):
            raise DatasetError(f"{path}:{no}: {len(row)} fields where the header has {len(header)}; every row needs "
                               f"one value per header column")
    col = _label_index(header, label_column, path)
    table = np.array([row for _, row in body], dtype=str)
    lines = np.array([no for no, _ in body], dtype=np.int64)
    cells = np.delete(table, col, axis=1)
    names = [h for i, h in enumerate(header) if i != col]
    try:
        features = cells.astype(np.float64)
    except ValueError:
        raise _first_bad_cell(path, cells, lines, names) from None
    if not np.isfinite(features).all():
        raise _first_bad_cell(path, cells, lines, names)
    labels = np.char.strip(table[:, col])
    empty = np.flatnonzero(labels == "")
    if empty.size:
        raise DatasetError(f"{path}:{lines[empty[0]]}: the label column {header[col].strip()!r} is empty; give "
                           f"every row its class")
    return View(path=path, features=features.astype(np.float32), labels=labels, lines=lines)


def _classes(labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(class names, class index per row): distinct labels, in numeric order when all are integers."""
    names = np.unique(labels)
    try:
        names = names[np.argsort(names.astype(np.int64), kind="stable")]
    except ValueError:
        pass  # names that are not all integers keep their text order
    index = {name: i for i, name in enumerate(names)}
    return [str(n) for n in names], np.array([index[x] for x in labels], dtype=np.int64)


def _check_same_items(image: View, text: View) -> None:
    if len(image.labels) != len(text.labels):
        raise DatasetError(f"{text.path}: {len(text.labels)} rows but {image.path.name} has {len(image.labels)}; "
                           f"{_FIX_ROWS}")
    differ = np.flatnonzero(image.labels != text.labels)
    if differ.size:
        r = differ[0]
        raise DatasetError(f"{text.path}:{text.lines[r]}: label {str(text.labels[r])!r}, but {image.path.name} line "
                           f"{image.lines[r]} (the same row) says {str(image.labels[r])!r}; {_FIX_ROWS}")


def protocol_splits(n: int, query: int, seed: int) -> dict[str, np.ndarray]:
    """``{"test": first `query` rows of default_rng(seed).permutation(n), "train": the rest}``, in that order."""
    if isinstance(query, bool) or not isinstance(query, int) or not 0 < query < n:
        raise DatasetError(f"dataset.query = {query!r}: it must be an integer between 1 and {n - 1} (the queries "
                           f"drawn from the {n} items)")
    order = np.random.default_rng(seed).permutation(n)
    return {"test": order[:query].astype(np.int64), "train": order[query:].astype(np.int64)}


@register("mfeat")
def read_mfeat(root: Path, image_view: str = "pix", text_view: str = "fou", label_column: str = "auto",
               query: int = 400, seed: int = 0, prefix: str = "mfeat-") -> Collection:
    """Read two views of a multi-view CSV folder as image and text features, with one-hot labels and the
    permutation protocol's fixed splits (see the module docstring)."""
    root = Path(root)
    image = read_view(view_path(root, image_view, prefix), label_column)
    text = read_view(view_path(root, text_view, prefix), label_column)
    _check_same_items(image, text)
    names, classes = _classes(image.labels)
    n = len(classes)
    collection = Collection(name="mfeat", root=root, ids=[str(i) for i in range(n)], texts=[""] * n,
                            labels=one_hot(classes, len(names)), label_names=names, text_kind="precomputed",
                            image_features=image.features, text_features=text.features,
                            fixed_splits=protocol_splits(n, query, seed))
    return with_fingerprint(collection, [image.path, text.path], reader="mfeat", image_view=image_view,
                            text_view=text_view, label_column=label_column, query=query, seed=seed, prefix=prefix)
