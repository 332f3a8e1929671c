"""The public Python API: the CFRH estimator on plain arrays, the stages as functions, a light import."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import cfrh
from cfrh import CFRH
from cfrh.cache import FeatureCache
from cfrh.config import ConfigError, Pipeline
from cfrh.estimator import TrainError
from cfrh.runs import RunStore

SETTINGS = {"epochs": 3, "batch_size": 32, "image_hidden": [16], "text_hidden": [12], "threads": 1, "seed": 0}


def paired(n: int = 200, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image and text features of n items from 4 clusters (the cluster is the hidden label)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 4, n)
    image = rng.standard_normal((4, 20))[label] + 0.4 * rng.standard_normal((n, 20))
    text = rng.poisson(3.0 * (rng.random((4, 30)) < 0.3)[label] + 0.1)
    return image.astype(np.float32), text.astype(np.float32), label


def test_fit_hash_save_load_round_trip(tmp_path):
    image, text, label = paired()
    model = CFRH(bits=16, **{**SETTINGS, "epochs": 20}).fit(image, text)
    codes_i, codes_t = model.hash_image(image), model.hash_text(text)
    assert codes_i.shape == codes_t.shape == (200, 2) and codes_i.dtype == np.uint8
    assert [h["epoch"] for h in model.history_] == list(range(1, 21))
    # Codes carry the clusters across modalities: an item's text code is nearer to same-cluster images
    # (measured: 4.2 vs 9.1 bits of 16 apart on average).
    bits_i, bits_t = np.unpackbits(codes_i, axis=1), np.unpackbits(codes_t, axis=1)
    dist = (bits_t[:, None, :] != bits_i[None, :, :]).sum(-1)
    same = label[:, None] == label[None, :]
    assert dist[same].mean() + 3 < dist[~same].mean()
    for where in (str(tmp_path / "model"), "memory://cfrh-estimator/model"):
        model.save(where)
        loaded = CFRH.load(where)
        np.testing.assert_array_equal(loaded.hash_image(image), codes_i)
        np.testing.assert_array_equal(loaded.hash_text(text), codes_t)
        assert loaded.bits == 16 and loaded.get_params() == model.get_params()
    assert json.loads((tmp_path / "model" / "model.json").read_text())["train_config"]["epochs"] == 20


def test_same_settings_same_codes_and_settings_are_validated():
    image, text, _ = paired()
    a = CFRH(bits=8, **SETTINGS).fit(image, text).hash_image(image)
    b = CFRH(bits=8, **SETTINGS).fit(image, text).hash_image(image)
    c = CFRH(bits=8, **{**SETTINGS, "seed": 1}).fit(image, text).hash_image(image)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ConfigError, match="unknown train settings \\['epoch'\\]"):
        CFRH(bits=16, epoch=3)
    with pytest.raises(ConfigError, match="multiples of 8"):
        CFRH(bits=12)
    with pytest.raises(ConfigError, match="lr_image = nan"):
        CFRH(bits=16, lr_image=float("nan"))
    with pytest.raises(ValueError, match="rows must be paired"):
        CFRH(bits=16, **SETTINGS).fit(image, text[:-1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        CFRH(bits=16, **SETTINGS).fit(np.full_like(image, np.nan), text)
    with pytest.raises(ValueError, match="not fitted"):
        CFRH(bits=16).hash_text(text)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        CFRH(bits=16, **SETTINGS).fit(image[:10], text[:10])


def test_a_diverging_run_stops_with_the_fix_instead_of_saving_nan_codes():
    # SGD at lr 1e30 overflows the weights in the first epoch; without the check the run "finished" with a NaN
    # history and one code for every item.
    image, text, _ = paired()
    diverging = CFRH(bits=8, **{**SETTINGS, "optimizer": "sgd", "lr_image": 1e30, "lr_text": 1e30})
    with pytest.raises(TrainError, match=r"diverged in epoch 1 of 3 at 8 bits: the loss terms .*total are not "
                                         r"finite.*\(train\.lr_image, train\.lr_text\)"):
        diverging.fit(image, text)
    assert diverging.model_ is None
    baseline = CFRH(bits=8, method="djsrh", threads=1, djsrh={"lr_image": 1e30, "lr_text": 1e30, "epochs": 2})
    with pytest.raises(TrainError, match=r"\(train\.djsrh\.lr_image, train\.djsrh\.lr_text\)"):
        baseline.fit(image, text)


def test_the_pipeline_stage_trains_the_same_model_as_the_estimator(tmp_path):
    """`cfrh.train` on a cache = `CFRH(...).fit` on the cache's training rows: one training loop."""
    image, text, label = paired(300)
    cache, _ = FeatureCache.create(tmp_path, "toy", "precomputed", request={"toy": 1})
    cache.write("image", image.astype(np.float16))
    cache.write("text", text.astype(np.uint8))
    cache.write("labels", np.eye(4, dtype=np.uint8)[label])
    cache.write("ids", [str(i) for i in range(300)])
    for part, rows in (("query", np.arange(40)), ("train", np.arange(40, 300)), ("database", np.arange(40, 300))):
        cache.write(f"splits/{part}", rows)
    cache.finalize()
    pipe = Pipeline(name="toy", path=None, dataset={"reader": "precomputed"}, train={**SETTINGS, "bits": [16]})
    summary = cfrh.train(pipe, tmp_path, runs_root=tmp_path / "runs")
    store = RunStore.of(tmp_path / "runs", cache, "cfrh")
    rows = np.arange(40, 300)
    est = CFRH(bits=16, **SETTINGS).fit(cache.read("image", rows), cache.read("text", rows))
    np.testing.assert_array_equal(store.read_codes(16, "image"), est.hash_image(cache.read("image")))
    np.testing.assert_array_equal(store.read_codes(16, "text"), est.hash_text(cache.read("text")))
    assert summary["bits"]["16"]["loss"]["total"] == pytest.approx(est.history_[-1]["total"])
    report = cfrh.evaluate(pipe, tmp_path, runs_root=tmp_path / "runs", write=False)
    assert {r["direction"] for r in report["results"]} == {"i2t", "t2i", "i2i", "t2t"}


def test_the_command_line_imports_no_torch():
    code = ("import sys, cfrh.cli; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    lib = subprocess.run([sys.executable, "-c", "import cfrh, sys; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert lib.stdout.strip() == "False"


def test_no_library_module_imports_the_cli():
    from pathlib import Path

    root = Path(cfrh.__file__).parent
    sources = {p: p.read_text() for p in root.rglob("*.py") if "cli" not in p.relative_to(root).parts}
    offenders = [str(p.relative_to(root)) for p, text in sources.items()
                 if "from .cli" in text or "from ..cli" in text or "import cfrh.cli" in text or "from cfrh.cli" in text]
    assert offenders == []


def test_saved_model_keeps_its_idf_weights_and_a_model_without_them_loads(tmp_path):
    """The default preparation's IDF weights are part of the saved model (the sparse text's are not all 1, so a
    loaded model that lost them would hash differently); a model prepared with center-l2 has none and loads too."""
    image, text, _ = paired()
    for preprocess in ("idf-center-l2", "center-l2"):
        model = CFRH(bits=16, **SETTINGS, image_preprocess=preprocess, text_preprocess=preprocess).fit(image, text)
        model.save(tmp_path / preprocess)
        loaded = CFRH.load(tmp_path / preprocess)
        np.testing.assert_array_equal(loaded.hash_text(text), model.hash_text(text))
        np.testing.assert_array_equal(loaded.hash_image(image), model.hash_image(image))
        weight = loaded.model_.text_weight
        if preprocess == "center-l2":
            assert weight is None
        else:
            assert weight.min() > 1.0 and bool((weight == model.model_.text_weight).all())
