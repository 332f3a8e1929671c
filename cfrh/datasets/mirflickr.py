"""MIRFLICKR-25K (Huiskes & Lew 2008) in its official layout, cleaned as DCMH/DJSRH/UCCH/CFRH do.

Layout under the root (the ``mirflickr/meta`` placement of the official zip works too)::

    mirflickr/im1.jpg … im25000.jpg
    meta/tags/tags1.txt …           one tag per line (or meta/tags_raw/, normalised the same way)
    annotations/<concept>.txt       1-based image numbers, one per line; the 24 "potential" concepts
                                    are the files without ``_r1`` (``*_r1.txt`` and README.txt ignored)

The standard cleaned set keeps tags that occur in at least ``min_tag_images`` (20) images, and
images with at least one label and at least one kept tag: 20,015 pairs × 1,386 tags on the real
data. Rows are in increasing image number; ids are the image numbers; labels are the concepts in
alphabetical order (animals, baby, bird, …, water); the vocabulary is the kept tags, sorted.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ._common import ITEM_NOT_UTF8, apply_drops, ids_digest, locate_files, read_item_text, read_text, \
    with_fingerprint
from .base import Collection, DatasetError, DropReport, register

log = logging.getLogger(__name__)

_IMAGE = re.compile(r"^im(\d+)\.jpg$", re.IGNORECASE)
_TAGS = re.compile(r"^tags(\d+)\.txt$", re.IGNORECASE)
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def _find_dir(root: Path, candidates: tuple[str, ...], what: str, fix: str) -> Path:
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    raise DatasetError(f"{root / candidates[0]}: {what} not found (also looked for "
                       f"{', '.join(candidates[1:])}); {fix}")


def _numbered(folder: Path, pattern: re.Pattern) -> dict[int, str]:
    return {int(m.group(1)): name for name in (p.name for p in folder.iterdir()) if (m := pattern.match(name))}


def _normalise_tag(tag: str, raw: bool) -> str:
    tag = tag.strip().lower()
    # meta/tags_raw keeps the user's spelling ("New York"); meta/tags has it lower-cased without
    # spaces or punctuation ("newyork"), which is the form the 1,386-tag vocabulary uses.
    return _NON_WORD.sub("", tag) if raw else tag


@register("mirflickr25k")
def read_mirflickr25k(root: Path, min_tag_images: int = 20, tags: str = "auto",
                      require_label: bool = True) -> Collection:
    """Read MIRFLICKR-25K; ``tags`` = "auto" | "tags" | "tags_raw" picks the tag folder."""
    root = Path(root)
    image_dir = _find_dir(root, ("mirflickr", "images"), "image folder",
                          "unpack mirflickr25k.zip so that mirflickr/im1.jpg … lie under the dataset root")
    meta = _find_dir(root, ("meta", "mirflickr/meta"), "meta folder",
                     "the tags come in mirflickr25k.zip as meta/tags/tags<N>.txt; unpack it under the root")
    tag_folders = ("tags", "tags_raw") if tags == "auto" else (tags,)
    if tags not in ("auto", "tags", "tags_raw"):
        raise DatasetError(f"dataset.tags = {tags!r}: use 'auto', 'tags' or 'tags_raw'")
    tag_dir = _find_dir(meta, tag_folders, "tag folder", "it holds tags<N>.txt, one tag per line")
    raw = tag_dir.name == "tags_raw"
    ann_dir = _find_dir(root, ("annotations", "mirflickr25k_annotations_v080"), "annotation folder",
                        "unpack mirflickr25k_annotations_v080.zip as annotations/ under the root")

    concept_files = sorted(p for p in ann_dir.glob("*.txt")
                           if not p.stem.endswith("_r1") and p.stem.lower() != "readme")
    if not concept_files:
        raise DatasetError(f"{ann_dir}: no concept files (<concept>.txt); unpack the annotations there")
    concepts = [p.stem for p in concept_files]

    images = _numbered(image_dir, _IMAGE)
    tag_files = _numbered(tag_dir, _TAGS)
    if not tag_files:
        raise DatasetError(f"{tag_dir}: no tags<N>.txt files; point dataset.root at the MIRFLICKR-25K folder")
    numbers = np.array(sorted(set(images) | set(tag_files)), dtype=np.int64)
    n = len(numbers)
    dropped = DropReport()

    # Labels: one column per concept, rows in image-number order.
    labels = np.zeros((n, len(concepts)), dtype=np.uint8)
    for c, path in enumerate(concept_files):
        try:
            listed = np.array(read_text(path).split(), dtype=np.int64)
        except ValueError:
            raise DatasetError(f"{path}: expected one image number per line; re-extract the annotations zip") \
                from None
        pos = np.searchsorted(numbers, listed).clip(max=max(n - 1, 0))
        known = (numbers[pos] == listed) if n else np.zeros(len(listed), bool)
        for num in np.unique(listed[~known]):
            dropped.add(f"{path.stem}:{num}", "annotation names no image")
        labels[pos[known], c] = 1

    # Tags: a sparse image × tag matrix counting each tag once per image.
    tag_lists: list[list[str]] = []
    not_utf8 = np.zeros(n, dtype=bool)
    for i, num in enumerate(numbers.tolist()):
        name = tag_files.get(num)
        text = read_item_text(tag_dir / name) if name is not None else ""
        not_utf8[i] = text is None
        seen = dict.fromkeys(t for t in (_normalise_tag(x, raw) for x in (text or "").splitlines()) if t)
        tag_lists.append(list(seen))
    lengths = np.fromiter((len(t) for t in tag_lists), dtype=np.int64, count=n)
    flat = np.array([t for ts in tag_lists for t in ts], dtype=str)
    vocab_all, col = np.unique(flat, return_inverse=True)
    occurs = sp.csr_matrix((np.ones(flat.size, np.int32), (np.repeat(np.arange(n), lengths), col.ravel())),
                           shape=(n, vocab_all.size))
    kept_tags = np.asarray(occurs.sum(axis=0)).ravel() >= int(min_tag_images)
    vocabulary = vocab_all[kept_tags].tolist()
    n_kept_tags = np.asarray(occurs[:, kept_tags].sum(axis=1)).ravel()

    ids = [str(x) for x in numbers.tolist()]
    rows_kept = apply_drops(ids, dropped, [
        (~np.isin(numbers, list(tag_files)), "no tags file"),
        (not_utf8, ITEM_NOT_UTF8),
        (lengths == 0, "no tags"),
        (n_kept_tags == 0, f"no tag used by >= {min_tag_images} images"),
        (labels.sum(axis=1) == 0 if require_label else np.zeros(n, bool), "no label")])
    folder = image_dir.relative_to(root).as_posix()
    rel = [f"{folder}/{images.get(num, f'im{num}.jpg')}" for num in numbers[rows_kept].tolist()]
    found, paths = locate_files(root, rel, [ids[i] for i in rows_kept], dropped)
    rows_kept = rows_kept[found]

    kept_ids = [ids[i] for i in rows_kept]
    log.info("MIRFLICKR-25K: %d of %d images kept, %d tags (>= %d images)", len(rows_kept), n,
             len(vocabulary), min_tag_images)
    collection = Collection(
        name="mirflickr25k", root=root, ids=kept_ids,
        texts=[" ".join(tag_lists[i]) for i in rows_kept],
        image_paths=[p for p in paths if p is not None], labels=labels[rows_kept], label_names=concepts,
        text_kind="tags", vocabulary=vocabulary, dropped=dropped)
    return with_fingerprint(collection, concept_files, reader="mirflickr25k", min_tag_images=int(min_tag_images),
                            tags=tag_dir.name, require_label=bool(require_label), vocabulary=ids_digest(vocabulary))
