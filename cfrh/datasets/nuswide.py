"""NUS-WIDE (Chua et al. 2009) in its official layout, in the TC-10 setting of DCMH/DJSRH/UCCH.

Layout under the root::

    Flickr/<concept>/<file>.jpg          the images (or images/<concept>/<file>.jpg, or a flat images/<file>.jpg)
    ImageList/Imagelist.txt              one image per line (Windows paths as shipped); fixes the row order
    ImageList/TrainImagelist.txt, TestImagelist.txt   optional: become fixed splits "train" / "test"
    NUS_WID_Tags/AllTags1k.txt           N rows × 1,000 columns of 0/1, rows in Imagelist order
    NUS_WID_Tags/TagList1k.txt           the 1,000 tag names (or Concepts/TagList1k.txt; else tag0 …)
    Groundtruth/AllLabels/Labels_<concept>.txt   N rows of 0/1 per concept
    Concepts81.txt                       the concept names (or Concepts/Concepts81.txt; else the Labels_ files)

TC-10 keeps the ``top_concepts`` (10) concepts with the most images and the pairs with at least one
of them and at least one tag. Rows keep Imagelist order; ids are the image path without extension
under the image folder (``actor/0001_2124494179``); labels list the kept concepts in Concepts81 order.
"""
from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path

import numpy as np

from ._common import apply_drops, locate_files, read_text, with_fingerprint
from .base import Collection, DatasetError, DropReport, register, require

log = logging.getLogger(__name__)

def _block_01(lines: list[bytes], path: Path, first_line: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, per-line counts) of a block of whitespace-separated integer lines."""
    buf = np.frombuffer(b"".join(lines), dtype=np.uint8)
    digit = (buf - np.uint8(48)) < 2  # '0' or '1' (uint8 arithmetic wraps everything else above 1)
    space = (buf == 9) | (buf == 32) | (buf == 10) | (buf == 13)
    if (digit | space).all() and not (digit[1:] & digit[:-1]).any():
        # Fast path: every token is one '0' or '1' character (the shipped files).
        starts = np.cumsum([0] + [len(x) for x in lines[:-1]])
        return buf[digit] - np.uint8(48), np.add.reduceat(digit.view(np.uint8), starts, dtype=np.int64)
    tokens = [line.split() for line in lines]
    try:
        values = np.array(list(itertools.chain.from_iterable(tokens)), dtype="S").astype(np.int64)
    except ValueError:
        raise DatasetError(f"{path}: non-integer values near line {first_line}; the file should hold "
                           f"whitespace-separated 0/1 columns as shipped with NUS-WIDE") from None
    return (values > 0).astype(np.uint8), np.array([len(t) for t in tokens], dtype=np.int64)


def read_01_matrix(path: Path, block_lines: int = 4096) -> np.ndarray:
    """An (N, C) uint8 presence matrix from a text file of whitespace-separated 0/1 (or count) columns,
    read in blocks so that NUS-WIDE's 270k × 1,000 tag file parses in seconds, not minutes."""
    blocks, n_cols, line_no = [], None, 0
    with open(path, "rb") as f:
        while True:
            raw = list(itertools.islice(f, block_lines))
            if not raw:
                break
            lines = [x for x in raw if x.strip()]
            if not lines:
                continue
            values, counts = _block_01(lines, path, line_no + 1)
            n_cols = int(counts[0]) if n_cols is None else n_cols
            bad = np.flatnonzero(counts != n_cols)
            if bad.size:
                raise DatasetError(f"{path}: a row has {counts[bad[0]]} columns where the first has {n_cols} "
                                   f"(non-blank row {line_no + bad[0] + 1}); the file is truncated or corrupt, "
                                   f"re-extract it")
            blocks.append(values.reshape(len(lines), n_cols))
            line_no += len(lines)
    return np.concatenate(blocks) if blocks else np.zeros((0, 0), dtype=np.uint8)


def _first(root: Path, candidates: tuple[str, ...]) -> Path | None:
    return next((root / c for c in candidates if (root / c).exists()), None)


def _list_keys(path: Path) -> list[str]:
    """Imagelist lines (``C:\\ImageData\\Flickr\\actor\\0001_2124494179.jpg``) → ``actor/0001_2124494179.jpg``."""
    return ["/".join(re.split(r"[\\/]+", line.strip())[-2:]) for line in read_text(path).splitlines()
            if line.strip()]


@register("nuswide")
def read_nuswide(root: Path, top_concepts: int = 10, image_dir: str = "auto") -> Collection:
    """Read NUS-WIDE; ``image_dir`` = "auto" finds Flickr/ or images/ (nested per concept or flat)."""
    root = Path(root)
    list_file = require(root / "ImageList" / "Imagelist.txt", "NUS-WIDE image list",
                        "unpack NUS-WIDE's ImageList.zip under the dataset root")
    tags_file = require(root / "NUS_WID_Tags" / "AllTags1k.txt", "NUS-WIDE tag matrix",
                        "unpack NUS_WID_Tags.zip under the dataset root")
    label_dir = require(root / "Groundtruth" / "AllLabels", "NUS-WIDE ground-truth folder",
                        "unpack Groundtruth.zip under the dataset root (it holds AllLabels/Labels_<concept>.txt)")
    keys = _list_keys(list_file)
    n = len(keys)

    tags = read_01_matrix(tags_file)
    if tags.shape[0] != n:
        raise DatasetError(f"{tags_file}: {tags.shape[0]} rows but {list_file.name} lists {n} images; "
                           f"both must come from the same NUS-WIDE release")
    tag_list = _first(root, ("NUS_WID_Tags/TagList1k.txt", "Concepts/TagList1k.txt", "TagList1k.txt"))
    tag_names = [t.strip().split()[0] for t in read_text(tag_list).splitlines() if t.strip()] if tag_list \
        else [f"tag{i}" for i in range(tags.shape[1])]
    if len(tag_names) != tags.shape[1]:
        raise DatasetError(f"{tag_list}: {len(tag_names)} tag names for {tags.shape[1]} columns of "
                           f"{tags_file.name}; use the TagList1k.txt of the same release")

    concept_list = _first(root, ("Concepts81.txt", "Concepts/Concepts81.txt", "ConceptsList/Concepts81.txt"))
    if concept_list is not None:
        concepts = [c.strip() for c in read_text(concept_list).splitlines() if c.strip()]
    else:
        concepts = sorted(p.stem[len("Labels_"):] for p in label_dir.glob("Labels_*.txt"))
    if not concepts:
        raise DatasetError(f"{label_dir}: no Labels_<concept>.txt files; unpack Groundtruth.zip there")
    columns = []
    for c in concepts:
        f = require(label_dir / f"Labels_{c}.txt", f"labels of concept {c!r}",
                    "every concept of Concepts81.txt needs its Labels_<concept>.txt from Groundtruth.zip")
        col = read_01_matrix(f)
        if col.shape != (n, 1):
            raise DatasetError(f"{f}: expected {n} rows of one 0/1 value, found {col.shape}; "
                               f"use the Groundtruth of the same release as {list_file.name}")
        columns.append(col)
    all_labels = np.hstack(columns)

    counts = all_labels.sum(axis=0)
    top = np.sort(np.argsort(-counts, kind="stable")[:int(top_concepts)])
    labels = all_labels[:, top]
    label_names = [concepts[i] for i in top]

    ids = [k.rsplit(".", 1)[0] for k in keys]
    dropped = DropReport()
    rows = apply_drops(ids, dropped, [(labels.sum(axis=1) == 0, f"none of the top-{len(top)} concepts"),
                                      (tags.sum(axis=1) == 0, "no tags")])

    folder = root / image_dir if image_dir != "auto" else _first(root, ("Flickr", "images", "Images"))
    if folder is None or not folder.is_dir():
        raise DatasetError(f"{root / 'Flickr'}: NUS-WIDE image folder not found; unpack the images as "
                           f"Flickr/<concept>/<file>.jpg (or set dataset.image_dir)")
    nested = bool(keys) and (folder / keys[0].split("/")[0]).is_dir()
    base = folder.relative_to(root).as_posix()
    rel = [f"{base}/{keys[i] if nested else keys[i].split('/')[-1]}" for i in rows]
    found, paths = locate_files(root, rel, [ids[i] for i in rows], dropped)
    rows = rows[found]

    r, c = np.nonzero(tags[rows])
    names = np.array(tag_names, dtype=object)
    texts = [" ".join(ws) for ws in np.split(names[c], np.cumsum(np.bincount(r, minlength=len(rows)))[:-1])]

    fixed = {}
    position = {k: i for i, k in enumerate(keys[j] for j in rows)}
    for split, fname in (("train", "TrainImagelist.txt"), ("test", "TestImagelist.txt")):
        f = root / "ImageList" / fname
        if f.exists():
            fixed[split] = np.array(sorted(position[k] for k in _list_keys(f) if k in position), dtype=np.int64)

    kept_ids = [ids[i] for i in rows]
    log.info("NUS-WIDE: %d of %d pairs kept (top %d concepts: %s)", len(rows), n, len(top), ", ".join(label_names))
    files = [list_file, tags_file, *(label_dir / f"Labels_{c}.txt" for c in concepts),
             *(f for f in (tag_list, concept_list) if f is not None),
             *(root / "ImageList" / f for f in ("TrainImagelist.txt", "TestImagelist.txt")
               if (root / "ImageList" / f).exists())]
    collection = Collection(
        name="nuswide", root=root, ids=kept_ids, texts=texts, image_paths=[p for p in paths if p is not None],
        labels=labels[rows], label_names=label_names, text_kind="tags", vocabulary=list(tag_names),
        fixed_splits=fixed or None, dropped=dropped)
    return with_fingerprint(collection, files, reader="nuswide", top_concepts=int(top_concepts), image_dir=base)
