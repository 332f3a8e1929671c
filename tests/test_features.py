"""Stage 1 feature extractors: the CLIP image tower (tiny random CLIP saved like a real checkpoint) and the
bag-of-words vectoriser."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cfrh.errors import CfrhError
from cfrh.features.image import (ImageBatches, ModelLoadError, image_embeddings, load_clip, resolve_clip,
                                 resolve_precision)
from cfrh.features.text import BowVectoriser, TextFeatureError
from clip_fixtures import make_tiny_clip


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 41, 3), dtype=np.uint8)) for i in range(n)]


# -- image tower ------------------------------------------------------------------------------
def test_tiny_clip_features_match_a_direct_clipmodel_call(tiny_clip):
    from transformers import AutoImageProcessor, CLIPModel

    enc = load_clip(tiny_clip, device="cpu")
    images = _images(5)
    feats = enc.encode(images)
    assert feats.shape == (5, 16) and feats.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1.0, atol=2e-3)

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    pixels = AutoImageProcessor.from_pretrained(tiny_clip)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        direct = image_embeddings(model.get_image_features(pixel_values=pixels))
    direct = torch.nn.functional.normalize(direct, dim=-1).numpy()
    np.testing.assert_allclose(feats.astype(np.float32), direct, atol=2e-3)
    assert enc.info == {"device": "cpu", "precision": "fp32", "quantization": None}


def test_image_embeddings_accepts_tensor_and_both_model_outputs():
    t = torch.arange(6.0).reshape(2, 3)
    assert image_embeddings(t) is t  # transformers 4.x get_image_features
    assert image_embeddings(SimpleNamespace(image_embeds=t, pooler_output=None)) is t
    assert image_embeddings(SimpleNamespace(pooler_output=t)) is t  # transformers 5.x get_image_features
    with pytest.raises(TypeError):
        image_embeddings(SimpleNamespace(last_hidden_state=t))


def test_spec_records_revision_preprocessing_and_architecture(tiny_clip):
    spec = resolve_clip(str(tiny_clip))
    d = spec.describe()
    assert d["model"] == "tiny-clip" and d["weights"] == "pretrained"
    assert d["revision"].startswith("sha256:") and len(d["revision"]) == len("sha256:") + 16
    assert d["architecture"] == {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8,
                                 "hidden_size": 32, "layers": 2, "projection_dim": 16}
    assert d["preprocessing"]["crop_size"] == {"height": 32, "width": 32}
    assert spec.pixel_shape == (3, 32, 32)


def test_unreachable_hub_is_one_clear_line(monkeypatch):
    with pytest.raises(ModelLoadError) as err:
        load_clip("nobody-xyz/no-such-clip-model", local_files_only=True)
    msg = str(err.value)
    assert "\n" not in msg and "no-such-clip-model" in msg and "--model DIR" in msg and "offline" in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        resolve_clip("nobody-xyz/no-such-clip-model")
    with pytest.raises(ModelLoadError, match="model directory not found"):
        resolve_clip("/nonexistent/clip-dir")


def test_config_only_checkpoint_needs_random_init(tiny_clip, tmp_path):
    bare = tmp_path / "bare-clip"
    bare.mkdir()
    for f in ("config.json", "preprocessor_config.json"):
        shutil.copy(tiny_clip / f, bare / f)
    with pytest.raises(ModelLoadError, match="no weights here"):
        load_clip(bare)
    a, b = load_clip(bare, random_init=True, seed=1), load_clip(bare, random_init=True, seed=1)
    c = load_clip(bare, random_init=True, seed=2)
    imgs = _images(3)
    np.testing.assert_array_equal(a.encode(imgs), b.encode(imgs))
    assert not np.array_equal(a.encode(imgs), c.encode(imgs))
    assert a.spec.describe()["weights"] == "random-init (untrained, seed 1)"
    assert a.spec.describe()["revision"] == "config only"


def test_real_vit_b32_architecture_from_shared_config(vit_b32_dir):
    spec = resolve_clip(str(vit_b32_dir), local_files_only=True, random_init=True)
    arch = spec.describe()["architecture"]
    assert arch == {"model_type": "clip_vision_model", "image_size": 224, "patch_size": 32, "hidden_size": 768,
                    "layers": 12, "projection_dim": 512}
    assert spec.pixel_shape == (3, 224, 224)
    assert spec.describe()["preprocessing"]["size"] == {"shortest_edge": 224}


def test_int8_dynamic_quantisation_on_cpu(tiny_clip):
    fp32, int8 = load_clip(tiny_clip), load_clip(tiny_clip, precision="int8")
    assert int8.info["quantization"].startswith("dynamic int8")
    kinds = {type(m).__module__ for m in int8.model.modules()}
    assert any("quantized" in k for k in kinds)  # Linear layers were swapped for dynamic quantised ones
    imgs = _images(4)
    cos = (fp32.encode(imgs).astype(np.float32) * int8.encode(imgs).astype(np.float32)).sum(1)
    assert (cos > 0.95).all()


def test_precision_rules():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("auto", gpu) == "fp16"
    with pytest.raises(CfrhError, match="CPU only"):
        resolve_precision("int8", gpu)
    with pytest.raises(CfrhError, match="unknown precision"):
        resolve_precision("fp8", cpu)


def test_image_batches_report_undecodable_files_without_pixels(tiny_clip, tmp_path):
    spec = resolve_clip(str(tiny_clip))
    good = tmp_path / "good.jpg"
    _images(1)[0].save(good, quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image")
    paths = [good, truncated, garbage, tmp_path / "missing.jpg"]
    data = ImageBatches(paths, [np.arange(4)], spec.processor, spec.pixel_shape)
    rows, pixels, errors = data[0]
    np.testing.assert_array_equal(rows, np.arange(4))
    assert errors[0] == "" and all(e.startswith("image decode failed: ") for e in errors[1:])
    assert errors[3] == "image decode failed: FileNotFoundError"
    expected = spec.processor(images=Image.open(good).convert("RGB"), return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(pixels[0].numpy(), expected, atol=1e-6)
    assert not pixels[1:].any()


# -- bag of words -----------------------------------------------------------------------------
def test_tags_vocabulary_comes_from_the_texts_it_is_fitted_on():
    texts = ["Sky sea", "sea dog dog", "cat sky", "zebra only-in-query"]
    vec = BowVectoriser(kind="tags").fit(texts[:3])
    assert vec.vocabulary == ["cat", "dog", "sea", "sky"]
    rows = vec.transform_dense(texts)
    assert rows.dtype == np.uint8
    np.testing.assert_array_equal(rows, [[0, 0, 1, 1], [0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]])  # binary
    assert vec.settings()["vocabulary"] == "fit on every item"


def test_captions_drop_stop_words_and_respect_min_df_and_max_features():
    train = ["A dog runs on the beach", "The dog barks at a dog", "a cat sleeps", "dog and cat"]
    vec = BowVectoriser(kind="captions", min_df=2).fit(train)
    assert vec.vocabulary == ["cat", "dog"]  # stop words gone; words in one caption only gone
    np.testing.assert_array_equal(vec.transform_dense(["dog dog DOG cat the"]), [[1, 3]])  # counts
    top = BowVectoriser(kind="captions", max_features=1).fit(train)
    assert top.vocabulary == ["dog"]


def test_counts_clip_at_255_and_fixed_vocabulary_is_used_as_is():
    vec = BowVectoriser.from_settings({"text": "captions"}, "tags", vocabulary=["zebra", "dog"])
    assert vec.kind == "captions" and vec.fit(["cat cat"]).vocabulary == ["zebra", "dog"]
    np.testing.assert_array_equal(vec.transform_dense(["dog " * 300 + "zebra"]), [[1, 255]])
    assert vec.settings()["vocabulary"] == "fixed by the dataset (2 terms)"


def test_impossible_vocabulary_is_a_clear_error():
    with pytest.raises(TextFeatureError, match="lower features.min_df"):
        BowVectoriser(kind="tags", min_df=5).fit(["a b", "c d"])
    with pytest.raises(TextFeatureError, match="features.text"):
        BowVectoriser(kind="sentences")


def test_prefetch_keeps_order_reraises_and_stops():
    from cfrh.features.image import Prefetch

    assert list(Prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise OSError("disk gone")

    it = Prefetch(failing())
    assert next(it) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(it)
    endless = Prefetch(iter(lambda: 0, 1), depth=2)  # never ends on its own
    assert next(endless) == 0
    endless.close()
    assert not endless._thread.is_alive()
