"""MS-COCO 2014 / 2017 in the official layout: image folders plus caption and instance annotations.

Layout under the root::

    train2017/*.jpg, val2017/*.jpg                 (or train2014/, val2014/)
    annotations/captions_{train,val}2017.json      about five captions per image
    annotations/instances_{train,val}2017.json     objects → the 80 categories

Each image is one pair: its captions joined by newlines (in annotation-id order) and the
multi-hot vector of the categories of its objects (columns in category-id order, names as
``label_names``). Rows are in increasing image id over all the splits read; ids are the image
ids. Images without a caption, or (by default, as the standard protocol does) without any
category, are dropped and counted; so are files in an image folder that no annotation names
("not in annotations"). The splits read become fixed splits ("train", "val").
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ._common import IMAGE_SUFFIXES, apply_drops, locate_files, with_fingerprint
from .base import Collection, DatasetError, DropReport, register, require

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val")


def _load_json(path: Path, what: str) -> dict:
    require(path, what, f"download annotations_trainval{path.stem[-4:]}.zip from cocodataset.org and unpack it "
                        f"under the dataset root (or set dataset.splits to the splits you have)")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e}); re-download the annotation file") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DatasetError(f"{path}: no 'images'/'annotations' lists; this is not a COCO annotation file")
    return data


def _detect_year(root: Path, splits: list[str]) -> str:
    years = sorted({y for y in ("2014", "2017") for s in splits
                    if (root / "annotations" / f"captions_{s}{y}.json").exists()})
    if len(years) == 1:
        return years[0]
    if not years:
        raise DatasetError(f"{root / 'annotations'}: no captions_<split><year>.json for 2014 or 2017; unpack "
                           f"COCO's annotations_trainval<year>.zip under the dataset root")
    raise DatasetError(f"{root / 'annotations'}: both 2014 and 2017 annotations found; choose one with "
                       f"--set dataset.year=2017 (or 2014)")


@register("coco")
def read_coco(root: Path, year: str | int | None = None, splits: list[str] | str = SPLIT_NAMES,
              keep_unlabelled: bool = False) -> Collection:
    """Read COCO; ``year`` 2014/2017 (auto-detected), ``splits`` among train/val,
    ``keep_unlabelled`` keeps images whose objects name no category (all-zero label rows)."""
    root = Path(root)
    splits = [splits] if isinstance(splits, str) else list(splits)
    unknown = [s for s in splits if s not in SPLIT_NAMES]
    if unknown or not splits:
        raise DatasetError(f"dataset.splits = {splits!r}: choose among {list(SPLIT_NAMES)}")
    year = str(year) if year is not None else _detect_year(root, splits)
    if year not in ("2014", "2017"):
        raise DatasetError(f"dataset.year = {year!r}: COCO captions exist for 2014 and 2017")

    dropped = DropReport()
    categories: list[dict] | None = None
    image_ids, file_names, split_of = [], [], []
    captions: dict[int, list[tuple[int, str]]] = {}
    objects: list[np.ndarray] = []  # (image id, category id) pairs
    files = []
    for split in splits:
        folder = f"{split}{year}"
        cap_file = root / "annotations" / f"captions_{folder}.json"
        ins_file = root / "annotations" / f"instances_{folder}.json"
        cap, ins = _load_json(cap_file, "COCO caption annotations"), _load_json(ins_file, "COCO instance annotations")
        files += [cap_file, ins_file]
        cats = sorted(ins.get("categories", []), key=lambda c: c["id"])
        if not cats:
            raise DatasetError(f"{ins_file}: no 'categories' list; re-download the instance annotations")
        if categories is not None and [c["id"] for c in cats] != [c["id"] for c in categories]:
            raise DatasetError(f"{ins_file}: categories differ from the other split's; use one COCO release")
        categories = cats

        try:
            images = {int(im["id"]): str(im["file_name"]) for im in (*cap["images"], *ins["images"])}
            for a in cap["annotations"]:
                text = str(a.get("caption", "")).strip()
                if text:
                    captions.setdefault(int(a["image_id"]), []).append((int(a.get("id", 0)), text))
            pairs = np.array([(a["image_id"], a["category_id"]) for a in ins["annotations"]],
                             dtype=np.int64).reshape(-1, 2)
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{cap_file.name} / {ins_file.name}: an image or annotation lacks a field ({e!r}); "
                               f"these are not official COCO annotation files") from None
        objects.append(pairs)
        annotated = {int(a["image_id"]) for a in cap["annotations"]} | set(pairs[:, 0].tolist())
        for orphan in sorted(annotated - set(images)):
            dropped.add(f"{folder}:{orphan}", "annotation names no image")
        image_ids += list(images)
        file_names += [f"{folder}/{name}" for name in images.values()]
        split_of += [split] * len(images)
        if (root / folder).is_dir():
            named = set(images.values())
            for p in sorted((root / folder).iterdir()):
                if p.suffix.lower() in IMAGE_SUFFIXES and p.name not in named:
                    dropped.add(f"{folder}/{p.name}", "not in annotations")
        else:
            log.warning("COCO: image folder %s is missing", root / folder)

    assert categories is not None
    all_ids = np.array(image_ids, dtype=np.int64)
    order = np.argsort(all_ids, kind="stable")
    first = np.r_[True, all_ids[order][1:] != all_ids[order][:-1]]
    for i in order[~first]:
        dropped.add(file_names[i], "image id listed twice")
    order = order[first]
    sorted_ids = all_ids[order]

    ids = [str(x) for x in sorted_ids.tolist()]
    cat_ids = np.array([c["id"] for c in categories], dtype=np.int64)
    pairs = np.concatenate(objects)
    row = np.searchsorted(sorted_ids, pairs[:, 0]).clip(max=max(len(ids) - 1, 0))
    col = np.searchsorted(cat_ids, pairs[:, 1]).clip(max=len(cat_ids) - 1)
    valid = (sorted_ids[row] == pairs[:, 0]) & (cat_ids[col] == pairs[:, 1]) if len(ids) else row < 0
    labels = np.zeros((len(ids), len(categories)), dtype=np.uint8)
    labels[row[valid], col[valid]] = 1
    texts = ["\n".join(t for _, t in sorted(captions.get(i, []))) for i in sorted_ids.tolist()]
    no_caption = np.array([not t for t in texts], dtype=bool)
    no_category = (labels.sum(axis=1) == 0) & (not keep_unlabelled)
    rows = apply_drops(ids, dropped, [(no_caption, "no caption"), (no_category, "no category")])
    found, paths = locate_files(root, [file_names[order[r]] for r in rows], [ids[r] for r in rows], dropped)
    rows = rows[found]

    kept_splits = np.array([split_of[order[r]] for r in rows])
    kept_ids = [ids[r] for r in rows]
    log.info("COCO %s: %d images kept of %d annotated; dropped %s", year, len(rows), len(order), dropped.counts)
    collection = Collection(
        name=f"coco{year}", root=root, ids=kept_ids, texts=[texts[r] for r in rows],
        image_paths=[p for p in paths if p is not None], labels=labels[rows],
        label_names=[str(c["name"]) for c in categories], text_kind="captions",
        fixed_splits={s: np.flatnonzero(kept_splits == s).astype(np.int64) for s in splits},
        dropped=dropped)
    return with_fingerprint(collection, files, reader="coco", year=year, splits=splits,
                            keep_unlabelled=bool(keep_unlabelled))
