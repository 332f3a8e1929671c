"""Precomputed features in the ``.mat`` conventions of DCMH / DJSRH / JDSH / UCCH releases.

Two forms, in one file or spread over several (``mirflickr25k-iall.mat``, ``-yall.mat``, ``-lall.mat``):

* whole-collection arrays: image ``XAll`` / ``IAll`` (N, D), text ``YAll`` / ``TAll`` (N, V), labels
  ``LAll`` (N, C); ids are the row numbers ``"0" … "N-1"``;
* per-split arrays ``I_<s>``/``X_<s>``, ``T_<s>``/``Y_<s>``, ``L_<s>`` for splits ``s`` such as
  ``tr``, ``te``, ``db`` (named "train", "test", "database"; other suffixes keep their name):
  rows are train, then test, then database, then the others sorted; they become fixed splits and
  ids are ``"<split>/<row in split>"``.

Key names can be given (``image_key``, ``text_key``, ``label_key``; a ``{split}`` in the name makes
it a per-split template). Text features are required: files without them stop with one line naming
the files, the variable names looked for and what the files hold (a collection without image
features is read, with a warning worded the same way, e.g. to compare tag matrices). Labels given
as class indices (a vector) become one-hot. MATLAB v7.3 (HDF5) files are read with h5py. Arrays of
raw pixels (DJSRH's ``IAll`` is N × 3 × 224 × 224) are not features: they are refused with a pointer
to the image readers.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import scipy.sparse as sp

from ._common import one_hot, with_fingerprint
from .base import Collection, DatasetError, register

log = logging.getLogger(__name__)

ALL_KEYS = {"image": ("XAll", "IAll", "I_all", "X_all", "image_features"),
            "text": ("YAll", "TAll", "T_all", "Y_all", "text_features"),
            "labels": ("LAll", "L_all", "labels")}
SPLIT_TEMPLATES = {"image": ("I_{split}", "X_{split}"), "text": ("T_{split}", "Y_{split}"), "labels": ("L_{split}",)}
SPLIT_ALIASES = {"tr": "train", "te": "test", "db": "database"}
SPLIT_ORDER = ("train", "test", "database")
# What scipy and h5py raise on a truncated, corrupt or foreign file.
_READ_ERRORS = (OSError, ValueError, TypeError, IndexError, NotImplementedError, scipy.io.matlab.MatReadError)


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(128)
    return len(head) == 128 and head[124:126] in (b"\x00\x02", b"\x02\x00")


def mat_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Variable name → shape (rows first, as MATLAB shows it), without loading the data."""
    path = Path(path)
    try:
        if _is_hdf5(path):
            h5py = _h5py(path)
            with h5py.File(path, "r") as f:
                return {k: _h5_shape(f[k]) for k in f.keys() if not k.startswith("#")}
        return {name: tuple(shape) for name, shape, _ in scipy.io.whosmat(str(path))}
    except _READ_ERRORS as e:
        raise DatasetError(f"{path}: not a readable MATLAB .mat file ({e}); re-download or re-save it") from None


def _h5py(path: Path) -> Any:
    try:
        import h5py
    except ImportError:
        raise DatasetError(f"{path}: a MATLAB v7.3 (HDF5) file needs h5py; `pip install h5py` or re-save it in "
                           f"MATLAB with save(..., '-v7')") from None
    return h5py


def _h5_shape(node: Any) -> tuple[int, ...]:
    if "MATLAB_sparse" in node.attrs:
        return int(node.attrs["MATLAB_sparse"]), int(node["jc"].shape[0] - 1)
    return tuple(reversed(node.shape))  # HDF5 stores MATLAB's column-major arrays transposed


def _h5_read(node: Any) -> np.ndarray:
    if "MATLAB_sparse" in node.attrs:
        rows = int(node.attrs["MATLAB_sparse"])
        jc = node["jc"][()]
        data = node["data"][()] if "data" in node else np.ones(int(jc[-1]), dtype=np.uint8)
        return sp.csc_matrix((data, node["ir"][()], jc), shape=(rows, len(jc) - 1)).toarray()
    return np.asarray(node[()]).T


def load_mat(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    """The named variables of a .mat file (v4–v7 via scipy, v7.3 via h5py) as dense numpy arrays."""
    path = Path(path)
    try:
        if _is_hdf5(path):
            h5py = _h5py(path)
            with h5py.File(path, "r") as f:
                return {k: _h5_read(f[k]) for k in keys}
        data = scipy.io.loadmat(str(path), variable_names=keys)
    except (*_READ_ERRORS, KeyError) as e:
        raise DatasetError(f"{path}: cannot read {keys} ({e}); re-download or re-save the file") from None
    missing = [k for k in keys if k not in data]
    if missing:
        raise DatasetError(f"{path}: variables {missing} not found; it holds {sorted(mat_shapes(path))}")
    return {k: data[k].toarray() if sp.issparse(data[k]) else np.asarray(data[k]) for k in keys}


def _as_matrix(key: str, array: np.ndarray, n: int | None, path: Path, kind: str) -> np.ndarray:
    """Rows = items (a 1 × n vector is turned into a column); pixel arrays are refused."""
    if array.ndim > 2:
        raise DatasetError(f"{path}: {key} is {array.shape}, raw pixels rather than features; read the images "
                           f"with their dataset's reader (e.g. reader = \"mirflickr25k\") or name a feature "
                           f"array with dataset.{kind}_key")
    if array.ndim == 2 and n is not None and array.shape == (1, n) and n != 1:
        array = array.T
    if array.ndim == 1:
        array = array[:, None]
    return array


def _match_keys(shapes: dict[str, tuple], overrides: dict[str, str | None]) -> tuple[str, dict]:
    """("all", {kind: key}) or ("split", {kind: {split_suffix: key}})."""
    templates = {kind: (overrides[kind],) if overrides.get(kind) else SPLIT_TEMPLATES[kind] for kind in SPLIT_TEMPLATES}
    whole = {kind: next((k for k in ((overrides[kind],) if overrides.get(kind) else ALL_KEYS[kind])
                         if k and "{split}" not in k and k in shapes), None) for kind in ALL_KEYS}
    if whole["image"] or whole["text"]:
        return "all", whole
    found: dict[str, dict[str, str]] = {kind: {} for kind in templates}
    for kind, temps in templates.items():
        for t in temps:
            if "{split}" not in t:
                continue
            pattern = re.compile("^" + re.escape(t).replace(re.escape("{split}"), r"(\w+?)") + "$")
            for k in shapes:
                m = pattern.match(k)
                if m and m.group(1) not in found[kind]:
                    found[kind][m.group(1)] = k
    return "split", found


def _missing(kind: str, form: str, override: str | None, suffixes: list[str], root: Path, paths: list[Path],
             shapes: dict[str, tuple]) -> str:
    """The one-line account of a modality none of the files holds: which files, which names were looked for,
    what the files hold, and how to point at the array."""
    if override:
        names = [override.format(split=s) for s in suffixes] if "{split}" in override and suffixes else [override]
    elif form == "all" or not suffixes:
        names = list(ALL_KEYS[kind])
    else:
        names = [t.format(split=s) for s in suffixes for t in SPLIT_TEMPLATES[kind]]
    where = str(paths[0]) if len(paths) == 1 else f"{root} ({', '.join(p.name for p in paths)})"
    return (f"{where}: no {kind} features: none of the variables {', '.join(names)} is there (it holds "
            f"{', '.join(sorted(shapes)) or 'no variables'}); name the {kind} array with dataset.{kind}_key, or "
            f"list the .mat file that holds it in dataset.files")


@register("mat")
def read_mat(root: Path, files: list[str] | str | None = None, image_key: str | None = None,
             text_key: str | None = None, label_key: str | None = None,
             label_names: list[str] | None = None, name: str = "mat") -> Collection:
    """Import precomputed features; ``files`` are .mat files under ``root`` (default: all of them)."""
    root = Path(root)
    if root.is_file():
        root, files = root.parent, [root.name]
    files = [files] if isinstance(files, str) else files
    paths = [root / f for f in files] if files is not None else sorted(root.glob("*.mat"))
    if not paths:
        raise DatasetError(f"{root}: no .mat files; point dataset.root at the folder holding them "
                           f"(or list them in dataset.files)")
    where: dict[str, Path] = {}
    shapes: dict[str, tuple] = {}
    for p in paths:
        if not p.is_file():
            raise DatasetError(f"{p}: .mat file not found; fix dataset.files")
        for k, shape in mat_shapes(p).items():
            if k in where:
                raise DatasetError(f"{p}: variable {k} is also in {where[k]}; list only one of them in dataset.files")
            where[k], shapes[k] = p, shape

    form, keys = _match_keys(shapes, {"image": image_key, "text": text_key, "labels": label_key})
    suffixes: list[str] = []
    if form == "all":
        parts = {"all": {kind: k for kind, k in keys.items() if k}}
    else:
        suffixes = sorted(set(keys["image"]) | set(keys["text"]),
                          key=lambda s: (SPLIT_ORDER.index(SPLIT_ALIASES.get(s, s))
                                         if SPLIT_ALIASES.get(s, s) in SPLIT_ORDER else len(SPLIT_ORDER),
                                         SPLIT_ALIASES.get(s, s)))
        parts = {SPLIT_ALIASES.get(s, s): {kind: keys[kind][s] for kind in keys if s in keys[kind]}
                 for s in suffixes}
    if not parts or not any(("image" in v or "text" in v) for v in parts.values()):
        raise DatasetError(f"{root}: no feature arrays found among {sorted(shapes)}; expected XAll/IAll, YAll, LAll "
                           f"or I_tr/T_tr/L_tr/I_te/…; name them with dataset.image_key / text_key / label_key")
    overrides = {"image": image_key, "text": text_key}
    absent = {kind: _missing(kind, form, overrides[kind], suffixes or sorted(keys["labels"]), root, paths, shapes)
              for kind in ("image", "text") if not any(kind in v for v in parts.values())}
    if "text" in absent:
        raise DatasetError(absent["text"])
    if "image" in absent:
        log.warning("%s; the collection has text features only", absent["image"])

    arrays: dict[str, list[np.ndarray]] = {"image": [], "text": [], "labels": []}
    ids: list[str] = []
    fixed: dict[str, np.ndarray] = {}
    for split, kinds in parts.items():
        raw = {kind: load_mat(where[k], [k])[k] for kind, k in kinds.items()}
        n_rows = next((raw[kind].shape[0] for kind in ("image", "text") if kind in raw), None)
        loaded = {kind: _as_matrix(kinds[kind], a, n_rows, where[kinds[kind]], kind) for kind, a in raw.items()}
        counts = {kinds[kind]: a.shape[0] for kind, a in loaded.items()}
        if len(set(counts.values())) != 1:
            raise DatasetError(f"{root}: row counts differ: {counts}; the arrays must describe the same items "
                               f"(rows = items; transpose any stored as columns)")
        n = next(iter(counts.values()))
        for kind in arrays:
            if (kind in loaded) != bool(arrays[kind]) and ids:
                raise DatasetError(f"{root}: split {split!r} lacks or adds {kind} features compared to the others")
            if kind in loaded:
                arrays[kind].append(loaded[kind])
        fixed[split] = np.arange(len(ids), len(ids) + n, dtype=np.int64)
        ids += [str(i) for i in range(n)] if form == "all" else [f"{split}/{i}" for i in range(n)]

    stacked = {kind: np.concatenate(a) if a else None for kind, a in arrays.items()}
    labels = stacked["labels"]
    if labels is not None and labels.shape[1] == 1 and labels.size and labels.max() > 1:
        # A vector of class indices (over all splits at once, so every split gets the same columns).
        classes, index = np.unique(labels[:, 0], return_inverse=True)
        labels = one_hot(index.ravel(), len(classes))
    names = list(label_names) if label_names else []
    if labels is not None and names and len(names) != labels.shape[1]:
        raise DatasetError(f"dataset.label_names has {len(names)} names for {labels.shape[1]} label columns")
    if labels is not None and labels.size and not np.isin(labels, (0, 1)).all():
        raise DatasetError(f"{root}: labels hold values other than 0/1; give a multi-hot matrix or class indices")
    collection = Collection(
        name=name, root=root, ids=ids, texts=[""] * len(ids), labels=labels, label_names=names,
        text_kind="precomputed", image_features=stacked["image"], text_features=stacked["text"],
        fixed_splits=fixed if form == "split" else None)
    return with_fingerprint(collection, paths, reader="mat", form=form, keys=parts)
