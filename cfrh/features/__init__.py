"""Feature extractors: the CLIP image tower (:mod:`.image`) and the bag-of-words vectoriser (:mod:`.text`).

``image`` imports torch and transformers, so it is loaded on first use, not with the package.
"""
from __future__ import annotations

from typing import Any

from .text import BowVectoriser, TextFeatureError

__all__ = ["BowVectoriser", "TextFeatureError", "ClipImageEncoder", "ClipSpec", "ModelLoadError", "load_clip",
           "resolve_clip", "image_embeddings"]


def __getattr__(name: str) -> Any:
    if name in ("ClipImageEncoder", "ClipSpec", "ModelLoadError", "load_clip", "resolve_clip", "image_embeddings"):
        from . import image

        return getattr(image, name)
    raise AttributeError(name)
