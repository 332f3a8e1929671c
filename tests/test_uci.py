"""The multi-view CSV reader ("mfeat") on the real UCI Multiple Features copy (../shared, skipped when absent), its
pipeline through extraction into a cache, and its one-line errors on malformed folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path

from cfrh.config import load_pipeline
from cfrh.datasets import DatasetError, read_dataset
from cfrh.extraction import extract

# default_rng(0).permutation(2000)[:5], written out: the first queries of the README's protocol
FIRST_QUERIES = [1946, 1236, 1380, 1949, 1633]


@pytest.fixture
def mfeat_dir() -> Path:
    return shared_path("data", "uci-mfeat")


def test_real_views_labels_and_protocol(mfeat_dir):
    c = read_dataset("mfeat", mfeat_dir)
    assert c.image_features.shape == (2000, 240) and c.image_features.dtype == np.float32
    assert c.text_features.shape == (2000, 76) and c.text_features.dtype == np.float32
    assert c.labels.shape == (2000, 10) and c.label_names == [str(d) for d in range(10)]
    assert (c.labels.sum(axis=1) == 1).all() and (c.labels.sum(axis=0) == 200).all()
    # the files' first digit is a 0 and the last a 9; values as printed in the CSVs
    assert c.labels[0, 0] == 1 and c.labels[-1, 9] == 1
    np.testing.assert_array_equal(c.image_features[0, :10], [0, 3, 4, 4, 6, 6, 6, 6, 6, 5])
    assert c.text_features[0, 0] == np.float32(0.065882)
    assert c.ids[:3] == ["0", "1", "2"] and c.text_kind == "precomputed"
    test, train = c.fixed_splits["test"], c.fixed_splits["train"]
    assert len(test) == 400 and len(train) == 1600
    assert test[:5].tolist() == FIRST_QUERIES
    np.testing.assert_array_equal(np.concatenate([test, train]), np.random.default_rng(0).permutation(2000))


def test_other_views_and_query_count(mfeat_dir):
    c = read_dataset("mfeat", mfeat_dir, image_view="kar", text_view="mor", query=100, seed=3)
    assert c.image_features.shape == (2000, 64) and c.text_features.shape == (2000, 6)
    np.testing.assert_array_equal(c.fixed_splits["test"], np.random.default_rng(3).permutation(2000)[:100])


def test_pipeline_extracts_the_views_into_a_cache(mfeat_dir, tmp_path):
    pipe = load_pipeline("uci-mfeat", [f"dataset.root='{mfeat_dir}'"])
    result = extract(pipe, cache_root=tmp_path / "cache")
    cache = result.cache
    c = read_dataset("mfeat", mfeat_dir)
    image, text = cache.read("image"), cache.read("text")
    assert image.shape == (2000, 240) and image.dtype == np.float32
    assert text.shape == (2000, 76) and text.dtype == np.float32
    np.testing.assert_array_equal(image, c.image_features)
    np.testing.assert_array_equal(text, c.text_features)
    np.testing.assert_array_equal(cache.read("labels"), c.labels)
    order = np.random.default_rng(0).permutation(2000)
    np.testing.assert_array_equal(cache.split("query"), np.sort(order[:400]))  # stored splits are sorted rows
    np.testing.assert_array_equal(cache.split("train"), np.sort(order[400:]))
    np.testing.assert_array_equal(cache.split("database"), np.sort(order[400:]))
    assert set(FIRST_QUERIES) <= set(cache.split("query").tolist())
    assert [str(x) for x in cache.read("ids")[:3]] == ["0", "1", "2"]


# -- malformed folders: one line naming the file (and line) and the fix -----------------------------------
def write_view(folder: Path, view: str, rows: list[list], header: list[str] | None = None) -> Path:
    width = len(rows[0]) if rows else 3
    header = header or [str(i) for i in range(width - 1)] + ["label"]
    lines = [",".join(header)] + [",".join(str(x) for x in row) for row in rows]
    path = folder / f"mfeat-{view}.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def small_folder(folder: Path) -> Path:
    write_view(folder, "pix", [[1, 2, 0], [3, 4, 1], [5, 6, 1], [7, 8, 0]])
    write_view(folder, "fou", [[0.5, 0], [0.25, 1], [0.125, 1], [1.0, 0]], header=["a", "label"])
    return folder


def test_small_folder_reads(tmp_path):
    c = read_dataset("mfeat", small_folder(tmp_path), query=1)
    assert c.image_features.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]] and c.text_features.shape == (4, 1)
    assert c.labels.tolist() == [[1, 0], [0, 1], [0, 1], [1, 0]]
    assert len(c.fixed_splits["test"]) == 1 and len(c.fixed_splits["train"]) == 3


def test_missing_view_names_the_file_and_the_views(tmp_path):
    small_folder(tmp_path)
    with pytest.raises(DatasetError, match=r"mfeat-zer\.csv: view 'zer' not found \(views here: fou, pix\)"):
        read_dataset("mfeat", tmp_path, text_view="zer")


def test_row_counts_must_match(tmp_path):
    small_folder(tmp_path)
    write_view(tmp_path, "fou", [[0.5, 0], [0.25, 1], [0.125, 1]], header=["a", "label"])
    with pytest.raises(DatasetError, match=r"mfeat-fou\.csv: 3 rows but mfeat-pix\.csv has 4; every view file"):
        read_dataset("mfeat", tmp_path, query=1)


def test_non_numeric_cell_names_file_line_and_column(tmp_path):
    small_folder(tmp_path)
    write_view(tmp_path, "pix", [[1, 2, 0], [3, 4, 1], [5, "x6", 1], [7, 8, 0]])
    with pytest.raises(DatasetError, match=r"mfeat-pix\.csv:4: column '1' holds 'x6', not a finite number"):
        read_dataset("mfeat", tmp_path, query=1)
    write_view(tmp_path, "pix", [[1, 2, 0], [3, "nan", 1], [5, 6, 1], [7, 8, 0]])
    with pytest.raises(DatasetError, match=r"mfeat-pix\.csv:3: column '1' holds 'nan'"):
        read_dataset("mfeat", tmp_path, query=1)


def test_ragged_rows_labels_and_protocol_are_checked(tmp_path):
    small_folder(tmp_path)
    write_view(tmp_path, "fou", [[0.5, 0], [0.25, 1], [0.125, 0], [1.0, 0]], header=["a", "label"])
    with pytest.raises(DatasetError, match=r"mfeat-fou\.csv:4: label '0', but mfeat-pix\.csv line 4"):
        read_dataset("mfeat", tmp_path, query=1)
    small_folder(tmp_path)
    (tmp_path / "mfeat-pix.csv").write_text("0,1,label\n1,2,0\n3,4\n")
    with pytest.raises(DatasetError, match=r"mfeat-pix\.csv:3: 2 fields where the header has 3"):
        read_dataset("mfeat", tmp_path, query=1)
    small_folder(tmp_path)
    with pytest.raises(DatasetError, match=r"dataset.query = 4: .* between 1 and 3"):
        read_dataset("mfeat", tmp_path, query=4)
    with pytest.raises(DatasetError, match=r"no column 'class'"):
        read_dataset("mfeat", tmp_path, query=1, label_column="class")


def test_label_column_by_name_and_class_order(tmp_path):
    write_view(tmp_path, "pix", [["b", 1, 2], ["a", 3, 4], ["b", 5, 6]], header=["kind", "x", "y"])
    write_view(tmp_path, "fou", [["b", 1], ["a", 2], ["b", 3]], header=["kind", "z"])
    c = read_dataset("mfeat", tmp_path, query=1, label_column="kind")
    assert c.label_names == ["a", "b"] and c.labels.tolist() == [[0, 1], [1, 0], [0, 1]]
    assert c.image_features.tolist() == [[1, 2], [3, 4], [5, 6]]
    write_view(tmp_path, "pix", [[1, 10], [2, 9], [3, 10]])
    write_view(tmp_path, "fou", [[1, 10], [2, 9], [3, 10]])
    assert read_dataset("mfeat", tmp_path, query=1).label_names == ["9", "10"]  # integers in numeric order
