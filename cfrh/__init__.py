"""cfrh: CLIP-based Fusion-modal Reconstructing Hashing for unsupervised cross-modal retrieval.

Two stages around a feature cache: ``extract`` writes CLIP image embeddings and tag
bag-of-words into Zarr once (shareable, read-only afterwards); ``train`` learns k-bit codes for
both modalities from the cache into a run of its own; ``evaluate`` scores them; an index over
packed codes serves search. The public API::

    from cfrh import CFRH                                    # the estimator, on your own arrays
    model = CFRH(bits=64, seed=0).fit(image_features, text_features)
    codes = model.hash_image(x)                              # (N, 8) uint8 packed codes

    import cfrh                                              # the stages, on a pipeline
    pipe = cfrh.load_pipeline("wiki", ["dataset.root='/data/wiki'"])
    cfrh.extract(pipe); cfrh.train(pipe, bits=[64]); report = cfrh.evaluate(pipe)

Heavy modules (torch, transformers) load on first use of the name that needs them, so importing
the package (or the command line) stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

from .cache import FeatureCache, default_cache_root
from .codes import hamming_distances, pack_codes, unpack_codes
from .config import Pipeline, load_pipeline
from .errors import CfrhError

__version__ = "0.1.0"

# name → (module, attribute): resolved on first access (PEP 562), so `import cfrh` imports no torch.
_LAZY = {
    "CFRH": ("estimator", "CFRH"),
    "TrainConfig": ("estimator", "TrainConfig"),
    "extract": ("extraction", "extract"),
    "train": ("training", "train"),
    "evaluate": ("evaluation", "evaluate"),
    "HammingIndex": ("index", "HammingIndex"),
    "RunStore": ("runs", "RunStore"),
}

__all__ = ["CFRH", "TrainConfig", "extract", "train", "evaluate", "HammingIndex", "RunStore", "FeatureCache",
           "default_cache_root", "hamming_distances", "pack_codes", "unpack_codes", "Pipeline", "load_pipeline",
           "CfrhError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'cfrh' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
