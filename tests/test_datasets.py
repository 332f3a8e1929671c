"""Dataset readers: real COCO-MINI / WIKI / MIRFLICKR files and generated official layouts."""
from __future__ import annotations

import json
import os
from collections import Counter

import h5py
import numpy as np
import pytest
import scipy.io

from cfrh.datasets import DatasetError, read_dataset
from cfrh.datasets._common import locate_files
from cfrh.datasets.base import DropReport
from cfrh.datasets.nuswide import read_01_matrix
from cfrh.datasets.shapes import COLOURS, SHAPES, generate_shapes

from fixtures import (MIRFLICKR_CONCEPTS, NUS_CONCEPTS, WIKI_CATEGORIES, make_coco, make_folder, make_mirflickr,
                      make_nuswide, make_wiki_raw)


def reasons(collection) -> dict[str, str]:
    return {item: reason for item, reason in collection.dropped.entries}


# -- COCO ---------------------------------------------------------------------------------------
def test_coco_mini_real(coco_mini_dir):
    c = read_dataset("coco", coco_mini_dir)
    ann = coco_mini_dir / "annotations"
    caps = {s: json.loads((ann / f"captions_{s}2017.json").read_text()) for s in ("train", "val")}
    inst = {s: json.loads((ann / f"instances_{s}2017.json").read_text()) for s in ("train", "val")}
    image_ids = sorted(im["id"] for s in caps for im in caps[s]["images"])
    assert len(c) == 159 and c.ids == [str(i) for i in image_ids]
    assert c.name == "coco2017" and c.text_kind == "captions"

    # 80-way labels, computed directly from the instance annotations.
    cats = sorted(inst["val"]["categories"], key=lambda x: x["id"])
    assert len(cats) == 80 and c.label_names == [x["name"] for x in cats]
    expected = np.zeros((159, 80), np.uint8)
    row = {i: r for r, i in enumerate(image_ids)}
    col = {x["id"]: j for j, x in enumerate(cats)}
    for s in inst:
        for a in inst[s]["annotations"]:
            expected[row[a["image_id"]], col[a["category_id"]]] = 1
    np.testing.assert_array_equal(c.labels, expected)

    # Captions in annotation-id order, joined by newlines; paths absolute, in the right split folder.
    first = image_ids[0]
    anns = sorted((a for s in caps for a in caps[s]["annotations"] if a["image_id"] == first), key=lambda a: a["id"])
    assert c.texts[0] == "\n".join(a["caption"].strip() for a in anns)
    split_of = {im["id"]: s for s in caps for im in caps[s]["images"]}
    assert all(p.is_absolute() and p.parent.name == f"{split_of[int(i)]}2017" for i, p in zip(c.ids, c.image_paths))
    assert [len(c.fixed_splits[s]) for s in ("train", "val")] == [80, 79]

    # The val folder's extra files are reported, nothing else dropped.
    named = {im["file_name"] for im in caps["val"]["images"]}
    extras = sorted(f"val2017/{p.name}" for p in (coco_mini_dir / "val2017").iterdir() if p.name not in named)
    assert len(extras) == 159 - 79
    assert c.dropped.counts == {"not in annotations": len(extras)}
    assert sorted(item for item, _ in c.dropped.entries) == extras
    assert c.fingerprint_extra["n_items"] == 159 and len(c.fingerprint_extra["files"]) == 4

    val_only = read_dataset("coco", coco_mini_dir, splits=["val"])
    assert len(val_only) == 79 and set(val_only.ids) == {str(im["id"]) for im in caps["val"]["images"]}


def test_coco_2014_fake_drops_and_order(tmp_path):
    truth = make_coco(tmp_path / "coco", "2014")
    c = read_dataset("coco", tmp_path / "coco")
    assert c.name == "coco2014"
    assert c.ids == ["2", "3", "9", "14", "20"]
    assert reasons(c) == {"21": "no caption", "22": "no category", "23": "missing image",
                          "val2014/extra.jpg": "not in annotations", "val2014:999": "annotation names no image"}
    assert c.label_names == ["person", "car", "dog", "toothbrush"]
    ids = [1, 3, 18, 90]
    for i, row in zip(c.ids, c.labels):
        assert [ids[j] for j in np.flatnonzero(row)] == truth["labels"][int(i)]
        assert c.texts[c.ids.index(i)] == truth["captions"][int(i)]
    np.testing.assert_array_equal(c.fixed_splits["train"], [1, 2, 3])
    np.testing.assert_array_equal(c.fixed_splits["val"], [0, 4])

    kept = read_dataset("coco", tmp_path / "coco", keep_unlabelled=True)
    assert "22" in kept.ids and kept.labels[kept.ids.index("22")].sum() == 0


def test_coco_errors(tmp_path):
    make_coco(tmp_path / "coco", "2014")
    (tmp_path / "coco" / "annotations" / "instances_val2014.json").unlink()
    with pytest.raises(DatasetError, match="instances_val2014.json"):
        read_dataset("coco", tmp_path / "coco")
    assert len(read_dataset("coco", tmp_path / "coco", splits=["train"])) == 3
    (tmp_path / "coco" / "annotations" / "captions_train2014.json").write_text("{broken")
    with pytest.raises(DatasetError, match="captions_train2014.json: not valid JSON"):
        read_dataset("coco", tmp_path / "coco", splits="train")
    with pytest.raises(DatasetError, match="no captions_"):
        read_dataset("coco", tmp_path)
    with pytest.raises(DatasetError, match="dataset.splits"):
        read_dataset("coco", tmp_path / "coco", splits=["test"])


# -- WIKI -----------------------------------------------------------------------------------------
def test_wiki_mat_real(wiki_dir):
    c = read_dataset("wiki-mat", wiki_dir)
    lines = [line.split() for f in ("trainset_txt_img_cat.list", "testset_txt_img_cat.list")
             for line in (wiki_dir / f).read_text().splitlines() if line.strip()]
    assert len(c) == 2866 and len(lines) == 2866
    assert c.image_features.shape == (2866, 128) and c.text_features.shape == (2866, 10)
    assert c.ids == [x[0] for x in lines]
    np.testing.assert_array_equal(c.labels.argmax(1) + 1, [int(x[2]) for x in lines])
    assert (c.labels.sum(1) == 1).all()
    assert c.label_names == (wiki_dir / "categories.list").read_text().split()
    np.testing.assert_array_equal(c.fixed_splits["train"], np.arange(2173))
    np.testing.assert_array_equal(c.fixed_splits["test"], np.arange(2173, 2866))
    mat = scipy.io.loadmat(wiki_dir / "wikiData.mat")
    np.testing.assert_array_equal(c.image_features[2173:], mat["I_te"])
    np.testing.assert_array_equal(c.labels[:2173], mat["L_tr"])
    assert c.text_kind == "precomputed" and c.image_paths is None and not len(c.dropped)
    raw = read_dataset("wiki-mat", wiki_dir, file="raw_features.mat")
    np.testing.assert_array_equal(raw.text_features, c.text_features)
    assert raw.fingerprint_extra["files_fingerprint"] != c.fingerprint_extra["files_fingerprint"]


def test_wiki_mat_label_mismatch_and_missing(tmp_path, wiki_dir):
    for f in ("categories.list", "trainset_txt_img_cat.list", "testset_txt_img_cat.list"):
        (tmp_path / f).write_bytes((wiki_dir / f).read_bytes())
    mat = scipy.io.loadmat(wiki_dir / "wikiData.mat")
    with pytest.raises(DatasetError, match="wikiData.mat: WIKI feature file not found"):
        read_dataset("wiki-mat", tmp_path)
    mat["L_te"] = np.roll(mat["L_te"], 1, axis=1)
    scipy.io.savemat(tmp_path / "wikiData.mat", {k: v for k, v in mat.items() if not k.startswith("__")})
    with pytest.raises(DatasetError, match="L_te disagrees with the categories in testset_txt_img_cat.list"):
        read_dataset("wiki-mat", tmp_path)


def test_wiki_raw_layout(tmp_path):
    truth = make_wiki_raw(tmp_path / "wiki")
    c = read_dataset("wiki", tmp_path / "wiki")
    assert reasons(c) == {"t3": "empty text", "t4": "missing text", "t5": "missing image", "t9": "no category",
                          "testset_txt_img_cat.list:5": "malformed list line"}
    assert c.ids == ["t0", "t1", "t2", "t6", "t7", "t8", "t10", "t11"]
    np.testing.assert_array_equal(c.fixed_splits["train"], np.arange(5))
    np.testing.assert_array_equal(c.fixed_splits["test"], [5, 6, 7])
    cats = dict((t, cat) for t, _, cat in truth["pairs"])
    np.testing.assert_array_equal(c.labels.argmax(1), [cats[t] - 1 for t in c.ids])
    assert c.label_names == list(WIKI_CATEGORIES)
    assert c.texts[c.ids.index("t2")] == "Fish & chips, a history."
    assert c.texts[0] == truth["articles"]["t0"]
    assert c.image_paths[0] == (tmp_path / "wiki" / "images" / WIKI_CATEGORIES[cats["t0"] - 1] / "img0.jpg").resolve()
    (tmp_path / "wiki" / "testset_txt_img_cat.list").unlink()
    with pytest.raises(DatasetError, match="testset_txt_img_cat.list"):
        read_dataset("wiki", tmp_path / "wiki")


# -- MIRFLICKR ------------------------------------------------------------------------------------
def test_mirflickr_layout_cleaning(tmp_path):
    root = tmp_path / "mf"
    truth = make_mirflickr(root)
    c = read_dataset("mirflickr25k", root, min_tag_images=3)

    # Independent computation of the cleaned set from the planted truth.
    df = Counter(t for i in truth["tag_files"] for t in truth["tags"][i])
    vocab = sorted(t for t, k in df.items() if k >= 3)
    expected = [i for i in sorted(truth["images"] | truth["tag_files"])
                if i in truth["tag_files"] and i in truth["images"] and i not in truth["outside"]
                and truth["labels"].get(i) and any(t in vocab for t in truth["tags"][i])]
    assert c.vocabulary == vocab == ["city", "night", "sky", "tree", "water"]
    assert c.ids == [str(i) for i in expected]
    assert c.label_names == list(MIRFLICKR_CONCEPTS)
    for i, row, text in zip(expected, c.labels, c.texts):
        assert {MIRFLICKR_CONCEPTS[j] for j in np.flatnonzero(row)} == truth["labels"][i]
        assert text == " ".join(truth["tags"][i])
    assert reasons(c) == {"5": "no label", "7": "no tags", "8": "no tag used by >= 3 images", "9": "missing image",
                          "10": "no tags file", "31": "missing image", "12": "path escapes dataset root",
                          "sky:999": "annotation names no image"}
    assert all(p.parent == (root / "mirflickr").resolve() for p in c.image_paths)
    assert c.text_kind == "tags" and c.labels.dtype == np.uint8

    # meta/tags_raw: the users' spelling, normalised to the meta/tags form (lower case, no spaces/punctuation).
    (root / "meta" / "tags").rename(root / "meta" / "tags_raw")
    (root / "meta" / "tags_raw" / "tags1.txt").write_text("New York\nSKY\n")
    raw = read_dataset("mirflickr25k", root, min_tag_images=3)
    assert raw.vocabulary == c.vocabulary and raw.texts[0] == "newyork sky"
    with pytest.raises(DatasetError, match="meta/tags: tag folder not found"):
        read_dataset("mirflickr25k", root, tags="tags")
    (root / "annotations").rename(root / "ann")
    with pytest.raises(DatasetError, match="annotations"):
        read_dataset("mirflickr25k", root)


def test_mirflickr_real_mat_via_mat_reader(mirflickr_dir, tmp_path):
    c = read_dataset("mat", mirflickr_dir)
    assert c.text_features.shape == (20015, 1386) and c.text_features.dtype == np.uint8
    assert c.labels.shape == (20015, 24) and c.labels.dtype == np.uint8
    assert c.image_features is None and c.fixed_splits is None and c.ids[:2] == ["0", "1"]
    # The cleaned protocol: every pair keeps at least one label and one tag.
    assert (c.labels.sum(1) >= 1).all() and (c.text_features.sum(1) >= 1).all()
    # Columns are the 24 concept files in alphabetical order (what our reader's label_names give): with
    # that order the annotation hierarchy holds — a sub-concept (clouds, dog, female, …) almost always
    # comes with its general concept (sky, animals, people, …). Any other column order breaks it.
    col = {name: j for j, name in enumerate(MIRFLICKR_CONCEPTS)}
    for sub, general in [("clouds", "sky"), ("bird", "animals"), ("dog", "animals"), ("baby", "people"),
                         ("female", "people"), ("male", "people"), ("portrait", "people"), ("tree", "plant_life"),
                         ("flower", "plant_life"), ("sea", "water"), ("lake", "water"), ("river", "water"),
                         ("car", "transport")]:
        has_sub = c.labels[:, col[sub]] == 1
        assert c.labels[has_sub, col[general]].mean() > 0.99, (sub, general)
    assert int(np.argmin(c.labels.sum(0))) == col["baby"] and int(np.argmax(c.labels.sum(0))) == col["structures"]

    # The layout reader yields the same kind of data: 24 uint8 label columns in this order, and a tag
    # BoW over its fixed vocabulary that is binary with at least one tag per kept pair, as YAll is.
    make_mirflickr(tmp_path / "mf")
    fake = read_dataset("mirflickr25k", tmp_path / "mf", min_tag_images=3)
    assert fake.label_names == list(MIRFLICKR_CONCEPTS) and fake.labels.dtype == c.labels.dtype
    assert (fake.labels.sum(1) >= 1).all()
    vocab = {t: j for j, t in enumerate(fake.vocabulary)}
    bow = np.zeros((len(fake), len(vocab)), np.uint8)
    for i, text in enumerate(fake.texts):
        bow[i, [vocab[t] for t in text.split() if t in vocab]] = 1
    assert set(np.unique(bow)) == set(np.unique(c.text_features)) == {0, 1} and (bow.sum(1) >= 1).all()


# -- NUS-WIDE -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flat", [False, True])
def test_nuswide_tc_setting(tmp_path, flat):
    root = tmp_path / "nus"
    truth = make_nuswide(root, flat=flat)
    c = read_dataset("nuswide", root, top_concepts=3)
    counts = truth["labels"].sum(0)
    top = sorted(np.argsort(-counts, kind="stable")[:3])
    assert c.label_names == [NUS_CONCEPTS[j] for j in top] == ["sky", "clouds", "person"]
    keep = [i for i in range(len(truth["keys"])) if truth["labels"][i, top].any() and truth["tags"][i].any()
            and i not in truth["missing"]]
    assert c.ids == [truth["keys"][i].rsplit(".", 1)[0] for i in keep]
    np.testing.assert_array_equal(c.labels, truth["labels"][keep][:, top])
    assert c.texts[0] == " ".join(truth["tag_names"][j] for j in np.flatnonzero(truth["tags"][keep[0]]))
    assert c.vocabulary == truth["tag_names"]
    r = reasons(c)
    assert r[truth["keys"][3].rsplit(".", 1)[0]] == "none of the top-3 concepts"
    assert r[truth["keys"][4].rsplit(".", 1)[0]] == "no tags"
    assert r[truth["keys"][6].rsplit(".", 1)[0]] == "missing image"
    assert sum(c.dropped.counts.values()) == 40 - len(keep)
    train = [k for k in range(len(keep)) if keep[k] < 30]
    np.testing.assert_array_equal(c.fixed_splits["train"], train)
    assert len(c.fixed_splits["test"]) == len(keep) - len(train)


def test_nuswide_tag_names_default_and_errors(tmp_path):
    root = tmp_path / "nus"
    make_nuswide(root, tag_names=False)
    assert read_dataset("nuswide", root).vocabulary == [f"tag{j}" for j in range(15)]
    lines = (root / "NUS_WID_Tags" / "AllTags1k.txt").read_text().splitlines()
    (root / "NUS_WID_Tags" / "AllTags1k.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetError, match="AllTags1k.txt: 39 rows but Imagelist.txt lists 40"):
        read_dataset("nuswide", root)
    (root / "NUS_WID_Tags" / "AllTags1k.txt").unlink()
    with pytest.raises(DatasetError, match="AllTags1k.txt"):
        read_dataset("nuswide", root)


def test_01_matrix_parser(tmp_path):
    f = tmp_path / "m.txt"
    f.write_text("0 1 0\n\n1\t1\t0\t\n")
    np.testing.assert_array_equal(read_01_matrix(f, block_lines=1), [[0, 1, 0], [1, 1, 0]])
    f.write_text("0 10 2\n3 0 0\n")  # counts, multi-digit: the general path gives presence
    np.testing.assert_array_equal(read_01_matrix(f), [[0, 1, 1], [1, 0, 0]])
    f.write_text("0 1 0\n1 1\n")
    with pytest.raises(DatasetError, match="a row has 2 columns where the first has 3"):
        read_01_matrix(f)
    f.write_text("0 x 1\n")
    with pytest.raises(DatasetError, match="non-integer"):
        read_01_matrix(f)


# -- a user's folder --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_folder_csv_and_jsonl(tmp_path, fmt):
    root = tmp_path / "mine"
    make_folder(root, fmt)
    c = read_dataset("folder", root)
    assert c.ids == ["images/a.jpg", "images/b.jpg", "images/c.jpg"]
    assert c.text_kind == ("captions" if fmt == "csv" else "tags")
    if fmt == "csv":
        assert c.texts == ["a cat on a mat", "a dog in a park\na brown dog", "a bird"]
    else:
        assert c.texts == ["a cat on a mat", "a dog in a park a brown dog", "a bird"]
    assert c.label_names == ["brown", "cat", "dog", "mat"]
    np.testing.assert_array_equal(c.labels, [[0, 1, 0, 1], [1, 0, 1, 0], [0, 0, 0, 0]])
    r = reasons(c)
    outside = str((tmp_path / "outside.jpg"))
    assert r["../outside.jpg"] == r[outside] == "path escapes dataset root"
    assert r["images/missing.jpg"] == "missing image" and r["images/e.jpg"] == "empty text"
    assert (r.get("captions.jsonl:3") == "unreadable line") == (fmt == "jsonl")
    assert all(str(p).startswith(str(root.resolve())) for p in c.image_paths)


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no CSV/JSONL annotation files"):
        read_dataset("folder", tmp_path / "empty")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "list.csv").write_text("file,text\na.jpg,hello\n")
    with pytest.raises(DatasetError, match="list.csv: no 'image' field"):
        read_dataset("folder", tmp_path / "x")
    with pytest.raises(DatasetError, match="nope.csv: annotation file not found"):
        read_dataset("folder", tmp_path / "x", annotations="nope.csv")
    (tmp_path / "x" / "list.csv").write_text("image,text\na.jpg,hello\n")
    with pytest.raises(DatasetError, match="list.csv: no 'tags' field"):
        read_dataset("folder", tmp_path / "x", text_field="tags")
    (tmp_path / "x" / "other.jsonl").write_text("{}\n")
    with pytest.raises(DatasetError, match="several CSV/JSONL annotation files"):
        read_dataset("folder", tmp_path / "x")


def test_locate_files_guards_symlinked_folders(tmp_path):
    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    (root / "in" / "a.jpg").write_bytes(b"x")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b.jpg").write_bytes(b"x")
    (root / "linkdir").symlink_to(tmp_path / "out")
    (root / "in" / "inner").symlink_to(root / "in" / "a.jpg")
    (root / "in" / "sub").mkdir()
    dropped = DropReport()
    found, paths = locate_files(root, ["in/a.jpg", "linkdir/b.jpg", "in/sub/../a.jpg", "in/inner", "in/sub",
                                       "/etc/passwd", ""], list("abcdefg"), dropped)
    np.testing.assert_array_equal(found, [True, False, True, True, False, False, False])
    assert paths[0] == paths[2] == (root / "in" / "a.jpg").resolve()
    assert dict(dropped.entries) == {"b": "path escapes dataset root", "e": "missing image",
                                     "f": "path escapes dataset root", "g": "path escapes dataset root"}


# -- precomputed .mat -------------------------------------------------------------------------------
def test_mat_split_form_and_class_vectors(tmp_path):
    rng = np.random.default_rng(0)
    data = {"I_tr": rng.random((6, 4)), "T_tr": rng.random((6, 3)), "L_tr": np.array([[1, 2, 3, 1, 2, 3]]),
            "I_te": rng.random((2, 4)), "T_te": rng.random((2, 3)), "L_te": np.array([[3, 1]]),
            "I_db": rng.random((3, 4)), "T_db": rng.random((3, 3)), "L_db": np.array([[2, 2, 1]])}
    scipy.io.savemat(tmp_path / "feat.mat", data)
    c = read_dataset("mat", tmp_path / "feat.mat", label_names=["a", "b", "c"])
    assert c.ids[:1] + c.ids[6:7] + c.ids[8:9] == ["train/0", "test/0", "database/0"]
    np.testing.assert_allclose(c.image_features, np.vstack([data["I_tr"], data["I_te"], data["I_db"]]))
    np.testing.assert_array_equal(c.labels.argmax(1), [0, 1, 2, 0, 1, 2, 2, 0, 1, 1, 0])
    assert {k: v.tolist() for k, v in c.fixed_splits.items()} == \
        {"train": list(range(6)), "test": [6, 7], "database": [8, 9, 10]}
    assert c.label_names == ["a", "b", "c"]


def test_mat_separate_files_key_override_and_v73(tmp_path):
    rng = np.random.default_rng(1)
    x, y, lab = rng.random((5, 4)), rng.integers(0, 2, (5, 7)).astype(np.uint8), np.eye(5, 3, dtype=np.uint8)
    scipy.io.savemat(tmp_path / "img.mat", {"feats": x})
    scipy.io.savemat(tmp_path / "txt.mat", {"YAll": y})
    # A MATLAB v7.3 file: HDF5 with a 512-byte MATLAB header, arrays stored transposed.
    with h5py.File(tmp_path / "lab.mat", "w", userblock_size=512) as f:
        f["LAll"] = lab.T
    with open(tmp_path / "lab.mat", "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116) + b"\0" * 8 + b"\x00\x02IM")
    c = read_dataset("mat", tmp_path, image_key="feats")
    np.testing.assert_allclose(c.image_features, x)
    np.testing.assert_array_equal(c.text_features, y)
    np.testing.assert_array_equal(c.labels, lab)
    assert c.ids == ["0", "1", "2", "3", "4"] and c.texts == [""] * 5


def test_mat_errors(tmp_path):
    scipy.io.savemat(tmp_path / "pix.mat", {"IAll": np.zeros((2, 3, 4, 4), np.uint8), "YAll": np.ones((2, 3))})
    with pytest.raises(DatasetError, match="raw pixels rather than features"):
        read_dataset("mat", tmp_path / "pix.mat")
    scipy.io.savemat(tmp_path / "bad.mat", {"XAll": np.ones((3, 2)), "YAll": np.ones((4, 3))})
    with pytest.raises(DatasetError, match="row counts differ"):
        read_dataset("mat", tmp_path / "bad.mat")
    scipy.io.savemat(tmp_path / "none.mat", {"foo": np.ones((3, 2))})
    with pytest.raises(DatasetError, match="no feature arrays found"):
        read_dataset("mat", tmp_path / "none.mat")
    with pytest.raises(DatasetError, match="also in"):
        read_dataset("mat", tmp_path, files=["bad.mat", "bad.mat"])
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(DatasetError, match="junk.mat"):
        read_dataset("mat", tmp_path / "junk.mat")


def test_unknown_reader_and_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset reader"):
        read_dataset("nope", tmp_path)
    with pytest.raises(DatasetError, match="dataset root not found"):
        read_dataset("coco", tmp_path / "absent")


# -- the demo collection ----------------------------------------------------------------------------
def test_generate_shapes_is_deterministic_and_readable(tmp_path):
    a = generate_shapes(tmp_path / "a", n=40, seed=3, size=48)
    b = generate_shapes(tmp_path / "b", n=25, seed=3, size=48)
    for i in range(25):
        name = f"images/{i:05d}.jpg"
        assert (a / name).read_bytes() == (b / name).read_bytes()
    rows = [json.loads(x) for x in (a / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    for row in rows:
        words = row["tags"].split()
        colours, shapes = words[0::2], words[1::2]
        assert 1 <= len(shapes) <= 3 and set(colours) <= set(COLOURS) and set(shapes) <= set(SHAPES)
        assert row["labels"] == sorted({f"{c} {s}" for c, s in zip(colours, shapes)})
        assert all(f"{c} {s}" in row["text"] for c, s in zip(colours, shapes))
    mtime = os.stat(a / "captions.jsonl").st_mtime_ns
    generate_shapes(tmp_path / "a", n=40, seed=3, size=48)
    assert os.stat(a / "captions.jsonl").st_mtime_ns == mtime  # same settings: left as it is
    generate_shapes(tmp_path / "a", n=30, seed=3, size=48)
    assert len(list((a / "images").iterdir())) == 30

    c = read_dataset("folder", a, text_field="tags")
    assert len(c) == 30 and c.text_kind == "tags" and c.ids[0] == "shapes-00000"
    assert set(c.label_names) <= {f"{c} {s}" for c in COLOURS for s in SHAPES} and (c.labels.sum(1) >= 1).all()
    np.testing.assert_array_equal(c.labels.sum(1), [len(set(r["labels"])) for r in rows[:30]])
    from PIL import Image
    with Image.open(c.image_paths[0]) as im:
        assert im.size == (48, 48) and im.mode == "RGB"


def test_demo_pipeline_dataset_section(tmp_path):
    from cfrh.config import load_pipeline
    pipe = load_pipeline("demo")
    assert pipe.dataset["reader"] == "folder" and pipe.resolve_path(pipe.dataset["root"]).name == "demo-data"
    root = generate_shapes(tmp_path / "demo-data", n=60)
    options = {k: v for k, v in pipe.dataset.items() if k not in ("reader", "root")}
    c = read_dataset("folder", root, **options)
    assert len(c) == 60 and c.text_kind == "tags"
