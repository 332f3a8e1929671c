"""Stage 1 end to end: a dataset → the Zarr feature cache (`cfrh.extraction.extract`, `cfrh extract`,
`cfrh cache ls|info|verify`), with the tiny random CLIP of clip_fixtures."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cfrh.cache import CacheError, CacheMismatch, FeatureCache, feature_key
from cfrh.cli import cli
from cfrh.config import load_pipeline
from cfrh.datasets import load_all
from cfrh.datasets.base import READERS, Collection, DropReport, read_dataset, register
from cfrh.extraction import ExtractError, extract, model_location
from cfrh.features.image import load_clip
from cfrh.features.text import BowVectoriser
from clip_fixtures import make_tiny_clip

N_GOOD = 22
BROKEN = 9  # row of the file that is not an image


@register("tests-synthetic")
def _read_synthetic(root: Path) -> Collection:
    """A reader for the generated test collection: items.json beside the images."""
    spec = json.loads((root / "items.json").read_text())
    dropped = DropReport()
    dropped.add("ghost", "missing image file")
    return Collection(name="synthetic", root=root, ids=spec["ids"], texts=spec["texts"],
                      image_paths=[root / p for p in spec["paths"]],
                      labels=np.asarray(spec["labels"], dtype=np.uint8), label_names=["red", "green", "blue"],
                      text_kind="tags", dropped=dropped, fingerprint_extra={"n": len(spec["ids"])})


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """N_GOOD + 1 items: JPEGs and PNGs of varied sizes, one file that is not an image, tags, 3 labels."""
    root = tmp_path_factory.mktemp("synthetic")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    words = ["sky", "sea", "dog", "cat", "tree", "car", "road", "sun"]
    ids, texts, paths, labels = [], [], [], []
    for i in range(N_GOOD + 1):
        name = f"img/{i:03d}." + ("png" if i % 3 == 0 else "jpg")
        if i == BROKEN:
            (root / name).write_bytes(b"\x00 definitely not a picture")
        else:
            Image.fromarray(rng.integers(0, 256, (20 + i, 30 + 2 * i, 3), dtype=np.uint8)).save(root / name)
        ids.append(f"item{i:03d}")
        paths.append(name)
        texts.append(" ".join(rng.choice(words, size=3, replace=False)) + (" Rare" if i == 0 else ""))
        labels.append(np.eye(3, dtype=int)[i % 3].tolist())
    (root / "items.json").write_text(json.dumps({"ids": ids, "texts": texts, "paths": paths, "labels": labels}))
    return root


def _pipeline_file(tmp_path: Path, root: Path, model: Path, extra: str = "") -> Path:
    p = tmp_path / "synthetic.toml"
    p.write_text(f"""name = "synthetic"
[dataset]
reader = "tests-synthetic"
root = "{root}"
[features]
image_model = "{model}"
batch_size = 3
block_rows = 7
workers = 0
{extra}
[split]
method = "random"
query = 4
train = 10
seed = 0
""")
    return p


def _arrays(cache: FeatureCache) -> dict[str, np.ndarray]:
    return {name: cache.read(name) for name in cache.data_arrays()}


def test_extract_synthetic_collection(tiny_clip, dataset_dir, tmp_path):
    pipe = load_pipeline(_pipeline_file(tmp_path, dataset_dir, tiny_clip))
    result = extract(pipe, tmp_path / "cache")
    cache = result.cache
    assert cache.url.endswith("/synthetic/" + cache.url.rstrip("/").rsplit("/", 1)[-1])
    assert not result.resumed and cache.is_complete

    # the broken image is dropped with its reason, next to the reader's own drops
    kept = [i for i in range(N_GOOD + 1) if i != BROKEN]
    assert cache.strings("ids") == [f"item{i:03d}" for i in kept]
    assert result.dropped["by_reason"] == {"missing image file": 1,
                                           "image decode failed: UnidentifiedImageError": 1}
    assert ["item009", "image decode failed: UnidentifiedImageError"] in result.dropped["items"]
    assert result.counts["items"] == N_GOOD and result.counts["image_failures"] == 1

    # image rows: float16, unit length, the same embeddings a direct call gives
    image = cache.read("image")
    assert image.shape == (N_GOOD, 16) and image.dtype == np.float16
    enc = load_clip(tiny_clip)
    paths = cache.strings("paths")
    assert paths[0] == "img/000.png" and not any(p.startswith("/") for p in paths)
    direct = enc.encode([Image.open(dataset_dir / p) for p in paths])
    np.testing.assert_allclose(image.astype(np.float32), direct.astype(np.float32), atol=2e-3)

    # splits over the kept items; vocabulary from every kept item's text (no label, independent of the split)
    q, tr, db = (cache.split(s) for s in ("query", "train", "database"))
    assert len(q) == 4 and len(tr) == 10 and len(db) == N_GOOD - 4
    assert not np.intersect1d(q, db).size and np.isin(tr, db).all()
    texts = cache.strings("texts")
    expected = BowVectoriser(kind="tags").fit(texts)
    assert cache.strings("vocabulary") == expected.vocabulary and "rare" in expected.vocabulary
    np.testing.assert_array_equal(cache.read("text"), expected.transform_dense(texts))
    np.testing.assert_array_equal(cache.read("labels").argmax(1), np.array(kept) % 3)
    assert cache.strings("label_names") == ["red", "green", "blue"]

    m = cache.manifest
    assert m["request"]["image"]["model"] == "tiny-clip" and m["request"]["image"]["precision"] == "fp32"
    assert m["request"]["text"]["binary"] is True and m["split"]["query"] == 4 and "split" not in m["request"]
    assert m["found"]["image"]["throughput"]["images"] == N_GOOD + 1
    assert "_progress" not in cache.group and cache.verify() == []

    again = extract(pipe, tmp_path / "cache")
    assert again.already_complete and again.counts == result.counts


def test_interrupted_extraction_resumes_to_identical_arrays(tiny_clip, dataset_dir, tmp_path):
    pipe = load_pipeline(_pipeline_file(tmp_path, dataset_dir, tiny_clip))

    class Interrupt(Exception):
        pass

    def stop_midway(done: int, total: int, seconds: float) -> None:
        if done >= 12:  # block 0 (rows 0-6) stored, block 1 half done
            raise Interrupt

    with pytest.raises(Interrupt):
        extract(pipe, tmp_path / "a", on_images=stop_midway)
    with pytest.raises(CacheError, match="did not finish"):
        FeatureCache.open(tmp_path / "a", "synthetic", feature_key(str(tiny_clip)))

    resumed = extract(pipe, tmp_path / "a")
    assert resumed.resumed and resumed.found["image"]["throughput"]["images"] == N_GOOD + 1 - 7
    fresh = extract(pipe, tmp_path / "b")
    a, b = _arrays(resumed.cache), _arrays(fresh.cache)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert resumed.cache.manifest["checksums"] == fresh.cache.manifest["checksums"]


def test_other_settings_fail_with_the_differences(tiny_clip, dataset_dir, tmp_path):
    pipe = load_pipeline(_pipeline_file(tmp_path, dataset_dir, tiny_clip))
    extract(pipe, tmp_path / "cache")
    changed = load_pipeline(pipe.path, ["split.seed=5", "features.min_df=2"])
    with pytest.raises(CacheMismatch, match=r"text\.min_df: cache has 1, asked for 2") as err:
        extract(changed, tmp_path / "cache")
    assert "split" not in str(err.value)          # the split never forces a re-extraction
    redone = extract(changed, tmp_path / "cache", overwrite=True)
    assert redone.cache.manifest["split"]["seed"] == 5 and not redone.resumed


def test_a_changed_split_is_drawn_over_the_stored_features(tiny_clip, dataset_dir, tmp_path, monkeypatch):
    """Splits are cheap: after extraction, a new [split] is drawn over the cache without embedding again."""
    from cfrh.cache import open_pipeline_cache
    from cfrh.splits import make_splits

    pipe = load_pipeline(_pipeline_file(tmp_path, dataset_dir, tiny_clip))
    first = extract(pipe, tmp_path / "cache").cache
    before = {p: p.stat().st_mtime_ns for p in Path(first.path).rglob("*")}
    monkeypatch.setattr("cfrh.features.image.load_clip", lambda *a, **k: pytest.fail("embedded again"))
    changed = load_pipeline(pipe.path, ["split.seed=5", "split.query=6"])
    result = extract(changed, tmp_path / "cache")
    assert result.already_complete and result.counts["query"] == 6
    cache = open_pipeline_cache(changed, tmp_path / "cache")
    labels = cache.read("labels")
    want = make_splits(cache.n_items, changed.split, labels=labels)
    for part in ("query", "train", "database"):
        np.testing.assert_array_equal(cache.split(part), want[part])
    assert len(cache.split("query")) == 6 and cache.split_settings["seed"] == 5
    np.testing.assert_array_equal(open_pipeline_cache(pipe, tmp_path / "cache").split("query"), first.split("query"))
    assert {p: p.stat().st_mtime_ns for p in Path(first.path).rglob("*")} == before    # nothing written
    with pytest.raises(CacheError, match=r"\[split\] query = 500 must be between 1 and 21 for 22 items"):
        open_pipeline_cache(load_pipeline(pipe.path, ["split.query=500"]), tmp_path / "cache")


def test_an_impossible_split_fails_before_any_image_is_embedded(tiny_clip, dataset_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("cfrh.features.image.load_clip", lambda *a, **k: pytest.fail("embedded"))
    for override, message in (("split.query=5000", "query = 5000 must be between 1 and 22 for 23 items"),
                              ("split.querry=5", "['querry'] not understood")):
        with pytest.raises(ExtractError, match=re.escape(message)):
            extract(load_pipeline(_pipeline_file(tmp_path, dataset_dir, tiny_clip), [override]), tmp_path / "c")
        assert not (tmp_path / "c").exists()


def test_cache_root_may_be_an_fsspec_url(tiny_clip, dataset_dir, tmp_path):
    pipe = load_pipeline(_pipeline_file(tmp_path, dataset_dir, tiny_clip))
    root = f"memory://cfrh-tests/{tmp_path.name}"
    local = extract(pipe, tmp_path / "cache")
    shared = extract(pipe, root)
    assert shared.cache.url.startswith("memory://") and shared.cache.verify() == []
    assert shared.cache.manifest["checksums"] == local.cache.manifest["checksums"]
    assert extract(pipe, root).already_complete


def test_pipeline_and_dataset_must_agree_on_image_features(tiny_clip, dataset_dir, tmp_path):
    pipe = load_pipeline(_pipeline_file(tmp_path, dataset_dir, tiny_clip), ["features.image_model='precomputed'"])
    with pytest.raises(ExtractError, match="must name a CLIP model"):
        extract(pipe, tmp_path / "cache")
    with pytest.raises(ExtractError, match="unknown \\[features\\] keys"):
        extract(load_pipeline(pipe.path, ["features.batchsize=3"]), tmp_path / "cache")


def test_model_paths_resolve_like_other_pipeline_paths(tmp_path, monkeypatch):
    pipe = load_pipeline("demo")
    monkeypatch.chdir(tmp_path)
    assert model_location(pipe, "openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"  # a hub id
    # a packaged pipeline's paths: the working directory, like every other path in it
    assert model_location(pipe, "../shared/models/x") == str((tmp_path / "../shared/models/x").resolve())
    assert model_location(pipe, "./m", from_pipeline=False) == str(tmp_path / "m")  # --model: the cwd
    assert model_location(pipe, "precomputed") == "precomputed"


@pytest.mark.slow
def test_worker_processes_give_the_same_features(tiny_clip, dataset_dir, tmp_path):
    pipe = load_pipeline(_pipeline_file(tmp_path, dataset_dir, tiny_clip))
    inline = extract(pipe, tmp_path / "inline")
    spawned = extract(pipe, tmp_path / "spawned", workers=2)
    assert spawned.found["image"]["workers"] == 2
    np.testing.assert_array_equal(inline.cache.read("image"), spawned.cache.read("image"))
    assert spawned.dropped == inline.dropped


def test_cli_extract_ls_info_verify(tiny_clip, dataset_dir, tmp_path):
    toml = _pipeline_file(tmp_path, dataset_dir, tiny_clip)
    runner = CliRunner()
    cache_root = str(tmp_path / "cache")
    res = runner.invoke(cli, ["extract", str(toml), "--cache", cache_root, "--batch-size", "5"])
    assert res.exit_code == 0, res.output
    assert "items" in res.output and f"{N_GOOD}" in res.output and "image decode failed" in res.output

    res = runner.invoke(cli, ["cache", "ls", "--cache", cache_root])
    assert res.exit_code == 0 and "synthetic" in res.output and "yes" in res.output

    res = runner.invoke(cli, ["cache", "info", str(toml), "--cache", cache_root, "--set", "features.image_model="
                              f"'{tiny_clip}'"])
    assert res.exit_code == 0, res.output
    assert "tiny-clip @ sha256:" in res.output and "fp32" in res.output
    group = tmp_path / "cache" / "synthetic" / feature_key(str(tiny_clip))
    res = runner.invoke(cli, ["cache", "info", str(group), "--json"])
    assert json.loads(res.output)["found"]["counts"]["items"] == N_GOOD

    res = runner.invoke(cli, ["cache", "verify", "--cache", cache_root])
    assert res.exit_code == 0 and "ok" in res.output

    cache = FeatureCache.open(cache_root, "synthetic", group.name, mode="r+")
    row = cache.group["image"][3]
    cache.group["image"][3] = -row
    res = runner.invoke(cli, ["cache", "verify", "--cache", cache_root])
    assert res.exit_code == 1
    assert "image: block 0 (rows 0–" in res.output and "differ from the digest" in res.output

    res = runner.invoke(cli, ["extract", str(toml), "--cache", cache_root, "--set", "features.min_df=3"])
    assert isinstance(res.exception, CacheMismatch) and "text.min_df" in str(res.exception)


def test_coco_mini_end_to_end(tiny_clip, coco_mini_dir, tmp_path):
    pipe = load_pipeline("coco", [f"dataset.root='{coco_mini_dir}'", f"features.image_model='{tiny_clip}'",
                                  "split.query=20", "split.train=60", "features.workers=0",
                                  "features.batch_size=16"])
    load_all()
    if "coco" not in READERS:
        pytest.skip("the coco reader is not available yet")
    collection = read_dataset("coco", coco_mini_dir)
    result = extract(pipe, tmp_path / "cache")
    cache = result.cache
    n = len(collection)
    assert n == 159 and cache.strings("ids") == collection.ids  # ids in the reader's order
    assert cache.read("image").shape == (n, 16)
    labels = cache.read("labels")
    assert labels.shape == (n, 80) and labels.dtype == np.uint8 and (labels.sum(1) > 0).all()
    assert len(cache.strings("label_names")) == 80
    text = cache.read("text")
    assert text.shape[0] == n and 0 < text.shape[1] <= 2000 and (text.sum(1) > 0).mean() > 0.95
    train_words = set(cache.strings("vocabulary"))
    assert "the" not in train_words and "a" not in train_words  # English stop words
    # the val folder's images that no annotation names are reported, not lost
    assert result.dropped["total"] >= 80 and result.counts["image_failures"] == 0
    assert sum(result.dropped["by_reason"].values()) == result.dropped["total"]
    assert cache.strings("paths")[0].startswith(("train2017/", "val2017/"))


def test_wiki_mat_import(wiki_dir, tmp_path):
    pipe = load_pipeline("wiki", [f"dataset.root='{wiki_dir}'"])
    load_all()
    if "wiki-mat" not in READERS:
        pytest.skip("the wiki-mat reader is not available yet")
    result = extract(pipe, tmp_path / "cache")
    cache = result.cache
    assert cache.url.endswith("/wiki/precomputed")
    assert cache.read("image").shape == (2866, 128) and cache.read("image").dtype == np.float32
    assert cache.read("text").shape == (2866, 10)
    labels = cache.read("labels")
    assert labels.shape == (2866, 10) and (labels.sum(1) == 1).all()
    assert len(cache.split("query")) == 693 and len(cache.split("train")) == 2173
    np.testing.assert_array_equal(cache.split("train"), cache.split("database"))
    assert cache.manifest["request"]["image"]["model"] == "precomputed"
    assert result.found["image"] == {"source": "shipped with the dataset"}


def test_pipeline_decoding_settings_reach_the_cache_and_encoding(tiny_clip, dataset_dir, tmp_path):
    """[features] max_image_pixels / background decide the pixels: recorded in the request, used by encode."""
    pipe = load_pipeline(_pipeline_file(tmp_path, dataset_dir, tiny_clip,
                                        extra='max_image_pixels = 2600\nbackground = "black"'))
    cache = extract(pipe, tmp_path / "cache").cache
    decoding = cache.request["image"]["decoding"]
    assert (decoding["max_image_pixels"], decoding["background"]) == (2600, "#000000")
    # the four images over 2,600 pixels (39 × 68 and larger) are counted drops with that reason
    reasons = cache.manifest["found"]["dropped"]["by_reason"]
    assert sum(n for r, n in reasons.items() if "2600" in r.replace(",", "")) == 4, reasons
    from cfrh.encode import image_encoder

    spec = image_encoder(cache, device="cpu").spec
    assert spec.decoding.describe() == decoding
    assert spec.preprocess == cache.request["image"]["preprocess"] == "fast"   # new images: the cache's pixel rule


def test_a_model_given_at_extraction_is_found_by_the_later_stages(tiny_clip, dataset_dir, tmp_path):
    """`cfrh extract X --model DIR` then `cfrh train X`: the cache is found without repeating the model;
    with caches of two models, the error lists them and --model picks one."""
    from cfrh.cache import open_pipeline_cache

    pipe = load_pipeline(_pipeline_file(tmp_path, dataset_dir, tiny_clip),
                         ["features.image_model='openai/clip-vit-base-patch32'"])   # not what is extracted
    root = tmp_path / "cache"
    first = extract(pipe, root, model=str(tiny_clip)).cache
    assert open_pipeline_cache(pipe, root).url == first.url
    other = make_tiny_clip(tmp_path / "second" / "clip-b", seed=1)
    second = extract(pipe, root, model=str(other)).cache
    with pytest.raises(CacheError, match=rf"several models \(({first.key}, {second.key}|{second.key}, "
                                         rf"{first.key})\); choose one with --model"):
        open_pipeline_cache(pipe, root)
    assert open_pipeline_cache(pipe, root, model=str(other)).url == second.url
    assert open_pipeline_cache(pipe, root, model=str(tiny_clip)).url == first.url
