"""The field's baselines trained by the one training loop (cfrh.trainers): each method's first optimiser step
checked against the same step written out by hand the way its public code takes it (separate SGD optimisers per
network, the published constants), the loss going down, runs that record their method, resume, settings
sub-tables, and `cfrh evaluate` putting every trained method side by side."""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import cfrh.training as train_mod
from cfrh import CFRH
from cfrh.cache import FeatureCache
from cfrh.cli import cli
from cfrh.config import ConfigError, Pipeline
from cfrh.data import PairBatches
from cfrh.estimator import TrainConfig, make_optimizer
from cfrh.evaluation import evaluate
from cfrh.methods import dgcpn, djsrh, jdsh
from cfrh.model import CFRHModel, FeatureStats
from cfrh.runs import RunStore
from cfrh.trainers import PUBLISHED, trainer_for
from cfrh.training import TrainError, train

BASELINES = ("djsrh", "jdsh", "dgcpn")


def paired(n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-negative features of 3 clusters (like BoVW / BoW), the cluster as the label."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n)
    image = np.abs(rng.standard_normal((3, 12))[label] + 0.3 * rng.standard_normal((n, 12)))
    text = rng.poisson(2.0 * (rng.random((3, 16)) < 0.4)[label] + 0.05)
    return image.astype(np.float32), text.astype(np.float32), label


def small(method: str, **changes) -> dict:
    """A baseline's published settings with small networks and a short run (dropout off: deterministic steps)."""
    return {"threads": 1, "seed": 0, method: {"epochs": 2, "text_hidden": [32], "dropout": 0.0,
                                              **({"image_hidden": [24]} if method == "dgcpn" else {}), **changes}}


# -- the published settings reach the loop --------------------------------------------------------------
def test_each_baseline_trains_with_its_published_settings():
    for method, published in (("djsrh", djsrh.WIKI), ("jdsh", jdsh.MIRFLICKR), ("dgcpn", dgcpn.MIRFLICKR)):
        assert PUBLISHED[method] is published
        trainer = trainer_for(TrainConfig(method=method, epochs=7, batch_size=128, lr_image=1e-3))
        c = trainer.config   # CFRH's [train] keys do not reach a baseline
        assert (c.optimizer, c.lr_image, c.lr_text, c.momentum, c.weight_decay, c.batch_size, c.epochs) == (
            "sgd", published.lr_image, published.lr_text, 0.9, 5e-4, 32, published.epochs)
        assert (c.image_preprocess, c.text_preprocess) == ("none", "none")   # raw features, not centred
        spec = trainer.spec(10, 20, 16)
        assert spec.decoder is False and spec.image_hidden == list(published.image_hidden)
        assert spec.text_hidden == [4096] and spec.dropout == published.dropout
    assert trainer_for(TrainConfig(method="djsrh", djsrh={"epochs": 3, "beta": 0.9})).settings.beta == 0.9
    assert trainer_for(TrainConfig(method="djsrh", djsrh={"epochs": 3})).config.epochs == 3
    assert trainer_for(TrainConfig(method="dgcpn")).alpha(9, 100) == 1.0           # tanh(h), α = 1
    assert trainer_for(TrainConfig(method="jdsh")).alpha(3, 300) == 2.0            # √(epoch + 1)


def test_settings_sub_tables_are_checked():
    with pytest.raises(ConfigError, match="unknown djsrh settings \\['epoch'\\]"):
        CFRH(bits=16, method="djsrh", djsrh={"epoch": 3})
    with pytest.raises(ConfigError, match="train.jdsh.lr_image = 'fast'"):
        CFRH(bits=16, method="jdsh", jdsh={"lr_image": "fast"})
    with pytest.raises(ConfigError, match="train.method = 'ucmfh'; choose one of cfrh, djsrh, jdsh, dgcpn"):
        CFRH(bits=16, method="ucmfh")
    with pytest.raises(ConfigError, match="unknown dgcpn settings \\['bits'\\]"):
        CFRH(bits=16, method="dgcpn", dgcpn={"bits": 32})   # the code length is train.bits


# -- one training step, by hand ---------------------------------------------------------------------------
def _first_batch(est: CFRH, image: np.ndarray, text: np.ndarray):
    data = PairBatches.from_arrays(image, text, est.batch_size, seed=0)
    idx = torch.from_numpy(np.random.default_rng([0, 0]).permutation(len(image))[:est.batch_size])
    return data, data.image[idx], data.text[idx], idx


def _model_and_optimizer(est: CFRH, image: np.ndarray, text: np.ndarray):
    trainer = est.trainer
    torch.manual_seed(0)
    model = CFRHModel(trainer.spec(image.shape[1], text.shape[1], est.bits))
    trainer.init_model(model)
    model.set_feature_stats(FeatureStats.of(image), FeatureStats.of(text))
    return trainer, model, make_optimizer(model, trainer.config)


def _by_hand_sgd(nets: list[torch.nn.Module], settings) -> list[torch.optim.SGD]:
    """The public code's optimisers: one SGD per network (image lr, text lr), momentum .9, weight decay 5e-4."""
    return [torch.optim.SGD(net.parameters(), lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
            for net, lr in zip(nets, (settings.lr_image, settings.lr_text))]


@pytest.mark.parametrize("method", ["djsrh", "jdsh"])
def test_one_step_of_djsrh_and_jdsh_is_the_published_step(method):
    image, text, _ = paired()
    est = CFRH(bits=16, method=method, **small(method))
    trainer, model, optimizer = _model_and_optimizer(est, image, text)
    module, s = (djsrh, trainer.settings) if method == "djsrh" else (jdsh, trainer.settings)
    _, bi, bt, _ = _first_batch(est, image, text)
    by_hand = copy.deepcopy(model)
    opt_i, opt_t = _by_hand_sgd([by_hand.image, by_hand.text], s)
    # their train.py: S from the raw batch features, codes tanh(α h) of the hash networks, one step of each net
    target = module.target(bi, bt, s)
    codes_i = torch.tanh(1.0 * by_hand.image.encoder(bi))
    codes_t = torch.tanh(1.0 * by_hand.text.encoder(bt))
    loss, _ = module.loss(codes_i, codes_t, target, s)
    opt_i.zero_grad(), opt_t.zero_grad()
    loss.backward()
    opt_i.step(), opt_t.step()

    terms = trainer.step(model, optimizer, bi, bt, None, trainer.alpha(0, 2))
    assert terms["total"].item() == pytest.approx(loss.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), by_hand.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # and the step lowered the batch's loss
    with torch.no_grad():
        after = module.loss(torch.tanh(model.image.encoder(bi)), torch.tanh(model.text.encoder(bt)), target, s)[0]
    assert after.item() < loss.item()


def test_one_step_of_dgcpn_is_its_three_updates():
    image, text, _ = paired()
    est = CFRH(bits=16, method="dgcpn", **small("dgcpn", neighbour_fraction=0.5))
    trainer, model, optimizer = _model_and_optimizer(est, image, text)
    s = trainer.settings
    data, bi, bt, idx = _first_batch(est, image, text)
    by_hand = copy.deepcopy(model)
    opt_i, opt_t = _by_hand_sgd([by_hand.image, by_hand.text], s)
    # train_div.py: S over the whole training set, the batch's block of it; tanh(h) codes (α = 1)
    full = dgcpn.target(torch.from_numpy(image), torch.from_numpy(text), s)
    target = full[idx][:, idx]
    codes = lambda: (torch.tanh(by_hand.image.encoder(bi)), torch.tanh(by_hand.text.encoder(bt)))  # noqa: E731
    ci, ct = codes()
    loss, _ = dgcpn.loss(ci, ct, target, s)
    opt_i.zero_grad(), opt_t.zero_grad()
    loss.backward()
    opt_i.step(), opt_t.step()
    ci, ct = codes()                                   # the image net against the text net's sign codes
    opt_i.zero_grad()
    dgcpn.loss(ci, ct.sign().detach(), target, s)[0].backward()
    opt_i.step()
    ci, ct = codes()                                   # the text net against the image net's sign codes
    opt_t.zero_grad()
    dgcpn.loss(ci.sign().detach(), ct, target, s)[0].backward()
    opt_t.step()

    trainer.begin(data, model)
    torch.testing.assert_close(trainer.full_target, full)
    terms = trainer.step(model, optimizer, bi, bt, idx, trainer.alpha(0, 2))
    assert terms["total"].item() == pytest.approx(loss.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), by_hand.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # DGCPN's text hash layer starts from N(0, .3²), not torch's default
    torch.manual_seed(0)
    fresh = CFRHModel(trainer.spec(image.shape[1], text.shape[1], 16))
    trainer.init_model(fresh)
    assert 0.2 < fresh.text.encoder[-1].weight.std().item() < 0.4


@pytest.mark.parametrize("method", BASELINES)
def test_a_baseline_fits_hashes_saves_and_loads(method, tmp_path):
    image, text, label = paired()
    est = CFRH(bits=16, method=method, **small(method, epochs=15))
    est.fit(image, text)
    history = est.history_
    assert len(history) == 15 and history[-1]["total"] < history[0]["total"]          # the loss went down
    codes = est.hash_image(image)
    assert codes.shape == (96, 2) and codes.dtype == np.uint8
    est.save(tmp_path / "m")
    description = json.loads((tmp_path / "m" / "model.json").read_text())
    assert description["method"] == method and description["settings"]["epochs"] == 15
    assert description["train_config"]["method"] == method and "mu" not in description["train_config"]
    loaded = CFRH.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.hash_text(text), est.hash_text(text))
    assert loaded.model_.image.decoder is None


# -- runs -----------------------------------------------------------------------------------------------------
def make_cache(root, n: int = 200) -> FeatureCache:
    image, text, label = paired(n, seed=1)
    cache, _ = FeatureCache.create(root, "toy", "precomputed", request={"toy": 1})
    cache.write("image", image)
    cache.write("text", text.astype(np.uint8))
    cache.write("labels", np.eye(3, dtype=np.uint8)[label])
    cache.write("ids", [str(i) for i in range(n)])
    for part, rows in (("query", np.arange(40)), ("train", np.arange(40, n)), ("database", np.arange(40, n))):
        cache.write(f"splits/{part}", rows)
    cache.finalize()
    return FeatureCache.open(root, "toy", "precomputed")


def pipeline(**train_settings) -> Pipeline:
    table = {"bits": [8], "epochs": 2, "batch_size": 32, "image_hidden": [16], "text_hidden": [16], "threads": 1,
             **{m: small(m)[m] for m in BASELINES}, **train_settings}
    return Pipeline(name="toy", path=None, dataset={"reader": "folder"}, train=table)


def test_runs_record_their_method_and_evaluate_puts_them_side_by_side(tmp_path):
    cache = make_cache(tmp_path)
    runs = tmp_path / "runs"
    for method in ("cfrh", *BASELINES):
        summary = train(pipeline(), tmp_path, runs_root=runs, method=None if method == "cfrh" else method)
        assert summary["run"] == method and summary["method"] == method
        store = RunStore.of(runs, cache, method)
        info = store.info()
        assert info["method"] == method and info["config"]["method"] == method and info["complete"] == {"8": True}
        assert store.read_codes(8, "image", cache.n_items).shape == (200, 1)
        assert json.loads(store.read_bytes("8/model.json"))["method"] == method
    report = evaluate(pipeline(), tmp_path, runs_root=runs, write=False, directions=["i2t"])
    assert [r["label"] for r in report["runs"]] == ["cfrh", "dgcpn", "djsrh", "jdsh"]
    assert [r["method"] for r in report["results"]] == ["cfrh", "dgcpn", "djsrh", "jdsh", "random-projection"]
    assert report["run"] == "cfrh" and set(report["train_configs"]) == {"cfrh", "dgcpn", "djsrh", "jdsh"}
    # one run by name; a run named otherwise is labelled with its method
    train(pipeline(), tmp_path, runs_root=runs, method="jdsh", run="mine")
    report = evaluate(pipeline(), tmp_path, runs_root=runs, write=False, run=["mine", "cfrh"], baseline="none",
                      directions=["t2i"])
    assert [r["method"] for r in report["results"]] == ["mine (jdsh)", "cfrh"] and report["run"] == "mine"
    # the command line: --method names the run, evaluate lists every run
    toml = tmp_path / "toy.toml"
    toml.write_text('[dataset]\nreader = "folder"\n\n[train]\nbits = [8]\nthreads = 1\n\n[train.djsrh]\n'
                    'epochs = 1\ntext_hidden = [8]\n')
    runner = CliRunner()
    out = runner.invoke(cli, ["train", str(toml), "--cache", str(tmp_path), "--runs", str(tmp_path / "cli"),
                              "--method", "djsrh", "--quiet", "--set", "train.djsrh.batch_size=16"])
    assert out.exit_code == 0, out.output
    assert "run djsrh · djsrh" in out.output
    info = json.loads((tmp_path / "cli/toy/precomputed/djsrh/run.json").read_text())
    assert info["config"]["djsrh"] == {"epochs": 1, "text_hidden": [8], "batch_size": 16}
    assert set(info["history"]["8"][0]) >= {"image_image", "image_text", "text_text", "total"}
    out = runner.invoke(cli, ["evaluate", str(toml), "--cache", str(tmp_path), "--runs", str(tmp_path / "cli"),
                              "--json", "--baseline", "none"])
    assert out.exit_code == 0, out.output
    assert {r["method"] for r in json.loads(out.stdout)["results"]} == {"djsrh"}


def test_a_baseline_run_resumes_to_the_same_codes(tmp_path, monkeypatch):
    cache = make_cache(tmp_path)
    runs = tmp_path / "runs"
    settings = {"dgcpn": {**small("dgcpn")["dgcpn"], "epochs": 4, "dropout": 0.5}, "checkpoint_every": 1}
    train(pipeline(**settings), tmp_path, runs_root=runs, method="dgcpn", run="whole")
    real_save, calls = train_mod.save_checkpoint, []

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(pipeline(**settings), tmp_path, runs_root=runs, method="dgcpn", run="cut")
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    summary = train(pipeline(**settings), tmp_path, runs_root=runs, method="dgcpn", run="cut")
    assert summary["bits"]["8"]["resumed_from_epoch"] == 2
    whole, cut = RunStore.of(runs, cache, "whole"), RunStore.of(runs, cache, "cut")
    for modality in ("image", "text"):
        np.testing.assert_array_equal(whole.read_codes(8, modality), cut.read_codes(8, modality))
    # another baseline's settings, or CFRH's, do not disturb a finished dgcpn run; its own do
    again = train(pipeline(**settings, mu=0.9, djsrh={"epochs": 5}), tmp_path, runs_root=runs, method="dgcpn",
                  run="whole")
    assert again["bits"]["8"]["skipped"] is True
    with pytest.raises(TrainError, match="dgcpn"):
        train(pipeline(**{**settings, "dgcpn": {**settings["dgcpn"], "a2": 0.5}}), tmp_path, runs_root=runs,
              method="dgcpn", run="whole")


def test_dgcpn_refuses_a_training_set_it_cannot_hold(tmp_path):
    make_cache(tmp_path)
    with pytest.raises(TrainError, match="dgcpn builds its target over the whole training set"):
        train(pipeline(in_memory_mb=0), tmp_path, runs_root=tmp_path / "runs", method="dgcpn")


def test_published_settings_are_left_untouched():
    """The sub-tables change copies: the published settings objects stay as the papers' code has them."""
    trainer_for(TrainConfig(method="jdsh", jdsh={"mu": 2.0}))
    assert jdsh.MIRFLICKR.mu == 1.4 and dataclasses.is_dataclass(jdsh.MIRFLICKR)
