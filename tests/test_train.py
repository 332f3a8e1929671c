"""Training from the cache: batches, determinism, resume equivalence, emitted codes, CLI, and real WIKI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import cfrh.training as train_mod
from cfrh.cache import FeatureCache
from cfrh.cli import cli
from cfrh.config import Pipeline, load_pipeline
from cfrh.data import PairBatches
from cfrh.model import load_model
from cfrh.training import RUN_ATTR, TrainConfig, TrainError, train

SMALL = {"bits": [8, 16], "epochs": 3, "batch_size": 32, "image_hidden": [16], "text_hidden": [12],
         "dropout": 0.1, "threads": 1}


def make_cache(root, name: str = "toy", n: int = 300, chunk_rows: int = 64) -> FeatureCache:
    """Four clusters; image column 0 and text column 0 carry the row number (to trace batches)."""
    rng = np.random.default_rng(7)
    label = rng.integers(0, 4, n)
    image = rng.standard_normal((4, 16))[label] + 0.5 * rng.standard_normal((n, 16))
    image[:, 0] = np.arange(n)
    text = rng.poisson(3.0 * (rng.random((4, 20)) < 0.3)[label] + 0.1).astype(np.uint8)
    text[:, 0] = np.arange(n) % 251
    cache, _ = FeatureCache.create(root, name, "precomputed", request={"test": name})
    cache.write("image", image.astype(np.float32), chunk_rows=chunk_rows)
    cache.write("text", text, chunk_rows=chunk_rows)
    cache.write("labels", np.eye(4, dtype=np.uint8)[label])
    cache.write("ids", [f"i{i}" for i in range(n)])
    cache.write("splits/query", np.arange(50))
    cache.write("splits/train", np.arange(50, n))
    cache.write("splits/database", np.arange(50, n))
    cache.finalize()
    return FeatureCache.open(root, name, "precomputed")


def pipeline(name: str = "toy", **train_settings) -> Pipeline:
    return Pipeline(name=name, path=None, dataset={"reader": "folder"}, train={**SMALL, **train_settings})


def codes(cache: FeatureCache, run: str, bits: int) -> tuple[np.ndarray, np.ndarray]:
    g = cache.group
    return g[f"runs/{run}/{bits}/image_codes"][...], g[f"runs/{run}/{bits}/text_codes"][...]


# -- batches ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_memory_mb", [2048, 0])
def test_batches_visit_every_training_row_once_in_a_seeded_order(tmp_path, in_memory_mb):
    cache = make_cache(tmp_path)
    rows = cache.split("train")
    data = PairBatches(cache, rows, 32, seed=3, in_memory_mb=in_memory_mb, window_blocks=2, drop_last=False)
    assert data.in_memory == (in_memory_mb > 0) and len(data) == 8
    batches = list(data.epoch(0))
    assert [b[0].shape[0] for b in batches] == [32] * 7 + [26]
    seen = np.concatenate([b[0][:, 0].numpy() for b in batches]).astype(int)
    np.testing.assert_array_equal(np.sort(seen), rows)                        # every row exactly once
    np.testing.assert_array_equal(np.concatenate([b[1][:, 0].numpy() for b in batches]), seen % 251)  # pairs kept
    again = PairBatches(cache, rows, 32, seed=3, in_memory_mb=in_memory_mb, window_blocks=2, drop_last=False)
    np.testing.assert_array_equal(np.concatenate([b[0][:, 0].numpy() for b in again.epoch(0)]), seen)
    other = np.concatenate([b[0][:, 0].numpy() for b in data.epoch(1)])
    assert not np.array_equal(other, seen)
    full = PairBatches(cache, rows, 32, seed=3, in_memory_mb=in_memory_mb, drop_last=True)
    assert len(full) == 7 and all(b[0].shape[0] == 32 for b in full.epoch(0))


def test_streaming_reads_storage_blocks_together(tmp_path):
    cache = make_cache(tmp_path, n=600, chunk_rows=100)
    data = PairBatches(cache, cache.split("train"), 25, seed=0, in_memory_mb=0, window_blocks=1)
    first = next(iter(data.epoch(0)))[0][:, 0].numpy().astype(int)
    assert len(set(first // 100)) == 1     # one window = one chunk: the first batch comes from a single chunk


# -- training -------------------------------------------------------------------------------------------
def test_train_writes_packed_codes_for_every_item(tmp_path):
    cache = make_cache(tmp_path)
    summary = train(pipeline(), tmp_path, progress=False)
    assert set(summary["bits"]) == {"8", "16"} and summary["train_rows"] == 250 and not summary["streamed"]
    image, text = cache.read("image"), cache.read("text")
    attrs = cache.run_group("cfrh").attrs[RUN_ATTR]
    for bits in (8, 16):
        ic, tc = codes(cache, "cfrh", bits)
        assert ic.shape == tc.shape == (300, bits // 8) and ic.dtype == tc.dtype == np.uint8
        model = load_model(cache, "cfrh", bits)
        np.testing.assert_array_equal(ic, model.hash_image(image))
        np.testing.assert_array_equal(tc, model.hash_text(text))
        s = summary["bits"][str(bits)]
        assert s["epochs"] == 3 and s["image_codes"] == f"runs/cfrh/{bits}/image_codes" and not s["skipped"]
        assert set(s["loss"]) >= {"intra", "cross", "recon", "pair", "total"}
        history = attrs["history"][str(bits)]
        assert [h["epoch"] for h in history] == [1, 2, 3] and attrs["complete"][str(bits)] is True
        assert history[2]["alpha"] == pytest.approx(3 ** 0.5)
        assert not cache.file_exists(f"runs/cfrh/{bits}/checkpoint.safetensors")
        description = json.loads(cache.read_bytes(f"runs/cfrh/{bits}/model.json"))
        assert description["spec"]["bits"] == bits and description["train_config"]["epochs"] == 3
    assert attrs["bits"] == [8, 16] and attrs["config"]["batch_size"] == 32
    # The codes are not trivial: both modalities use both signs of every bit somewhere.
    ic, tc = codes(cache, "cfrh", 16)
    assert 0 < np.unpackbits(ic, axis=1).mean() < 1 and 0 < np.unpackbits(tc, axis=1).mean() < 1


def test_same_seed_same_codes(tmp_path):
    cache = make_cache(tmp_path)
    train(pipeline(), tmp_path, bits=[16], run="a", progress=False)
    train(pipeline(), tmp_path, bits=[16], run="b", progress=False)
    train(pipeline(seed=1), tmp_path, bits=[16], run="c", progress=False)
    for x, y in zip(codes(cache, "a", 16), codes(cache, "b", 16)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(codes(cache, "a", 16)[0], codes(cache, "c", 16)[0])


def test_interrupted_run_resumes_to_the_same_codes(tmp_path, monkeypatch):
    cache = make_cache(tmp_path)
    settings = {"epochs": 4, "optimizer": "sgd", "lr_schedule": "cosine"}   # momentum + schedule state resumed too
    train(pipeline(**settings), tmp_path, run="whole", progress=False)

    real_save, calls = train_mod.save_checkpoint, []

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt        # killed right after the checkpoint of epoch 2 of the 8-bit model
    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(pipeline(**settings), tmp_path, run="cut", progress=False)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert cache.file_exists("runs/cut/8/checkpoint.safetensors")
    assert cache.run_group("cut").attrs[RUN_ATTR]["complete"]["8"] is False

    summary = train(pipeline(**settings), tmp_path, run="cut", progress=False)
    assert summary["bits"]["8"]["resumed_from_epoch"] == 2 and summary["bits"]["16"]["resumed_from_epoch"] == 0
    for bits in (8, 16):
        for x, y in zip(codes(cache, "whole", bits), codes(cache, "cut", bits)):
            np.testing.assert_array_equal(x, y)
        strip = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
        attrs = [cache.run_group(r).attrs[RUN_ATTR]["history"][str(bits)] for r in ("whole", "cut")]
        assert strip(attrs[0]) == strip(attrs[1])


def test_finished_runs_are_kept_or_refused_never_mixed(tmp_path):
    cache = make_cache(tmp_path)
    train(pipeline(), tmp_path, bits=[8], progress=False)
    before = codes(cache, "cfrh", 8)[0].copy()
    again = train(pipeline(threads=2), tmp_path, bits=[8], progress=False)   # threads do not change results
    assert again["bits"]["8"]["skipped"] is True
    np.testing.assert_array_equal(codes(cache, "cfrh", 8)[0], before)
    with pytest.raises(TrainError, match="lr_image: cache has 0.001, asked for 0.01.*--no-resume"):
        train(pipeline(lr_image=0.01), tmp_path, bits=[8], progress=False)
    redo = train(pipeline(lr_image=0.01), tmp_path, bits=[8], resume=False, progress=False)
    assert redo["bits"]["8"]["skipped"] is False
    assert json.loads(cache.read_bytes("runs/cfrh/8/model.json"))["train_config"]["lr_image"] == 0.01


def test_streamed_training_and_bad_requests(tmp_path):
    cache = make_cache(tmp_path, chunk_rows=40)
    summary = train(pipeline(in_memory_mb=0, bits=[8], epochs=2), tmp_path, progress=False)
    assert summary["streamed"] and codes(cache, "cfrh", 8)[0].shape == (300, 1)
    with pytest.raises(TrainError, match="run name"):
        train(pipeline(), tmp_path, run="../x", progress=False)
    with pytest.raises(TrainError, match="fewer than train.batch_size"):
        train(pipeline(batch_size=512), tmp_path, progress=False)


def test_cli_train(tmp_path):
    make_cache(tmp_path)
    toml = tmp_path / "toy.toml"
    toml.write_text('[dataset]\nreader = "folder"\n\n[train]\n' +
                    "\n".join(f"{k} = {json.dumps(v)}" for k, v in SMALL.items()) + "\n")
    runner = CliRunner()
    result = runner.invoke(cli, ["train", str(toml), "--cache", str(tmp_path), "--bits", "8", "--epochs", "2",
                                 "--run", "cli", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "run cli" in result.output and FeatureCache.open(tmp_path, "toy", "precomputed").has("runs/cli/8/text_codes")
    bad = runner.invoke(cli, ["train", str(toml), "--cache", str(tmp_path), "--bits", "12"])
    assert bad.exit_code == 2 and "multiples of 8" in bad.output


def test_every_pipeline_train_table_is_valid():
    for name in ("wiki", "mirflickr25k", "nuswide", "coco", "demo"):
        config = TrainConfig.from_dict(load_pipeline(name).train, name)
        assert all(b % 8 == 0 for b in config.bits)


# -- real data: WIKI ------------------------------------------------------------------------------------
# The one "trained WIKI codes beat random projection" check lives in tests/test_quality.py (real reader →
# extract → the wiki pipeline's own [train] settings → cfrh.metrics).


def test_auto_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(train_mod, "available_threads", lambda: 4)
    for load, expected in ((0.0, 4), (1.2, 3), (2.6, 1), (9.0, 1)):
        monkeypatch.setattr(train_mod.os, "getloadavg", lambda load=load: (load, load, load))
        assert train_mod.auto_threads() == expected
