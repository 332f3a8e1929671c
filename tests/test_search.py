"""`cfrh encode` / `cfrh search` on a small cache built here (tiny random CLIP, real extract and train),
and on the real WIKI release (precomputed features: search by id only)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cfrh.cache import open_pipeline_cache
from cfrh.cli import cli
from cfrh.codes import hamming_distances
from cfrh.config import load_pipeline
from cfrh.encode import CodeEncoder, EncodeError
from cfrh.extraction import extract
from cfrh.runs import RunError, RunStore, open_run
from cfrh.training import train
from clip_fixtures import make_tiny_clip

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
WORDS = ["sky", "sea", "dog", "cat", "tree", "car"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 48-item folder dataset extracted with a tiny CLIP and trained at 16 and 32 bits."""
    base = tmp_path_factory.mktemp("search")
    model = make_tiny_clip(base / "tiny-clip")
    root = base / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(48):
        colour = list(COLOURS)[i % 3]
        pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.png")
        tags = f"{colour} " + " ".join(rng.choice(WORDS, 2, replace=False))
        lines.append(json.dumps({"image": f"images/{i:03d}.png", "tags": tags, "labels": colour}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    toml = base / "searchtest.toml"
    toml.write_text(f"""name = "searchtest"
[dataset]
reader = "folder"
root = "{root}"
[features]
image_model = "{model}"
batch_size = 8
workers = 0
block_rows = 16
[split]
method = "random"
query = 6
train = "all"
seed = 0
[train]
bits = [16, 32]
epochs = 2
batch_size = 8
image_hidden = [32]
text_hidden = [32]
threads = 1
""")
    cache_root, runs_root = str(base / "cache"), str(base / "runs")
    pipe = load_pipeline(toml)
    extract(pipe, cache_root)
    train(pipe, cache_root, runs_root=runs_root)
    cache = open_pipeline_cache(pipe, cache_root)
    return {"toml": str(toml), "cache": cache_root, "runs": runs_root, "root": root, "base": base, "pipe": pipe,
            "cache_obj": cache, "store": open_run(runs_root, cache, "cfrh")}


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def stored(built, bits: int, modality: str) -> np.ndarray:
    """The codes the training run wrote for every cache row."""
    return built["store"].read_codes(bits, modality)


def brute(query: np.ndarray, cache, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and distances of the k nearest database items, ties by row (= database position)."""
    rows = cache.split("database")
    dist = hamming_distances(query, codes[rows])[0]
    order = np.argsort(dist, kind="stable")[:k]
    return rows[order], dist[order]


def test_encode_texts_reproduces_the_training_codes(built, tmp_path):
    cache = built["cache_obj"]
    texts = cache.strings("texts")
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "codes.npy"
    res = invoke("encode", built["toml"], "--cache", built["cache"], "--runs", built["runs"], "--bits", 16, "--text-file",
                 tmp_path / "texts.txt", "--out", out)
    assert res.exit_code == 0, res.output
    codes = np.load(out)
    assert codes.shape == (48, 2) and codes.dtype == np.uint8
    np.testing.assert_array_equal(codes, stored(built, 16, "text"))


def test_encode_image_folder_reproduces_codes_and_skips_broken_files(built, tmp_path):
    cache = built["cache_obj"]
    folder = tmp_path / "photos"
    shutil.copytree(built["root"] / "images", folder / "nested")
    (folder / "broken.jpg").write_bytes(b"\x00 not an image")
    (folder / "notes.txt").write_text("not an image suffix, not picked up from a folder")
    out = tmp_path / "codes.json"
    res = invoke("encode", built["toml"], "--cache", built["cache"], "--runs", built["runs"], "--bits", 32, "--images", folder, "--out", out)
    assert res.exit_code == 0, res.output
    assert "skipped 1 of 49 images" in res.output and "broken.jpg" in res.output
    doc = json.loads(out.read_text())
    assert doc["bits"] == 32 and doc["modality"] == "image" and len(doc["items"]) == 48
    assert doc["skipped"][0]["input"].endswith("broken.jpg")
    assert doc["skipped"][0]["reason"].startswith("image decode failed")
    image_codes = stored(built, 32, "image")
    row_of = {Path(p).name: i for i, p in enumerate(cache.strings("paths"))}
    for item in doc["items"]:
        assert item["code"] == image_codes[row_of[Path(item["input"]).name]].tobytes().hex()


def test_search_text_query_equals_brute_force(built):
    cache = built["cache_obj"]
    res = invoke("search", built["toml"], "--cache", built["cache"], "--runs", built["runs"], "--bits", 32, "--text", "red dog",
                 "--k", 7, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["target"] == "image" and len(doc["results"]) == 7
    query = CodeEncoder(cache, built["store"], 32).encode_texts(["red dog"]).codes
    assert doc["query"]["code"] == query[0].tobytes().hex()
    rows, dist = brute(query, cache, stored(built, 32, "image"), 7)
    assert [r["row"] for r in doc["results"]] == rows.tolist()
    assert [r["distance"] for r in doc["results"]] == dist.tolist()
    assert [r["rank"] for r in doc["results"]] == list(range(1, 8))
    ids, paths = cache.read("ids"), cache.read("paths")
    assert [r["id"] for r in doc["results"]] == [str(ids[r]) for r in rows]
    assert [r["path"] for r in doc["results"]] == [str(paths[r]) for r in rows]


def test_search_image_query_finds_texts(built):
    cache = built["cache_obj"]
    image = built["root"] / "images" / "004.png"
    res = invoke("search", built["toml"], "--cache", built["cache"], "--runs", built["runs"], "--bits", 32, "--image", image,
                 "--k", 5, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["target"] == "text"
    row = cache.strings("paths").index("images/004.png")
    query = stored(built, 32, "image")[np.array([row])]  # the image is in the cache: same code
    assert doc["query"]["code"] == query[0].tobytes().hex()
    rows, dist = brute(query, cache, stored(built, 32, "text"), 5)
    assert [r["row"] for r in doc["results"]] == rows.tolist()
    assert [r["text"] for r in doc["results"]] == [cache.strings("texts")[r] for r in rows]


def test_search_by_query_id_and_table_output(built):
    cache = built["cache_obj"]
    qrow = int(cache.split("query")[0])
    qid = cache.strings("ids")[qrow]
    res = invoke("search", built["toml"], "--cache", built["cache"], "--runs", built["runs"], "--bits", 16, "--query-id", qid,
                 "--query-modality", "text", "--k", 3)
    assert res.exit_code == 0, res.output
    rows, dist = brute(stored(built, 16, "text")[np.array([qrow])], cache,
                       stored(built, 16, "image"), 3)
    assert "image path" in res.output and "distance" in res.output
    for rank, (r, d) in enumerate(zip(rows, dist), 1):
        line = next(line for line in res.output.splitlines() if cache.strings("ids")[r] in line
                    and line.strip("│ ").startswith(str(rank)))
        assert line.rstrip(" │").endswith(str(d))


@pytest.mark.parametrize("args, error, match", [
    (["--query-id", "nope", "--bits", 16], EncodeError, "no item with id 'nope'"),
    (["--text", "zebra giraffe", "--bits", 16], EncodeError, "no word of 'zebra giraffe'"),
    (["--text", "red", "--bits", 64], RunError, "cfrh train searchtest --bits 64"),
    (["--query-id", "images/000.png", "--bits", 64], RunError, "has no complete 64-bit codes"),
    (["--text", "red", "--run", "other"], RunError, "no training run 'other' for this cache (runs here: cfrh)"),
    (["--query-id", "images/000.png", "--run", "other"], RunError, "no training run 'other'"),
])
def test_search_errors_are_one_line_cfrh_errors(built, args, error, match):
    res = invoke("search", built["toml"], "--cache", built["cache"], "--runs", built["runs"], *args)
    assert isinstance(res.exception, error) and match in str(res.exception)
    assert "\n" not in str(res.exception)


def test_usage_errors(built, tmp_path):
    res = invoke("search", built["toml"], "--cache", built["cache"], "--runs", built["runs"], "--text", "red", "--query-id", "x")
    assert res.exit_code == 2 and "exactly one query" in res.output
    res = invoke("encode", built["toml"], "--cache", built["cache"], "--runs", built["runs"], "--texts", "red", "--images",
                 built["root"] / "images")
    assert res.exit_code == 2 and "one modality per call" in res.output
    res = invoke("encode", built["toml"], "--cache", built["cache"], "--runs", built["runs"], "--bits", 16, "--texts", "red",
                 "--out", tmp_path / "codes.txt")
    assert res.exit_code == 2 and ".npy or .json" in res.output
    # positional inputs after the flag belong to its modality
    res = invoke("encode", built["toml"], "--cache", built["cache"], "--runs", built["runs"], "--bits", 16, "--texts", "red dog", "blue sea",
                 "zebra", "--out", tmp_path / "t.json")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "t.json").read_text())
    assert [i["input"] for i in doc["items"]] == ["red dog", "blue sea", "zebra"]
    assert "1 of 3 texts have no word of the vocabulary" in res.output


def test_another_image_model_is_refused(built, tmp_path):
    other = make_tiny_clip(tmp_path / "other-clip", seed=1)
    res = invoke("encode", built["toml"], "--cache", built["cache"], "--runs", built["runs"], "--bits", 16, "--model-dir", other,
                 "--images", built["root"] / "images" / "000.png")
    assert isinstance(res.exception, EncodeError)
    assert "not the image model" in str(res.exception) and "revision" in str(res.exception)


def test_precomputed_cache_searches_by_id_only(wiki_dir, tmp_path):
    cache_root = str(tmp_path / "cache")
    pipe = load_pipeline("wiki", [f"dataset.root='{wiki_dir}'", "train.bits=[16]", "train.epochs=1",
                                  "train.image_hidden=[64]", "train.text_hidden=[64]"])
    extract(pipe, cache_root)
    train(pipe, cache_root)                      # into the default runs root ($CFRH_RUNS, this test's own)
    cache = open_pipeline_cache(pipe, cache_root)
    codes = RunStore.of(None, cache, "cfrh")
    sets = [f"--set=dataset.root='{wiki_dir}'"]
    res = invoke("encode", "wiki", "--cache", cache_root, *sets, "--bits", 16, "--texts", "a church")
    assert isinstance(res.exception, EncodeError) and "shipped precomputed" in str(res.exception)
    res = invoke("search", "wiki", "--cache", cache_root, *sets, "--bits", 16, "--text", "a church")
    assert isinstance(res.exception, EncodeError) and "--query-id" in str(res.exception)
    qrow = int(cache.split("query")[0])
    res = invoke("search", "wiki", "--cache", cache_root, *sets, "--bits", 16, "--k", 10, "--json",
                 "--query-id", cache.strings("ids")[qrow])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    rows, dist = brute(codes.read_codes(16, "image")[[qrow]], cache, codes.read_codes(16, "text"), 10)
    assert [r["row"] for r in doc["results"]] == rows.tolist()
    assert [r["distance"] for r in doc["results"]] == dist.tolist()
    assert len(cache.split("database")) == 2173
