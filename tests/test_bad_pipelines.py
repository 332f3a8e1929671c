"""Bad pipeline settings fail before the expensive pass, in one line, and a user's collection gets a working
pipeline in one command (`cfrh init`)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cfrh.cli import cli
from cfrh.config import load_pipeline
from cfrh.extraction import ExtractError, check_pipeline, extract
from clip_fixtures import make_tiny_clip
from fixtures import write_jpeg


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def collection(tmp_path) -> Path:
    """A user's folder: columns named unlike the defaults (file, description, category), ids in `key`."""
    root = tmp_path / "holiday photos"
    rows = []
    for i in range(60):
        write_jpeg(root / "pics" / f"{i:03d}.jpg", seed=i, size=16)
        rows.append(f"{i},pics/{i:03d}.jpg,a {('red', 'green', 'blue')[i % 3]} boat near the sea number {i},"
                    f"{'abc'[i % 3]}\n")
    (root / "meta.csv").write_text("key,file,description,category\n" + "".join(rows))
    return root


def run_main(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """``cfrh ARGS`` through the real entry point (its error handling included): (exit code, stdout, stderr)."""
    from cfrh.cli import main

    monkeypatch.setattr("sys.argv", ["cfrh", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "1000")     # one long line stays one line
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def pipeline_file(tmp_path: Path, root: Path, model: Path, **sections: str) -> Path:
    text = {"dataset": f'reader = "folder"\nroot = "{root}"\nannotations = "meta.csv"\nimage_field = "file"\n'
                       f'text_field = "description"',
            "features": f'image_model = "{model}"\nbatch_size = 8', "split": "query = 6"}
    text.update(sections)
    path = tmp_path / "mine.toml"
    path.write_text("".join(f"[{k}]\n{v}\n" for k, v in text.items()))
    return path


@pytest.mark.parametrize("section, body, message", [
    ("dataset", 'reader = "folder"\nroot = "x"\nannotation = "meta.csv"',
     "[dataset] ['annotation'] not understood by reader 'folder'; it takes reader, root, annotations, image_field"),
    ("split", "querry = 5", "[split] ['querry'] not understood with method 'random'"),
    ("train", "lr_image = nan", "train.lr_image = nan should be a float"),
    ("train", "epoch = 3", "unknown train settings ['epoch']"),
    ("evaluate", 'map_k_rule = "mean"', "map_k_rule"),
    ("features", "batch = 3", "unknown [features] keys ['batch']"),
])
def test_every_section_is_checked_before_any_image_is_embedded(tmp_path, collection, tiny_clip, monkeypatch, capsys,
                                                               section, body, message):
    monkeypatch.setattr("cfrh.features.image.load_clip", lambda *a, **k: pytest.fail("embedded"))
    path = pipeline_file(tmp_path, collection, tiny_clip, **{section: body})
    with pytest.raises(Exception, match=None) as err:
        extract(load_pipeline(path), tmp_path / "cache")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists()
    # the command line says the same in one line, brackets and all (not eaten as markup), with no traceback
    code, _, err_text = run_main(capsys, monkeypatch, "extract", path, "--cache", tmp_path / "cache")
    assert code == 2 and err_text.count("\n") == 1 and message in " ".join(err_text.split())


def test_a_valid_pipeline_passes_the_check(tmp_path, collection, tiny_clip):
    feats = check_pipeline(load_pipeline(pipeline_file(tmp_path, collection, tiny_clip)))
    assert feats["batch_size"] == 8


def test_impossible_split_on_the_collection_fails_before_embedding(tmp_path, collection, tiny_clip, monkeypatch):
    monkeypatch.setattr("cfrh.features.image.load_clip", lambda *a, **k: pytest.fail("embedded"))
    path = pipeline_file(tmp_path, collection, tiny_clip, split="query = 5000")
    with pytest.raises(ExtractError, match=r"\[split\]: query = 5000 must be between 1 and 59 for 60 items"):
        extract(load_pipeline(path), tmp_path / "cache")


def test_search_refuses_a_code_length_train_would_refuse(tmp_path):
    out = CliRunner().invoke(cli, ["search", "wiki", "--bits", "12", "--query-id", "x"])
    assert out.exit_code == 2 and "multiples of 8" in out.output


def test_init_writes_a_pipeline_that_runs_and_leaves_the_folder_alone(tmp_path, collection, tiny_clip, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(collection)
    runner = CliRunner()
    out = runner.invoke(cli, ["init", str(collection), "--model", str(tiny_clip)])
    assert out.exit_code == 0, out.output
    pipe = load_pipeline(tmp_path / "holiday-photos.toml")
    assert pipe.dataset == {"reader": "folder", "root": str(collection.resolve()), "annotations": "meta.csv",
                            "image_field": "file", "text_field": "description", "labels_field": "category"}
    assert pipe.split == {"method": "random", "query": 6, "train": "all", "database": "rest", "seed": 0}
    assert pipe.features["image_model"] == str(tiny_clip) and pipe.features["random_init"] is False
    again = runner.invoke(cli, ["init", str(collection), "--model", str(tiny_clip)])
    assert again.exit_code == 2 and "exists; pass --force" in again.output
    for args in (["extract", "holiday-photos.toml"], ["train", "holiday-photos.toml", "--bits", "16", "--epochs", "2",
                                                      "--quiet"],
                 ["evaluate", "holiday-photos.toml", "--json"]):
        res = runner.invoke(cli, args)
        assert res.exit_code == 0, (args, res.output)
    assert json.loads(res.stdout)["protocol"]["n_query"] == 6
    assert snapshot(collection) == before
    assert not (collection / "cache").exists() and (tmp_path / "default-cache" / "holiday-photos").is_dir()  # $CFRH_CACHE


def test_init_refuses_a_folder_without_a_collection(tmp_path, capsys, monkeypatch):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, monkeypatch, "init", tmp_path / "notes", "--model", tmp_path / "no-model")
    assert code == 2 and "no collection cfrh can read here" in err and err.count("\n") == 1
    assert not (tmp_path / "notes.toml").exists()
