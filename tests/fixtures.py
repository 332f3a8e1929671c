"""Small fake datasets in the official layouts, for tests of any stage.

Each ``make_*`` writes a tiny dataset under ``root`` (real JPEG files, 8 × 8 px, so that the
extractor can decode them) and returns the ground truth it planted — what a reader must keep,
label and drop — so that a test can check a reader against an independent computation. Every
layout includes the awkward cases the real releases have (missing files, empty texts, items
without labels, annotations naming nothing) in known places.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

MIRFLICKR_CONCEPTS = ("animals", "baby", "bird", "car", "clouds", "dog", "female", "flower", "food", "indoor",
                      "lake", "male", "night", "people", "plant_life", "portrait", "river", "sea", "sky",
                      "structures", "sunset", "transport", "tree", "water")


def write_jpeg(path: Path, seed: int = 0, size: int = 8) -> Path:
    """A small real JPEG with seeded random pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


# -- MIRFLICKR-25K ----------------------------------------------------------------------------
def make_mirflickr(root: Path, n: int = 30) -> dict:
    """``mirflickr/im*.jpg``, ``meta/tags/tags*.txt``, ``annotations/<concept>.txt`` (+ ``_r1`` and README).

    Planted: im7 has an empty tag file ("no tags"), im8 only rare tags ("no tag used by >= 3 images"
    at min_tag_images=3), im9 no image ("missing image"), im10 no tag file ("no tags file"), im5 no
    label ("no label"), tags{n+1}.txt without image ("missing image"), sky.txt names image 999
    ("annotation names no image"), im12 a symlink to a file outside the root ("path escapes dataset root").
    """
    common = ["sky", "Tree", "water", "city", "night"]
    tags: dict[int, list[str]] = {}
    labels: dict[int, set[str]] = {}
    for i in range(1, n + 2):
        tags[i] = [common[i % 5], common[(i + 2) % 5], common[i % 5].upper(), f"rare{i}"]
        labels[i] = {MIRFLICKR_CONCEPTS[i % 24]} | ({MIRFLICKR_CONCEPTS[(i * 7) % 24]} if i % 2 == 0 else set())
    tags[7] = []
    tags[8] = ["rare8", "onlyonce"]
    labels[5] = set()
    images = set(range(1, n + 1)) - {9}
    tag_files = set(range(1, n + 2)) - {10}

    for i in sorted(images - {12}):
        write_jpeg(root / "mirflickr" / f"im{i}.jpg", seed=i)
    outside = write_jpeg(root.parent / f"{root.name}-outside.jpg", seed=99)
    (root / "mirflickr" / "im12.jpg").symlink_to(outside)
    (root / "meta" / "tags").mkdir(parents=True)
    for i in sorted(tag_files):
        (root / "meta" / "tags" / f"tags{i}.txt").write_text("".join(f"{t}\n" for t in tags[i]))
    ann = root / "annotations"
    ann.mkdir()
    for c in MIRFLICKR_CONCEPTS:
        listed = [i for i in sorted(labels) if c in labels[i]] + ([999] if c == "sky" else [])
        (ann / f"{c}.txt").write_text("".join(f"{i}\n" for i in listed))
        if c in ("sky", "people", "dog"):
            (ann / f"{c}_r1.txt").write_text("".join(f"{i}\n" for i in listed[:2]))
    (ann / "README.txt").write_text("MIRFLICKR-25K annotations v080\n")
    return {"tags": {i: list(dict.fromkeys(t.lower() for t in tags[i])) for i in tag_files}, "labels": labels,
            "images": images, "outside": {12}, "tag_files": tag_files}


# -- NUS-WIDE ---------------------------------------------------------------------------------
NUS_CONCEPTS = ("sky", "clouds", "person", "water", "animal", "grass", "buildings", "window", "plants", "lake",
                "road", "toy")


def make_nuswide(root: Path, n: int = 40, n_tags: int = 15, flat: bool = False, tag_names: bool = True) -> dict:
    """``Flickr/<concept>/<file>.jpg`` (or flat ``images/``), ``ImageList/Imagelist.txt`` (Windows paths),
    ``NUS_WID_Tags/AllTags1k.txt`` (tab-separated 0/1), ``Concepts/TagList1k.txt``,
    ``Groundtruth/AllLabels/Labels_*.txt``, ``Concepts81.txt``, Train/TestImagelist.txt.

    Concept frequencies fall with the concept index (so the top-3 are sky, clouds, person); row 3
    has none of the top 3, row 4 no tags, row 6's image is missing.
    """
    rng = np.random.default_rng(0)
    labels = (rng.random((n, len(NUS_CONCEPTS))) < np.linspace(0.6, 0.05, len(NUS_CONCEPTS))).astype(np.uint8)
    labels[3, :3] = 0
    labels[3, 5] = 1
    tags = (rng.random((n, n_tags)) < 0.3).astype(np.uint8)
    tags[:, 0] |= (tags.sum(1) == 0).astype(np.uint8)
    tags[4] = 0
    folder_of = [NUS_CONCEPTS[i % len(NUS_CONCEPTS)] for i in range(n)]
    files = [f"{i:04d}_{1000000 + 17 * i}.jpg" for i in range(n)]
    keys = [f"{c}/{f}" for c, f in zip(folder_of, files)]
    for i, key in enumerate(keys):
        if i != 6:
            write_jpeg(root / ("images/" + files[i] if flat else "Flickr/" + key), seed=i)
    (root / "ImageList").mkdir(parents=True)
    win = ["C:\\ImageData\\Flickr\\" + k.replace("/", "\\") for k in keys]
    (root / "ImageList" / "Imagelist.txt").write_text("\r\n".join(win) + "\r\n")
    (root / "ImageList" / "TrainImagelist.txt").write_text("\n".join(k.replace("/", "\\") for k in keys[:30]) + "\n")
    (root / "ImageList" / "TestImagelist.txt").write_text("\n".join(k.replace("/", "\\") for k in keys[30:]) + "\n")
    (root / "NUS_WID_Tags").mkdir()
    (root / "NUS_WID_Tags" / "AllTags1k.txt").write_text("".join("\t".join(map(str, r)) + "\t\n" for r in tags))
    names = [f"word{j}" for j in range(n_tags)]
    if tag_names:
        (root / "Concepts").mkdir()
        (root / "Concepts" / "TagList1k.txt").write_text("\n".join(names) + "\n")
    (root / "Concepts81.txt").write_text("\n".join(NUS_CONCEPTS) + "\n")
    (root / "Groundtruth" / "AllLabels").mkdir(parents=True)
    for j, c in enumerate(NUS_CONCEPTS):
        (root / "Groundtruth" / "AllLabels" / f"Labels_{c}.txt").write_text("".join(f"{v}\n" for v in labels[:, j]))
    return {"labels": labels, "tags": tags, "keys": keys, "missing": {6}, "tag_names": names}


# -- WIKI (SVCL raw layout) ---------------------------------------------------------------------
WIKI_CATEGORIES = ("art", "biology", "geography")


def make_wiki_raw(root: Path) -> dict:
    """``images/<category>/<img>.jpg``, ``texts/<txt>.xml``, the two lists and ``categories.list``.

    12 list lines (8 train, 4 test). Planted: t2's XML has a bare '&' (not well-formed; still read),
    t3's article is empty ("empty text"), t4 has no XML ("missing text"), t5 no image ("missing
    image"), t9's category is 7 of 3 ("no category"), one test line has two fields ("malformed list line").
    """
    pairs = [(f"t{i}", f"img{i}", 1 + i % 3) for i in range(12)]
    pairs[9] = ("t9", "img9", 7)
    articles = {t: f"Article {t} about {WIKI_CATEGORIES[(c - 1) % 3]}.\nSecond paragraph of {t}."
                for t, _, c in pairs}
    articles["t2"] = "Fish & chips, a history."
    articles["t3"] = ""
    for t, img, c in pairs:
        if t != "t5" and c <= 3:
            write_jpeg(root / "images" / WIKI_CATEGORIES[c - 1] / f"{img}.jpg", seed=int(t[1:]))
        if t != "t4":
            (root / "texts").mkdir(parents=True, exist_ok=True)
            (root / "texts" / f"{t}.xml").write_text(
                f'<?xml version="1.0" encoding="UTF-8"?>\n<document>\n<title>{t}</title>\n'
                f"<text>{articles[t]}</text>\n</document>\n")
    (root / "categories.list").write_text("\n".join(WIKI_CATEGORIES) + "\n")
    line = "{}\t{}\t{}\n".format
    (root / "trainset_txt_img_cat.list").write_text("".join(line(*p) for p in pairs[:8]))
    (root / "testset_txt_img_cat.list").write_text("".join(line(*p) for p in pairs[8:]) + "broken\tline\n")
    return {"pairs": pairs, "articles": articles}


# -- a user's folder (CSV / JSONL) ----------------------------------------------------------------
def make_folder(root: Path, fmt: str = "csv") -> dict:
    """``images/*.jpg`` plus ``captions.csv`` or ``captions.jsonl``.

    Planted: b.jpg is described by two rows (captions merged), ``../outside.jpg`` and an absolute path
    point outside the root ("path escapes dataset root"), missing.jpg does not exist, e.jpg's text is
    empty; the JSONL form also has a line that is not JSON ("unreadable line")."""
    for i, name in enumerate("abcde"):
        write_jpeg(root / "images" / f"{name}.jpg", seed=i)
    outside = write_jpeg(root.parent / "outside.jpg", seed=7)
    rows = [("images/a.jpg", "a cat on a mat", "cat|mat"),
            ("images/b.jpg", "a dog in a park", "dog"),
            ("images/b.jpg", "a brown dog", "dog|brown"),
            ("../outside.jpg", "escapes", "cat"),
            (str(outside), "absolute", "cat"),
            ("images/missing.jpg", "no file", "cat"),
            ("images/c.jpg", "a bird", ""),
            ("images/e.jpg", "", "cat")]
    if fmt == "csv":
        text = "image,text,labels\n" + "".join(f'{img},"{t}",{lab}\n' for img, t, lab in rows)
        (root / "captions.csv").write_text(text)
    else:
        lines = [json.dumps({"image": img, "tags": t.split(), "labels": [x for x in lab.split("|") if x]})
                 for img, t, lab in rows]
        lines.insert(2, "{not json")
        (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return {"rows": rows}


# -- MS-COCO ------------------------------------------------------------------------------------
def make_coco(root: Path, year: str = "2014") -> dict:
    """``{train,val}<year>/`` + ``annotations/captions_*`` and ``instances_*`` with 4 categories.

    Planted (val): image 21 has no caption, 22 no object ("no category"), 23's file is missing,
    ``extra.jpg`` is named by no annotation ("not in annotations"), a caption names image 999."""
    cats = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 3, "name": "car", "supercategory": "v"},
            {"id": 18, "name": "dog", "supercategory": "animal"}, {"id": 90, "name": "toothbrush", "supercategory": "x"}]
    truth = {"labels": {}, "captions": {}}
    for split, ids in (("train", [14, 3, 9]), ("val", [20, 21, 22, 23, 2])):
        folder = f"{split}{year}"
        images = [{"id": i, "file_name": f"COCO_{folder}_{i:012d}.jpg"} for i in ids]
        caps, objs, ann_id = [], [], 100
        for i in ids:
            if not (split == "val" and i == 23):
                write_jpeg(root / folder / f"COCO_{folder}_{i:012d}.jpg", seed=i)
            if i != 21:
                for k in range(2):
                    ann_id += 1
                    caps.append({"id": ann_id, "image_id": i, "caption": f"caption {k} of image {i} "})
                truth["captions"][i] = "\n".join(f"caption {k} of image {i}" for k in range(2))
            if i != 22:
                chosen = [cats[i % 4]["id"], cats[(i * 3) % 4]["id"]]
                objs += [{"id": ann_id * 10 + j, "image_id": i, "category_id": c} for j, c in enumerate(chosen)]
                truth["labels"][i] = sorted(set(chosen))
        if split == "val":
            caps.append({"id": 1, "image_id": 999, "caption": "orphan"})
            write_jpeg(root / folder / "extra.jpg", seed=5)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{folder}.json").write_text(
            json.dumps({"images": images, "annotations": caps}))
        (root / "annotations" / f"instances_{folder}.json").write_text(
            json.dumps({"images": images, "annotations": objs, "categories": cats}))
    return truth
