"""The fast pixel rule (features.preprocess = "fast") against the model's own image processor: same crop and
normalisation, DCT scaling only for JPEGs at least twice the edge, embeddings within cosine 0.999 on real
COCO JPEGs with the real ViT-B/32 architecture, recorded in the manifest, refused where it cannot apply."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cfrh.features.image import (PIXEL_RULE, ImageBatches, ImageSettingsError, PixelRule, decode_image, decode_pixels,
                                 load_clip, pixel_rule, resolve_clip)
from clip_fixtures import make_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


def _reference(spec, sources) -> torch.Tensor:
    return ImageBatches(sources, [np.arange(len(sources))], spec.processor, spec.pixel_shape, spec.decoding)[0][1]


def _fast(spec, rule, sources) -> torch.Tensor:
    batches = [np.arange(len(sources))]
    crops = ImageBatches(sources, batches, spec.processor, spec.pixel_shape, spec.decoding, rule)[0][1]
    assert crops.dtype == torch.uint8 and crops.shape[1:] == (*rule.size, 3)
    return rule.normalise(crops)


def test_the_rule_reads_the_processor(vit_b32_dir):
    spec = resolve_clip(str(vit_b32_dir), random_init=True, local_files_only=True)
    rule = PixelRule.of(spec.processor)
    assert rule is not None and rule.edge == 224 and rule.size == (224, 224) and rule.resample == 3
    mean, std = np.array(spec.processor.image_mean), np.array(spec.processor.image_std)
    np.testing.assert_allclose(rule.scale, spec.processor.rescale_factor / std)
    np.testing.assert_allclose(rule.offset, -mean / std)
    assert spec.preprocess == "reference" and resolve_clip(str(vit_b32_dir), random_init=True,
                                                            preprocess="auto").preprocess == "fast"


def test_small_images_get_the_processors_pixels(tiny_clip, tmp_path):
    """No DCT scaling below twice the edge: the crop is the processor's up to the 8-bit kernel, ±2 levels on a
    few pixels of images with natural (smooth) content. Pillow clips between its two passes, which torch orders
    otherwise, so noise whose bicubic overshoot is clipped can differ by more: allowed on a few pixels only."""
    spec = resolve_clip(str(tiny_clip))
    rng = np.random.default_rng(0)
    smooth, noise = [], []
    for i, size in enumerate([(20, 30), (31, 45), (40, 63), (63, 40), (50, 50), (33, 90)]):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
        smooth.append(tmp_path / f"smooth{i}.png")
        coarse.save(smooth[-1])
        noise.append(tmp_path / f"noise{i}.png")
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(noise[-1])
    rule = PixelRule.of(spec.processor)
    level = torch.tensor(spec.processor.image_std).view(1, 3, 1, 1) * 255
    diff = ((_fast(spec, rule, smooth) - _reference(spec, smooth)).abs() * level).round()
    assert diff.max() <= 2 and (diff > 0).float().mean() < 0.03, (diff.max(), (diff > 0).float().mean())
    diff = ((_fast(spec, rule, noise) - _reference(spec, noise)).abs() * level).round()
    assert (diff > 2).float().mean() < 0.05 and diff.mean() < 0.5, ((diff > 2).float().mean(), diff.mean())


def test_fast_embeddings_match_the_reference_on_coco(coco_mini_dir, vit_b32_dir):
    """32 real COCO JPEGs (half of them DCT-scaled), real ViT-B/32 architecture: cosine ≥ 0.999 each."""
    from cfrh.datasets import read_dataset

    paths = [str(p) for p in read_dataset("coco", coco_mini_dir).image_paths[:32]]
    spec = resolve_clip(str(vit_b32_dir), random_init=True, local_files_only=True)
    rule = PixelRule.of(spec.processor)
    drafted = sum(min(Image.open(p).size) >= 2 * rule.edge for p in paths)
    assert 0 < drafted < len(paths)
    encoder = load_clip(spec, "cpu", "fp32")
    ref = encoder.embed(_reference(spec, paths))
    fast = encoder.embed(_fast(spec, rule, paths))
    cosine = (ref * fast).sum(1)
    assert cosine.min() >= 0.999, cosine.min()


def test_a_large_jpeg_is_dct_scaled_to_no_less_than_the_edge(tiny_clip, tmp_path):
    spec = resolve_clip(str(tiny_clip))
    rule = PixelRule.of(spec.processor)
    Image.new("RGB", (300, 200), (200, 30, 30)).save(tmp_path / "big.jpg", quality=95)
    crop = decode_pixels(tmp_path / "big.jpg", spec.decoding, rule)
    assert crop.shape == (32, 32, 3) and np.abs(crop.astype(int) - [200, 30, 30]).max() <= 3
    assert decode_image(tmp_path / "big.jpg", spec.decoding).size == (150, 100)  # the reference's: >= 2x the edge


def test_preprocess_is_recorded_and_checked(tiny_clip, tmp_path):
    from cfrh.config import load_pipeline
    from cfrh.extraction import extract

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    lines = ["image,text"]
    for i in range(6):
        Image.new("RGB", (40 + i, 36), (40 * i, 20, 200)).save(root / "images" / f"{i}.jpg")
        lines.append(f"images/{i}.jpg,photo {i}")
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    toml = tmp_path / "p.toml"
    toml.write_text(f"""name = "pp"
[dataset]
reader = "folder"
root = "{root}"
[features]
image_model = "{tiny_clip}"
workers = 0
[split]
method = "random"
query = 2
train = 3
""")
    fast = extract(load_pipeline(toml), tmp_path / "cache")
    assert fast.cache.request["image"]["preprocess"] == "fast"
    ref = extract(load_pipeline(toml), tmp_path / "cache2", preprocess="reference")
    assert ref.cache.request["image"]["preprocess"] == "reference"
    assert fast.cache.request["image"]["pixel_rule"] == PIXEL_RULE and "pixel_rule" not in ref.cache.request["image"]
    cosine = (fast.cache.read("image").astype(np.float32) * ref.cache.read("image").astype(np.float32)).sum(1)
    assert cosine.min() > 0.99
    from cfrh.cache import CacheMismatch

    with pytest.raises(CacheMismatch, match=r"image.preprocess: cache has 'fast', asked for 'reference'"):
        extract(load_pipeline(toml), tmp_path / "cache", preprocess="reference")


def test_processors_the_rule_cannot_reproduce(tiny_clip):
    spec = resolve_clip(str(tiny_clip))
    squash = type(spec.processor)(size={"height": 32, "width": 32}, do_center_crop=False)
    assert PixelRule.of(squash) is None and pixel_rule(squash, "auto") is None
    with pytest.raises(ImageSettingsError, match=r'features.preprocess = "fast" reproduces shortest-edge'):
        pixel_rule(squash, "fast")
    with pytest.raises(ImageSettingsError, match=r"features.preprocess = 'quick'; choose one of auto, fast"):
        pixel_rule(spec.processor, "quick")


def test_decoding_threads_give_the_batches_in_order(tiny_clip, tmp_path):
    """A pool of decoding threads (a GPU Dask worker's) hands over exactly the batches one thread decodes, in
    order, with the same drop reasons; closing it early stops the pool."""
    from cfrh.features.image import decode_threads, start_decoding

    spec = resolve_clip(str(tiny_clip), preprocess="fast")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(23):
        paths.append(str(tmp_path / f"{i}.jpg"))
        size = (int(rng.integers(20, 90)), int(rng.integers(20, 90)))
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    (tmp_path / "5.jpg").write_bytes(b"not a jpeg")
    batches = [np.arange(s, min(s + 4, len(paths))) for s in range(0, len(paths), 4)]

    def collect(decoded):
        try:
            return [(rows.tolist(), pixels.clone(), errors) for rows, pixels, errors in decoded]
        finally:
            decoded.close()

    one = collect(start_decoding(spec, paths, batches, overlap=False))
    pooled = collect(start_decoding(spec, paths, batches, threads=3))
    assert [r for r, _, _ in pooled] == [b.tolist() for b in batches]
    for (rows, pixels, errors), (_, want_pixels, want_errors) in zip(pooled, one):
        assert torch.equal(pixels, want_pixels) and errors == want_errors
    assert pooled[1][2][1].startswith("image decode failed")
    early = start_decoding(spec, paths, batches, threads=3)
    next(iter(early))
    early.close()
    import threading
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("cfrh-decode", "cfrh-image-prefetch"))]
    assert decode_threads(torch.device("cpu")) == 1
