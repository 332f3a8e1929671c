"""WIKI (Rasiwasia et al., ACM MM 2010): 2,866 Wikipedia image–article pairs in 10 categories.

Two readers, both keeping the original split (rows: the 2,173 training pairs, then the 693 test
pairs, in list order; fixed splits "train" and "test"; ids are the text ids of the lists):

``wiki`` — the SVCL raw layout::

    images/<category>/<image id>.jpg    texts/<text id>.xml    categories.list (10 names, one a line)
    trainset_txt_img_cat.list, testset_txt_img_cat.list     "<text id> <image id> <category 1..10>"

``wiki-mat`` — the precomputed-feature release: ``wikiData.mat`` (preferred: it also carries the
labels ``L_tr``/``L_te``, checked against the lists) or ``raw_features.mat`` (``I_tr`` 128-d SIFT BoVW,
``T_tr`` 10-d LDA, ``I_te``, ``T_te``) next to the same list files.
"""
from __future__ import annotations

import html
import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ._common import ITEM_NOT_UTF8, apply_drops, locate_files, one_hot, read_item_text, read_text, \
    with_fingerprint
from .base import Collection, DatasetError, DropReport, register, require
from .precomputed import load_mat, mat_shapes

log = logging.getLogger(__name__)

LISTS = (("train", "trainset_txt_img_cat.list"), ("test", "testset_txt_img_cat.list"))
_TEXT_ELEMENT = re.compile(r"<text[^>]*>(.*?)</text>", re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"<[^>]+>")
_FIX = "get the WIKI dataset's list files from the SVCL release and put them under the dataset root"


def _categories(root: Path) -> list[str]:
    path = require(root / "categories.list", "WIKI category names", _FIX)
    names = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"{path}: empty; it should list the 10 category names, one a line")
    return names


def read_lists(root: Path, n_categories: int
               ) -> tuple[list[str], list[str], np.ndarray, dict[str, np.ndarray], list[Path]]:
    """(text ids, image ids, 0-based categories, split → rows, list files) of both lists, one row per
    non-blank line so that rows stay aligned with feature matrices. A line without three fields gets
    the id ``<file>:<line>`` and category -2; a category outside 1..n gets -1."""
    text_ids, image_ids, cats, splits, files = [], [], [], {}, []
    for split, fname in LISTS:
        path = require(root / fname, f"WIKI {split} list", _FIX)
        files.append(path)
        start = len(text_ids)
        for no, line in enumerate(read_text(path).splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            ok = len(fields) == 3
            text_ids.append(fields[0] if ok else f"{fname}:{no}")
            image_ids.append(fields[1] if ok else "")
            cats.append((int(fields[2]) - 1 if fields[2].isdigit() else -1) if ok else -2)
        splits[split] = np.arange(start, len(text_ids), dtype=np.int64)
    cats_arr = np.array(cats, dtype=np.int64)
    cats_arr[(cats_arr == -1) | (cats_arr >= n_categories)] = -1
    return text_ids, image_ids, cats_arr, splits, files


def _list_drops(cats: np.ndarray) -> list[tuple[np.ndarray, str]]:
    return [(cats == -2, "malformed list line"), (cats == -1, "no category")]


def _article(path: Path) -> str | None:
    """The article text of a WIKI XML file (None when it is not valid UTF-8). Some files are not well-formed
    XML (bare '&'), so a regular-expression fallback takes the <text> element, or failing that all text
    outside tags."""
    raw = read_item_text(path)
    if raw is None:
        return None
    try:
        node = ET.fromstring(raw).find(".//text")
        body = "".join(node.itertext()) if node is not None else None
    except ET.ParseError:
        m = _TEXT_ELEMENT.search(raw)
        body = html.unescape(_TAG.sub(" ", m.group(1))) if m else None
    if body is None:
        body = html.unescape(_TAG.sub(" ", re.sub(r"<\?xml[^>]*\?>", "", raw)))
    return "\n".join(line.strip() for line in body.strip().splitlines() if line.strip())


@register("wiki")
def read_wiki(root: Path) -> Collection:
    """Read the SVCL raw layout: images per category folder, one XML article per pair."""
    root = Path(root)
    names = _categories(root)
    for d in ("images", "texts"):
        require(root / d, f"WIKI {d} folder", f"unpack the SVCL wikipedia_dataset so that {d}/ lies under the root")
    dropped = DropReport()
    text_ids, image_ids, cats, splits, files = read_lists(root, len(names))
    rows = apply_drops(text_ids, dropped, _list_drops(cats))
    found, text_paths = locate_files(root, [f"texts/{text_ids[i]}.xml" for i in rows],
                                     [text_ids[i] for i in rows], dropped, what="text")
    rows = rows[found]
    found, image_paths = locate_files(root, [f"images/{names[cats[i]]}/{image_ids[i]}.jpg" for i in rows],
                                      [text_ids[i] for i in rows], dropped)
    rows = rows[found]
    image_paths = [p for p in image_paths if p is not None]
    text_paths = [p for p, ok in zip((p for p in text_paths if p is not None), found) if ok]
    texts = [_article(p) for p in text_paths]
    rules = [(np.array([t is None for t in texts], bool), ITEM_NOT_UTF8),
             (np.array([not t for t in texts], bool), "empty text")]
    keep = apply_drops([text_ids[i] for i in rows], dropped, rules)
    return _collection("wiki", root, rows[keep], text_ids, cats, names, splits, dropped, files,
                       texts=[texts[i] for i in keep],
                       image_paths=[image_paths[i] for i in keep])


def _collection(reader: str, root: Path, rows: np.ndarray, text_ids: list[str], cats: np.ndarray,
                names: list[str], splits: dict[str, np.ndarray], dropped: DropReport, files: list[Path],
                **fields) -> Collection:
    new_index = np.full(len(text_ids), -1, dtype=np.int64)
    new_index[rows] = np.arange(len(rows))
    ids = [text_ids[i] for i in rows]
    collection = Collection(name="wiki", root=root, ids=ids, labels=one_hot(cats[rows], len(names)),
                            label_names=names, dropped=dropped,
                            fixed_splits={s: new_index[v][new_index[v] >= 0] for s, v in splits.items()}, **fields)
    return with_fingerprint(collection, [root / "categories.list", *files], reader=reader)


@register("wiki-mat")
def read_wiki_mat(root: Path, file: str | None = None) -> Collection:
    """Read the precomputed-feature release; ``file`` picks wikiData.mat or raw_features.mat."""
    root = Path(root)
    candidates = [file] if file else ["wikiData.mat", "raw_features.mat"]
    mat = next((root / c for c in candidates if (root / c).is_file()), None)
    if mat is None:
        raise DatasetError(f"{root / candidates[0]}: WIKI feature file not found (looked for "
                           f"{', '.join(candidates)}); put the precomputed-feature release under the root")
    names = _categories(root)
    dropped = DropReport()
    text_ids, _, cats, splits, files = read_lists(root, len(names))
    shapes = mat_shapes(mat)
    keys = ["I_tr", "I_te", "T_tr", "T_te"] + [k for k in ("L_tr", "L_te") if k in shapes]
    missing = [k for k in keys[:4] if k not in shapes]
    if missing:
        raise DatasetError(f"{mat}: variables {missing} missing (it holds {sorted(shapes)}); use the WIKI "
                           f"feature release's raw_features.mat or wikiData.mat")
    data = load_mat(mat, keys)
    for split, suffix in (("train", "tr"), ("test", "te")):
        listed = len(splits[split])
        for kind in ("I", "T", "L"):
            key = f"{kind}_{suffix}"
            if key in data and data[key].shape[0] != listed:
                raise DatasetError(f"{mat}: {key} has {data[key].shape[0]} rows but {dict(LISTS)[split]} lists "
                                   f"{listed} pairs; use the list files of the same release")
        label_key = f"L_{suffix}"
        if label_key in data:
            listed_cats = cats[splits[split]]
            valid = listed_cats >= 0
            expect = one_hot(np.where(valid, listed_cats, 0), len(names)) > 0
            given = data[label_key] > 0
            if given.shape[1] != len(names):
                raise DatasetError(f"{mat}: {label_key} has {given.shape[1]} columns for the {len(names)} "
                                   f"categories of categories.list; the files come from different releases")
            bad = np.flatnonzero(valid & (given != expect).any(axis=1))
            if bad.size:
                raise DatasetError(f"{mat}: {label_key} disagrees with the categories in {dict(LISTS)[split]} "
                                   f"({bad.size} rows, first at line {bad[0] + 1}); the files come from "
                                   f"different WIKI releases")
    image = np.concatenate([data["I_tr"], data["I_te"]])
    text = np.concatenate([data["T_tr"], data["T_te"]])
    rows = apply_drops(text_ids, dropped, _list_drops(cats))
    log.info("WIKI (%s): %d pairs, %d train / %d test", mat.name, len(rows), len(splits["train"]), len(splits["test"]))
    return _collection("wiki-mat", root, rows, text_ids, cats, names, splits, dropped, [mat, *files],
                       texts=[""] * len(rows), text_kind="precomputed",
                       image_features=image[rows], text_features=text[rows])
