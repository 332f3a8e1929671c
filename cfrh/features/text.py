"""Bag-of-words text features: tags or captions → uint8 count rows over a stored vocabulary.

The vocabulary is fitted on every item's text, unless the dataset fixes one itself (MIRFLICKR-25K's
1,386 tags, NUS-WIDE's 1,000), which is then used as is. Fitting on all items is the field's own
convention (those fixed vocabularies were chosen over the whole datasets), uses no label, and keeps
the features independent of the split, so a changed ``[split]`` never needs a re-extraction. Two
tokenisations:

* ``tags``: whitespace tokens, lower-cased, binary presence (the DCMH/DJSRH convention);
* ``captions``: word tokens (``\\b\\w\\w+\\b``), lower-cased, English stop words removed, counts.

Counts are clipped to 255 and stored as uint8 rows; ``min_df`` / ``max_features`` follow the
pipeline's ``[features]`` table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer

from ..errors import CfrhError

TEXT_KINDS = ("tags", "captions")
WORD_PATTERN = r"(?u)\b\w\w+\b"


class TextFeatureError(CfrhError, ValueError):
    """Vectoriser settings that cannot work on this dataset; the message says which setting to change."""


@dataclass
class BowVectoriser:
    """A CountVectorizer with a protocol's settings; ``settings()`` is what the cache manifest records."""

    kind: str = "tags"
    min_df: int | float = 1
    max_features: int | None = None
    binary: bool | None = None  # None: True for tags, False for captions
    stop_words: str | None = None  # None: "english" for captions, none for tags
    vocabulary: list[str] | None = None
    fixed_vocabulary: bool = False

    def __post_init__(self) -> None:
        if self.kind not in TEXT_KINDS:
            raise TextFeatureError(f"features.text = {self.kind!r}; use one of {', '.join(TEXT_KINDS)}")
        if self.binary is None:
            self.binary = self.kind == "tags"
        if self.stop_words is None and self.kind == "captions":
            self.stop_words = "english"
        if self.stop_words in ("", "none"):
            self.stop_words = None
        if self.max_features in (0, None):
            self.max_features = None
        if self.fixed_vocabulary and not self.vocabulary:
            raise TextFeatureError("a fixed vocabulary was asked for, but none was given")

    @classmethod
    def from_settings(cls, features: dict[str, Any], text_kind: str,
                      vocabulary: Sequence[str] | None = None) -> "BowVectoriser":
        """From a pipeline's ``[features]`` table (``text``, ``min_df``, ``max_features``, ``binary``,
        ``stop_words``) and the dataset's text kind and fixed vocabulary, if any."""
        kind = features.get("text", "auto")
        kind = text_kind if kind in ("auto", None) else kind
        return cls(kind=kind, min_df=features.get("min_df", 1), max_features=features.get("max_features"),
                   binary=features.get("binary"), stop_words=features.get("stop_words"),
                   vocabulary=list(vocabulary) if vocabulary is not None else None,
                   fixed_vocabulary=vocabulary is not None)

    def settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {"kind": self.kind, "tokens": "whitespace" if self.kind == "tags" else WORD_PATTERN,
                             "lowercase": self._lowercase(), "binary": self.binary, "stop_words": self.stop_words,
                             "dtype": "uint8 (counts clipped to 255)"}
        if self.fixed_vocabulary:
            s["vocabulary"] = f"fixed by the dataset ({len(self.vocabulary or [])} terms)"
        else:
            s.update(vocabulary="fit on every item", min_df=self.min_df, max_features=self.max_features)
        return s

    def _lowercase(self) -> bool:
        # A fixed vocabulary with capitals would never match lower-cased text.
        return not self.fixed_vocabulary or all(t == t.lower() for t in self.vocabulary or [])

    def _counter(self, vocabulary: Sequence[str] | None) -> CountVectorizer:
        kwargs: dict[str, Any] = {"lowercase": self._lowercase(), "binary": bool(self.binary),
                                  "dtype": np.int32, "vocabulary": vocabulary}
        if self.kind == "tags":
            kwargs.update(tokenizer=str.split, token_pattern=None)
        else:
            kwargs.update(token_pattern=WORD_PATTERN, stop_words=self.stop_words)
        if vocabulary is None:
            kwargs.update(min_df=self.min_df, max_features=self.max_features)
        return CountVectorizer(**kwargs)

    def fit(self, texts: Sequence[str]) -> "BowVectoriser":
        """Learn the vocabulary from ``texts`` (every item's); no-op for a fixed one."""
        if self.fixed_vocabulary:
            return self
        try:
            counter = self._counter(None).fit(texts)
        except ValueError as err:
            raise TextFeatureError(f"cannot build a vocabulary from {len(texts)} training texts ({err}); lower "
                                   f"features.min_df (now {self.min_df}) or check the dataset's texts") from None
        self.vocabulary = counter.get_feature_names_out().tolist()
        return self

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        """(N, V) sparse counts, clipped to 255 (they are stored as uint8)."""
        if self.vocabulary is None:
            raise TextFeatureError("the vectoriser has no vocabulary yet; fit it on the training texts first")
        try:
            counts = self._counter(self.vocabulary).transform(texts)
        except ValueError as err:
            raise TextFeatureError(f"the dataset's fixed vocabulary is unusable ({err})") from None
        counts = counts.tocsr()
        np.minimum(counts.data, 255, out=counts.data)
        return counts

    def transform_dense(self, texts: Sequence[str]) -> np.ndarray:
        """(N, V) uint8 rows, the stored form (for a few texts at a time, e.g. a search query)."""
        return self.transform(texts).toarray().astype(np.uint8)
