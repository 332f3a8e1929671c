"""The foundation every stage shares: pipeline configs, the Zarr cache, splits and packed codes."""
from __future__ import annotations

import numpy as np
import pytest

from cfrh.cache import CacheCorrupt, CacheError, CacheMismatch, FeatureCache, describe_differences, feature_key
from cfrh.codes import hamming_distances, pack_codes, unpack_codes
from cfrh.config import ConfigError, apply_overrides, load_pipeline, parse_override
from cfrh.splits import SplitError, make_splits


# -- config -----------------------------------------------------------------------------------
def test_override_values_are_parsed_as_toml():
    assert parse_override("train.epochs=20") == (["train", "epochs"], 20)
    assert parse_override("train.bits=[16, 32]") == (["train", "bits"], [16, 32])
    assert parse_override("dataset.root=/data/x") == (["dataset", "root"], "/data/x")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("epochs")
    with pytest.raises(ConfigError, match="must start with one of"):
        parse_override("nosuch.key=1")


def test_pipeline_paths_resolve_against_its_folder_or_the_working_directory(tmp_path, monkeypatch):
    pipe = load_pipeline("wiki", ["split.seed=3"])
    assert pipe.dataset["reader"] == "wiki-mat"
    assert pipe.split["seed"] == 3
    # A packaged pipeline's relative paths are meant for the working directory (like ./cache)...
    monkeypatch.chdir(tmp_path)
    assert pipe.packaged and pipe.resolve_path("data/wiki") == tmp_path / "data" / "wiki"
    # ...a user's own pipeline file's for its own folder, wherever the command runs.
    own = tmp_path / "mine" / "p.toml"
    own.parent.mkdir()
    own.write_text("[dataset]\nreader = 'wiki-mat'\nroot = 'wiki'\n")
    monkeypatch.chdir("/")
    mine = load_pipeline(own)
    assert not mine.packaged and mine.resolve_path(mine.dataset["root"]) == tmp_path / "mine" / "wiki"
    bad = tmp_path / "bad.toml"
    bad.write_text("[dataset]\nroot = 'x'\n")
    with pytest.raises(ConfigError, match="needs a 'reader'"):
        load_pipeline(bad)
    with pytest.raises(ConfigError, match="unknown pipeline"):
        load_pipeline("no-such-pipeline")
    assert apply_overrides(pipe, ["train.lr=0.5"]).train["lr"] == 0.5 and "lr" not in pipe.train


# -- codes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 16, 64, 128, 72])
def test_packed_hamming_equals_sign_disagreements(bits):
    rng = np.random.default_rng(bits)
    a, b = rng.standard_normal((37, bits)), rng.standard_normal((101, bits))
    expected = (np.sign(a)[:, None, :] != np.sign(b)[None, :, :]).sum(-1)
    np.testing.assert_array_equal(hamming_distances(pack_codes(a), pack_codes(b)), expected)
    np.testing.assert_array_equal(unpack_codes(pack_codes(a), bits), np.where(a > 0, 1, -1))
    assert pack_codes(a).shape == (37, bits // 8)


# -- splits -----------------------------------------------------------------------------------
def test_random_split_is_seeded_disjoint_and_sized():
    s = make_splits(1000, {"query": 100, "train": 300, "seed": 1})
    t = make_splits(1000, {"query": 100, "train": 300, "seed": 1})
    for k in s:
        np.testing.assert_array_equal(s[k], t[k])
    assert len(s["query"]) == 100 and len(s["train"]) == 300 and len(s["database"]) == 900
    assert not np.intersect1d(s["query"], s["database"]).size
    assert np.isin(s["train"], s["database"]).all()
    assert not np.array_equal(make_splits(1000, {"query": 100, "seed": 2})["query"], s["query"])


def test_per_label_queries_cover_each_label():
    labels = np.zeros((400, 4), np.uint8)
    labels[np.arange(400), np.arange(400) % 4] = 1
    s = make_splits(400, {"query_per_label": 10, "train": 50}, labels=labels)
    np.testing.assert_array_equal(labels[s["query"]].sum(0), [10, 10, 10, 10])
    with pytest.raises(SplitError, match="fewer than query_per_label"):
        make_splits(400, {"query_per_label": 200}, labels=labels)


def test_fixed_split_uses_dataset_lists():
    fixed = {"train": np.arange(5, 10), "test": np.arange(5)}
    s = make_splits(10, {"method": "fixed"}, fixed=fixed)
    np.testing.assert_array_equal(s["query"], np.arange(5))
    np.testing.assert_array_equal(s["database"], np.arange(5, 10))


# -- cache ------------------------------------------------------------------------------------
def test_feature_key_names():
    assert feature_key("openai/clip-vit-base-patch32") == "openai--clip-vit-base-patch32"
    assert feature_key("/models/../x/clip b") == "x--clip-b"


@pytest.mark.parametrize("root", ["local", "memory://cfrh-test"])
def test_cache_round_trip_checksums_and_mismatch(tmp_path, root):
    root = str(tmp_path) if root == "local" else root
    request = {"dataset": {"name": "toy"}, "image": {"model": "m1"}}
    cache, resumed = FeatureCache.create(root, "toy", "m1", request, overwrite=True)
    assert not resumed
    img = np.arange(50 * 4, dtype=np.float16).reshape(50, 4)
    cache.write("image", img, chunk_rows=8)
    cache.write("ids", [f"id{i}" for i in range(50)])
    cache.write("splits/train", np.arange(0, 50, 2))
    with pytest.raises(CacheError, match="did not finish"):
        FeatureCache.open(root, "toy", "m1")
    cache.finalize(counts={"items": 50})
    again = FeatureCache.open(root, "toy", "m1", request=request)
    np.testing.assert_array_equal(again.read("image"), img)
    np.testing.assert_array_equal(again.read("image", np.array([7, 3, 7, 49])), img[[7, 3, 7, 49]])
    assert again.strings("ids")[:2] == ["id0", "id1"] and again.n_items == 50
    np.testing.assert_array_equal(again.split("train"), np.arange(0, 50, 2))
    assert again.verify() == [] and len(again.fingerprint) == 16
    assert again.manifest["checksums"]["image"]["rows"] == 8 and len(again.manifest["checksums"]["image"]["blocks"]) == 7
    with pytest.raises(CacheError, match="complete and immutable"):
        again.write("labels", np.zeros((50, 2), np.uint8))
    rw = FeatureCache.open(root, "toy", "m1", mode="r+")
    rw.group["image"][3, 1] = 1.0          # behind the cache's back: block 0 (rows 0-7) now differs
    assert rw.verify() == ["image: block 0 (rows 0–7) contents differ from the digest recorded at extraction "
                           "(altered or missing chunk)"]
    with pytest.raises(CacheCorrupt, match=r"array 'image' block 0 \(rows 0–7\) is corrupt.*--overwrite"):
        rw.read("image", np.array([40, 2]))
    np.testing.assert_array_equal(rw.read("image", slice(8, 50)), img[8:])   # other blocks still read
    with pytest.raises(CacheMismatch, match=r"image.model: cache has 'm1', asked for 'm2'"):
        FeatureCache.create(root, "toy", "m1", {"dataset": {"name": "toy"}, "image": {"model": "m2"}})


def test_block_progress_survives_reopen(tmp_path):
    cache, _ = FeatureCache.create(tmp_path, "toy", "m", {"a": 1})
    assert not cache.blocks_done("image", 3).any()
    cache.mark_block_done("image", 1)
    reopened, resumed = FeatureCache.create(tmp_path, "toy", "m", {"a": 1})
    assert resumed
    np.testing.assert_array_equal(reopened.blocks_done("image", 3), [False, True, False])


def test_describe_differences_lists_nested_keys():
    assert describe_differences({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "c": 2}) == \
        ["a.b: cache has 1, asked for 2"]
