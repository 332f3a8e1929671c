"""Hash new images and texts with a trained model, exactly as the cache's own items were hashed.

A code is only comparable with the cache's codes if the features behind it are computed the same
way, so everything here is rebuilt from the cache's manifest, never from the current pipeline file:

* images: the CLIP checkpoint recorded in the manifest (``found.image.model_source``, or ``model=``
  when the cache was extracted on another machine), checked against the recorded identity, revision,
  weights (pretrained or seeded random-init), architecture and preprocessing before use, in the
  recorded precision; embeddings are rounded to float16 as extraction stores them;
* texts: the recorded tokenisation (tags or caption words, lower-casing, binary or counts, stop
  words) over the cache's stored ``vocabulary``;
* codes: the run's saved model (:meth:`cfrh.CFRH.load` of ``<run>/<bits>``), ``hash_image`` / ``hash_text``.

Caches of precomputed features (WIKI, the ``.mat`` releases) cannot hash new raw images or texts:
their features came from a pipeline cfrh does not have. Items already in such a cache still have
codes in the run and can be searched with.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from .cache import CacheError, FeatureCache, describe_differences
from .errors import CfrhError
from .features.text import BowVectoriser

if TYPE_CHECKING:
    from .estimator import CFRH
    from .features.image import ClipImageEncoder
    from .runs import RunStore

log = logging.getLogger(__name__)
MODALITIES = ("image", "text")
# The vectoriser settings that decide which words a text contributes (the manifest's request.text).
_TOKENISATION = ("kind", "tokens", "lowercase", "binary", "stop_words")


class EncodeError(CfrhError, ValueError):
    """New items cannot be hashed the way this cache's items were; the message says why and what to do."""


def is_precomputed(cache: FeatureCache, modality: str) -> bool:
    """True when the cache's ``modality`` features were shipped with the dataset, not computed by cfrh."""
    request = cache.request.get(modality, {})
    return request.get("model" if modality == "image" else "kind") in (None, "precomputed")


def require_computed(cache: FeatureCache, modality: str) -> None:
    """Fail with the reason when new ``modality`` inputs cannot be featurised the way this cache's were."""
    if is_precomputed(cache, modality):
        raise EncodeError(
            f"{cache.url}: this cache's {modality} features were shipped precomputed with the dataset, so cfrh "
            f"cannot compute them for new {modality}s; search with an item already in the cache (--query-id), "
            f"or extract a cache from raw images and texts")


def random_init_seed(weights: str) -> int | None:
    """The seed of a ``random-init (untrained, seed N)`` weights record; None for pretrained weights."""
    if not weights.startswith("random-init"):
        return None
    m = re.search(r"seed (\d+)", weights)
    if m is None:
        raise EncodeError(f"cannot read the random-init seed from the manifest's weights record {weights!r}")
    return int(m.group(1))


def image_encoder(cache: FeatureCache, model: str | None = None, device: str = "auto") -> "ClipImageEncoder":
    """The CLIP image tower this cache was extracted with, verified against the manifest, on ``device``."""
    from .features.image import PIXEL_RULE, load_clip, resolve_clip

    require_computed(cache, "image")
    want = cache.request["image"]
    source = model or cache.manifest.get("found", {}).get("image", {}).get("model_source") or want["model"]
    seed = random_init_seed(str(want.get("weights", "pretrained")))
    decoding = want.get("decoding") or {}   # hash new images decoded as the cache's were
    spec = resolve_clip(str(source), random_init=seed is not None, seed=seed or 0,
                        max_image_pixels=decoding.get("max_image_pixels"), background=decoding.get("background"),
                        preprocess=want.get("preprocess") or "reference")   # the cache's pixel rule too
    have = spec.describe()
    diff = describe_differences({k: want.get(k) for k in have}, have)
    if diff:
        raise EncodeError(f"{source}: not the image model {cache.url} was extracted with ("
                          + "; ".join(d.replace("asked for", "this one has") for d in diff)
                          + "); pass --model-dir pointing at that checkpoint")
    if spec.preprocess == "fast" and want.get("pixel_rule") != PIXEL_RULE:
        log.warning("%s was extracted with another fast pixel rule (%s); new images get %r (each rule's "
                    "embeddings are within a cosine of 0.9997 of the reference processor's on COCO images, not "
                    "equal to each other)", cache.url, want.get("pixel_rule") or "cfrh-fast-1", PIXEL_RULE)
    return load_clip(spec, device, want.get("precision") or "auto")


def text_vectoriser(cache: FeatureCache) -> BowVectoriser:
    """The bag-of-words vectoriser of this cache: its recorded tokenisation over its stored vocabulary."""
    require_computed(cache, "text")
    want = cache.request["text"]
    vocabulary = cache.strings("vocabulary")
    if not vocabulary:
        raise CacheError(f"{cache.url}: the vocabulary array is missing; rerun `cfrh extract` for this cache")
    vec = BowVectoriser(kind=want["kind"], binary=want.get("binary"), stop_words=want.get("stop_words") or "none",
                        vocabulary=vocabulary, fixed_vocabulary=True)
    have = vec.settings()
    diff = describe_differences({k: want.get(k) for k in _TOKENISATION}, {k: have.get(k) for k in _TOKENISATION})
    if diff:
        raise EncodeError(f"{cache.url}: this cfrh tokenises texts differently from the one that built the cache ("
                          + "; ".join(diff) + "); re-extract the cache with this version")
    return vec


def expand_image_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders replaced by the image files below them (sorted, recursive)."""
    from .datasets._common import IMAGE_SUFFIXES

    out: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise EncodeError(f"{p}: no such image file or folder")
    return out


@dataclass
class Encoded:
    """Codes of the inputs that could be hashed, in input order, and why the others could not."""

    codes: np.ndarray  # (n, bits/8) uint8
    inputs: list[str]  # the input behind each row of ``codes``
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)
    empty: list[str] = field(default_factory=list)  # texts with no in-vocabulary word (hashed all the same)


class CodeEncoder:
    """A trained model plus the cache's feature extractors: new images or texts → packed codes."""

    def __init__(self, cache: FeatureCache, run: "RunStore", bits: int = 64, image_model: str | None = None,
                 device: str = "auto", batch_size: int = 32, workers: int = 0,
                 on_images: Callable[[int, int], None] | None = None):
        """``run``: a run trained on ``cache`` (:func:`cfrh.runs.open_run`); ``workers``: image-decoding
        processes (0: decode in this process; worth it for large folders); ``on_images(done, total)`` is
        called after each batch of images (progress bars)."""
        from .estimator import CFRH
        from .runs import RunError

        self.cache, self.run, self.bits = cache, run, int(bits)
        if self.bits not in run.complete_bits():
            raise RunError(f"{run.url}: run {run.name!r} has no complete {self.bits}-bit model (complete: "
                           f"{', '.join(map(str, run.complete_bits())) or 'none'}); run `cfrh train "
                           f"{cache.dataset} --bits {self.bits}`")
        self.model: CFRH = CFRH.load(run.model_dir(self.bits))
        self.image_model, self.device, self.batch_size = image_model, device, int(batch_size)
        self.workers, self.on_images = int(workers), on_images
        self._image: ClipImageEncoder | None = None
        self._text: BowVectoriser | None = None

    def encode_texts(self, texts: Sequence[str]) -> Encoded:
        """Texts → codes. A text with no word of the vocabulary still gets a code (as such training items
        did), but is listed in ``empty``: its code says nothing about it."""
        if self._text is None:
            self._text = text_vectoriser(self.cache)
        texts = [str(t) for t in texts]
        counts = self._text.transform_dense(texts)
        empty = [t for t, row in zip(texts, counts) if not row.any()]
        return Encoded(self.model.hash_text(counts.astype(np.float32)), texts, empty=empty)

    def image_features(self, paths: Sequence[str | Path]) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
        """(float16 embeddings of the images that decode, their input positions, (path, reason) of the rest)."""
        from .features.image import decode_threads, embed_decoded, start_decoding

        if self._image is None:
            self._image = image_encoder(self.cache, self.image_model, self.device)
        enc = self._image
        paths = [str(p) for p in paths]
        batches = [np.arange(s, min(s + self.batch_size, len(paths))) for s in range(0, len(paths), self.batch_size)]
        feats = np.zeros((len(paths), enc.dim), dtype=np.float16)
        ok = np.zeros(len(paths), dtype=bool)
        skipped: dict[int, str] = {}
        done = 0
        decoded = start_decoding(enc.spec, paths, batches, self.workers if len(batches) > 1 else 0,
                                 threads=decode_threads(enc.device))
        try:
            for rows, emb, reasons in embed_decoded(enc, decoded):
                good = reasons == ""
                feats[rows[good]] = emb[good]
                ok[rows[good]] = True
                skipped.update(zip(rows[~good].tolist(), reasons[~good].tolist()))
                done += len(rows)
                if self.on_images is not None:
                    self.on_images(done, len(paths))
        finally:
            decoded.close()
        kept = np.flatnonzero(ok).tolist()
        return feats[ok], kept, [(paths[i], r) for i, r in sorted(skipped.items())]

    def encode_images(self, paths: Sequence[str | Path]) -> Encoded:
        """Image files → codes; files that do not decode are skipped and listed with the reason."""
        feats, kept, skipped = self.image_features(paths)
        codes = self.model.hash_image(feats.astype(np.float32)) if kept else \
            np.empty((0, self.bits // 8), dtype=np.uint8)
        return Encoded(codes, [str(paths[i]) for i in kept], skipped=skipped)

    def encode(self, modality: str, inputs: Sequence[Any]) -> Encoded:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        return self.encode_images(inputs) if modality == "image" else self.encode_texts(inputs)
