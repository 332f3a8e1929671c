"""Training from the cache: batches, determinism, resume equivalence, emitted codes, CLI, and real WIKI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cfrh.estimator as estimator_mod
import cfrh.training as train_mod
from cfrh.cache import FeatureCache
from cfrh.cli import cli
from cfrh.config import ConfigError, Pipeline, load_pipeline
from cfrh.data import PairBatches
from cfrh.estimator import CFRH
from cfrh.runs import RunStore
from cfrh.training import RunMismatch, TrainConfig, TrainError, train

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


def run_store(root, cache: FeatureCache, run: str = "cfrh") -> RunStore:
    return RunStore.of(root / "runs", cache, run)


def codes(cache: FeatureCache, run: str, bits: int, root=None) -> tuple[np.ndarray, np.ndarray]:
    store = run_store(root or cache_root_of(cache), cache, run)
    return store.read_codes(bits, "image", cache.n_items), store.read_codes(bits, "text", cache.n_items)


def cache_root_of(cache: FeatureCache):
    from pathlib import Path

    return Path(cache.url).parent.parent


def fit(pipe: Pipeline, root, **kwargs):
    """Train with the runs next to the cache root (root/runs), as the tests' caches live in root."""
    return train(pipe, root, runs_root=root / "runs", **kwargs)


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


def test_joint_anchors_are_seeded_training_rows_prepared_as_a_batch(tmp_path):
    from cfrh.model import CFRHModel, FeatureStats
    from cfrh.trainers import trainer_for

    cache = make_cache(tmp_path)
    rows = cache.split("train")
    drawn = {}
    for seed in (0, 1):
        for in_memory_mb in (2048, 0):
            trainer = trainer_for(TrainConfig.from_dict({**SMALL, "seed": seed, "joint_anchors": 40}))
            data = PairBatches(cache, rows, 32, seed=seed, in_memory_mb=in_memory_mb)
            model = CFRHModel(trainer.spec(data.image_dim, data.text_dim, 8))
            model.set_feature_stats(FeatureStats.of(cache.read("image", rows)),
                                    FeatureStats.of(cache.read("text", rows)))
            trainer.begin(data, model)
            image, text = trainer.anchors
            assert image.shape == (40, 16) and text.shape == (40, 20)
            # which training row each anchor is: its prepared text matches exactly one prepared training text
            raw_t = cache.read("text", rows).astype(np.float32)
            prepared = model.prepare_text(torch.from_numpy(raw_t)).numpy()
            picked = [int(np.flatnonzero(np.all(np.isclose(prepared, a, atol=1e-6), axis=1))[0]) for a in text.numpy()]
            assert len(set(picked)) == 40 and picked == sorted(picked)     # 40 distinct training rows, in order
            np.testing.assert_allclose(image.numpy(), model.prepare_image(
                torch.from_numpy(cache.read("image", rows[picked]).astype(np.float32))).numpy(), atol=1e-6)
            drawn[seed, in_memory_mb] = picked
    assert drawn[0, 2048] == drawn[0, 0] and drawn[1, 2048] == drawn[1, 0]   # streamed or in memory: the same
    assert drawn[0, 2048] != drawn[1, 2048]                                   # another seed, other anchors
    no_anchors = trainer_for(TrainConfig.from_dict(SMALL))
    no_anchors.begin(PairBatches(cache, rows, 32), model)
    assert no_anchors.anchors is None
    with pytest.raises(ConfigError, match="joint_anchors must be 0 or more"):
        TrainConfig.from_dict({"joint_anchors": -1})


# -- training -------------------------------------------------------------------------------------------
def test_train_writes_packed_codes_for_every_item(tmp_path):
    cache = make_cache(tmp_path)
    summary = fit(pipeline(), tmp_path)
    assert set(summary["bits"]) == {"8", "16"} and summary["train_rows"] == 250 and not summary["streamed"]
    image, text = cache.read("image"), cache.read("text")
    store = run_store(tmp_path, cache)
    assert store.url == str(tmp_path / "runs" / "toy" / "precomputed" / "cfrh")
    attrs = store.info()
    assert attrs["cache"]["fingerprint"] == cache.fingerprint and attrs["cache"]["url"] == cache.url
    for bits in (8, 16):
        ic, tc = codes(cache, "cfrh", bits)
        assert ic.shape == tc.shape == (300, bits // 8) and ic.dtype == tc.dtype == np.uint8
        model = CFRH.load(store.model_dir(bits))
        np.testing.assert_array_equal(ic, model.hash_image(image))
        np.testing.assert_array_equal(tc, model.hash_text(text))
        s = summary["bits"][str(bits)]
        assert s["epochs"] == 3 and s["image_codes"] == store.url_of(f"{bits}/image_codes.npy") and not s["skipped"]
        assert set(s["loss"]) >= {"intra", "cross", "recon", "pair", "total"}
        history = attrs["history"][str(bits)]
        assert [h["epoch"] for h in history] == [1, 2, 3] and attrs["complete"][str(bits)] is True
        # 3 epochs of 7 batches (250 rows, batch 32): α over 50 stages of the 21 steps, the last at stage
        # 50·20 // 21 = 47, α = √48 (counted in epochs it would end at √3)
        assert history[2]["alpha"] == pytest.approx(48 ** 0.5)
        assert not store.exists(f"{bits}/checkpoint.safetensors")
        description = json.loads(store.read_bytes(f"{bits}/model.json"))
        assert description["spec"]["bits"] == bits and description["train_config"]["epochs"] == 3
    assert attrs["bits"] == [8, 16] and attrs["config"]["batch_size"] == 32
    # Nothing was written into the cache.
    assert sorted(cache.data_arrays()) == sorted(cache.manifest["checksums"])
    # The codes are not trivial: both modalities use both signs of every bit somewhere.
    ic, tc = codes(cache, "cfrh", 16)
    assert 0 < np.unpackbits(ic, axis=1).mean() < 1 and 0 < np.unpackbits(tc, axis=1).mean() < 1


def test_same_seed_same_codes(tmp_path):
    cache = make_cache(tmp_path)
    fit(pipeline(), tmp_path, bits=[16], run="a")
    fit(pipeline(), tmp_path, bits=[16], run="b")
    fit(pipeline(seed=1), tmp_path, bits=[16], run="c")
    for x, y in zip(codes(cache, "a", 16), codes(cache, "b", 16)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(codes(cache, "a", 16)[0], codes(cache, "c", 16)[0])


def test_interrupted_run_resumes_to_the_same_codes(tmp_path, monkeypatch):
    cache = make_cache(tmp_path)
    settings = {"epochs": 4, "optimizer": "sgd", "lr_schedule": "cosine"}   # momentum + schedule state resumed too
    fit(pipeline(**settings), tmp_path, run="whole")

    real_save, calls = train_mod.save_checkpoint, []

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt        # killed right after the checkpoint of epoch 2 of the 8-bit model
    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        fit(pipeline(**settings), tmp_path, run="cut")
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    cut = run_store(tmp_path, cache, "cut")
    assert cut.exists("8/checkpoint.safetensors")
    assert cut.info()["complete"]["8"] is False

    summary = fit(pipeline(**settings), tmp_path, run="cut")
    assert summary["bits"]["8"]["resumed_from_epoch"] == 2 and summary["bits"]["16"]["resumed_from_epoch"] == 0
    for bits in (8, 16):
        for x, y in zip(codes(cache, "whole", bits), codes(cache, "cut", bits)):
            np.testing.assert_array_equal(x, y)
        strip = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]  # noqa: E731
        attrs = [run_store(tmp_path, cache, r).info()["history"][str(bits)] for r in ("whole", "cut")]
        assert strip(attrs[0]) == strip(attrs[1])


def test_finished_runs_are_kept_or_refused_never_mixed(tmp_path):
    cache = make_cache(tmp_path)
    fit(pipeline(), tmp_path, bits=[8])
    before = codes(cache, "cfrh", 8)[0].copy()
    again = fit(pipeline(threads=2), tmp_path, bits=[8])   # threads do not change results
    assert again["bits"]["8"]["skipped"] is True
    np.testing.assert_array_equal(codes(cache, "cfrh", 8)[0], before)
    with pytest.raises(RunMismatch, match="lr_image: run has 0.001, asked for 0.01.*--no-resume"):
        fit(pipeline(lr_image=0.01), tmp_path, bits=[8])
    redo = fit(pipeline(lr_image=0.01), tmp_path, bits=[8], resume=False)
    assert redo["bits"]["8"]["skipped"] is False
    assert json.loads(run_store(tmp_path, cache).read_bytes("8/model.json"))["train_config"]["lr_image"] == 0.01


def test_streamed_training_and_bad_requests(tmp_path):
    cache = make_cache(tmp_path, chunk_rows=40)
    summary = fit(pipeline(in_memory_mb=0, bits=[8], epochs=2), tmp_path)
    assert summary["streamed"] and codes(cache, "cfrh", 8)[0].shape == (300, 1)
    with pytest.raises(TrainError, match="run name"):
        fit(pipeline(), tmp_path, run="../x")
    with pytest.raises(TrainError, match="fewer than train.batch_size"):
        fit(pipeline(batch_size=512), tmp_path)


def test_cli_train(tmp_path):
    make_cache(tmp_path)
    toml = tmp_path / "toy.toml"
    toml.write_text('[dataset]\nreader = "folder"\n\n[train]\n' +
                    "\n".join(f"{k} = {json.dumps(v)}" for k, v in SMALL.items()) + "\n")
    runner = CliRunner()
    result = runner.invoke(cli, ["train", str(toml), "--cache", str(tmp_path), "--bits", "8", "--epochs", "2",
                                 "--run", "cli", "--quiet", "--runs", str(tmp_path / "mine")])
    assert result.exit_code == 0, result.output
    assert "run cli" in result.output and (tmp_path / "mine/toy/precomputed/cli/8/text_codes.npy").is_file()
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
    monkeypatch.setattr(estimator_mod, "available_threads", lambda: 4)
    for load, expected in ((0.0, 4), (1.2, 3), (2.6, 1), (9.0, 1)):
        monkeypatch.setattr(estimator_mod.os, "getloadavg", lambda load=load: (load, load, load))
        assert estimator_mod.auto_threads() == expected


def test_streamed_feature_stats_equal_the_in_memory_ones(tmp_path):
    """What preparation learns from a training split read block by block (a split too large for memory) is what
    it learns from the split read whole: the same non-zero counts, the same mean, in any block size."""
    from cfrh.data import feature_stats
    from cfrh.model import FeatureStats

    cache = make_cache(tmp_path)
    rows = cache.split("train")[::3]
    for name in ("image", "text"):
        whole = FeatureStats.of(cache.read(name, rows).astype(np.float32))
        for block_rows in (7, 64, 16384):
            streamed = feature_stats(cache, name, rows, block_rows=block_rows)
            assert streamed.rows == whole.rows == len(rows)
            np.testing.assert_array_equal(streamed.nonzero, whole.nonzero)
            np.testing.assert_allclose(streamed.mean, whole.mean, rtol=1e-6, atol=1e-6)
    assert (whole.nonzero < len(rows)).any() and (whole.nonzero > 0).any()   # text: some columns sparse
