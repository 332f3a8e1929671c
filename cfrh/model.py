"""The CFRH model: one autoencoder per modality whose bottleneck is a k-bit hash layer.

Per modality: feature → (Linear, ReLU, Dropout) × depth → Linear → h (k values); the relaxed
code is tanh(α h), with α growing over training (:func:`alpha_for_epoch`) so the relaxed codes
approach ±1; at inference the code is sign(h). The decoder maps the relaxed code back through
the mirrored hidden widths to the feature (reconstruction keeps the codes informative about
their own modality). Features are prepared the same way in training and at inference
(:data:`PREPROCESS`), with any mean stored in the model, so a saved model hashes new features
exactly as it hashed the training ones (the mean, and under ``idf-center-l2`` the column weights).

Saving and loading belong to the estimator (:meth:`cfrh.estimator.CFRH.save` / ``load``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .codes import pack_codes
from .errors import CfrhError

PREPROCESS = ("none", "l2", "center-l2", "idf-center-l2")
ALPHA_SCHEDULES = ("sqrt", "sqrt-progress", "linear", "constant")
# α is raised at least this many times over a run: DJSRH's 50 epochs of √(epoch + 1) (cfrh.model.alpha_stage)
ALPHA_STAGES = 50
HASH_BLOCK_ROWS = 16384


class ModelError(CfrhError, ValueError):
    """A model cannot be built, loaded or applied as asked (bad settings, wrong feature width)."""


def alpha_for_epoch(epoch: int, schedule: str = "sqrt", epochs: int = 1, alpha_max: float = 10.0) -> float:
    """The tanh sharpness α for a 0-based epoch.

    ``sqrt``: α = √(epoch + 1), as DJSRH and JDSH; ``sqrt-progress``: α² grows linearly from 1 to
    ``alpha_max``² over the run, α = √(1 + (alpha_max² − 1)·epoch/(epochs − 1)) (``sqrt``'s curve whatever the
    number of epochs: a 50-epoch run with alpha_max = √50 is ``sqrt``); ``linear``: 1 → ``alpha_max`` over the
    run; ``constant``: ``alpha_max`` throughout."""
    if schedule == "sqrt":
        return math.sqrt(epoch + 1.0)
    if schedule == "sqrt-progress":
        return math.sqrt(1.0 + (alpha_max ** 2 - 1.0) * epoch / max(1, epochs - 1))
    if schedule == "linear":
        return 1.0 + (alpha_max - 1.0) * epoch / max(1, epochs - 1)
    if schedule == "constant":
        return float(alpha_max)
    raise ModelError(f"alpha_schedule must be one of {ALPHA_SCHEDULES}, got {schedule!r}")


def alpha_stage(epoch: int, epochs: int, batch: int, batches: int) -> tuple[int, int]:
    """(stage, stages) of the α schedule at batch ``batch`` of ``batches`` in 0-based epoch ``epoch``.

    α is a step function of the run's progress: one stage per epoch when the run has at least
    :data:`ALPHA_STAGES` epochs (DJSRH and JDSH raise it per epoch), else :data:`ALPHA_STAGES` stages spread
    evenly over its optimiser steps. A step budget gives large sets few epochs (200,000 pairs: one); counted in
    epochs, α would stay at 1 or end at √13 (20,000 pairs) instead of the sharpness a 50-epoch run reaches
    (UCI, 5 epochs of 100 steps, 3 seeds: mAP@all +.03 over per-epoch stages, README). A run of 50 epochs is
    staged exactly by epoch."""
    if epochs >= ALPHA_STAGES:
        return epoch, epochs
    return (ALPHA_STAGES * (epoch * batches + batch)) // (epochs * batches), ALPHA_STAGES


def relaxed_codes(h: torch.Tensor, alpha: float) -> torch.Tensor:
    """tanh(α h): a differentiable stand-in for sign(h) that sharpens as α grows."""
    return torch.tanh(alpha * h)


def _mlp(widths: list[int], dropout: float) -> nn.Sequential:
    """Linear layers through ``widths`` with ReLU (and dropout) between them, none after the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU(inplace=True))
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class ModalityAutoencoder(nn.Module):
    """Encoder feature → hidden → k hash logits h; decoder relaxed code → mirrored hidden → feature.

    ``decoder=False`` leaves the decoder out: the hash networks of DJSRH, JDSH and DGCPN
    (:mod:`cfrh.trainers`), whose reconstruction is None."""

    def __init__(self, in_dim: int, hidden: list[int], bits: int, dropout: float = 0.0, decoder: bool = True):
        super().__init__()
        self.encoder = _mlp([in_dim, *hidden, bits], dropout)
        self.decoder = _mlp([bits, *reversed(hidden), in_dim], 0.0) if decoder else None

    def forward(self, x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(h, relaxed code, reconstruction or None without a decoder)."""
        h = self.encoder(x)
        b = relaxed_codes(h, alpha)
        return h, b, None if self.decoder is None else self.decoder(b)


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model (stored as model.json)."""

    image_dim: int
    text_dim: int
    bits: int
    image_hidden: list[int] = field(default_factory=lambda: [1024])
    text_hidden: list[int] = field(default_factory=lambda: [1024])
    dropout: float = 0.0
    image_preprocess: str = "l2"
    text_preprocess: str = "l2"
    decoder: bool = True           # False: hash networks only (the baselines; a model.json without the key has one)

    def __post_init__(self) -> None:
        if self.bits <= 0 or self.bits % 8:
            raise ModelError(f"bits must be a positive multiple of 8 (codes are stored packed), got {self.bits}")
        for name in ("image_preprocess", "text_preprocess"):
            if getattr(self, name) not in PREPROCESS:
                raise ModelError(f"{name} must be one of {PREPROCESS}, got {getattr(self, name)!r}")
        if not 0 <= self.dropout < 1:
            raise ModelError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("image_hidden", "text_hidden"):
            widths = getattr(self, name)
            if not all(isinstance(w, int) and w > 0 for w in widths):
                raise ModelError(f"{name} must be a list of positive layer widths, got {widths!r}")


def nonempty_rows(x: torch.Tensor) -> torch.Tensor:
    """Which rows carry anything (a text with no vocabulary word, an image with no tag, is all zeros): (n,) bool."""
    return x.abs().sum(1) > 0


@dataclass
class FeatureStats:
    """What feature preparation learns from one modality's training rows: the mean, and in how many rows each
    column is non-zero (for :func:`idf_weights`). Built whole by :meth:`of`, or streamed
    (:func:`cfrh.data.feature_stats`)."""

    mean: np.ndarray       # (D,) float32
    nonzero: np.ndarray    # (D,) int64: rows with a non-zero value in the column
    rows: int

    @classmethod
    def of(cls, x: np.ndarray | torch.Tensor) -> "FeatureStats":
        """Statistics of (N, D) rows held in memory, a numpy array or a tensor."""
        if isinstance(x, torch.Tensor):
            return cls(x.mean(0).numpy(), (x != 0).sum(0).numpy().astype(np.int64), int(x.shape[0]))
        x = np.asarray(x)
        return cls(x.mean(0), np.count_nonzero(x, axis=0).astype(np.int64), int(x.shape[0]))


def idf_weights(stats: FeatureStats) -> np.ndarray:
    """Smoothed inverse document frequency per column, ln((1 + n) / (1 + df)) + 1 (scikit-learn's
    ``TfidfTransformer(smooth_idf=True)``): a tag or visual word present in few rows says more about which rows
    are alike than one present in most, so it gets more of the cosine. A column non-zero in every row (CLIP
    embeddings, LDA topics, Fourier coefficients) gets exactly 1: dense features are prepared as without it."""
    return (np.log((1.0 + stats.rows) / (1.0 + stats.nonzero)) + 1.0).astype(np.float32)


def prepare_features(x: torch.Tensor, mode: str, mean: torch.Tensor,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """The model's view of raw features: as-is, L2-normalised rows, mean-centred then L2-normalised, or
    (``idf-center-l2``) centred, each column scaled by its ``weight`` (:func:`idf_weights`), then L2-normalised.

    An all-zero row (a text with no vocabulary word, an image with no tag) stays zero under the centring modes: it
    carries no similarity, where centring would make every such row the same vector, −mean, and the target
    would call them all alike (measured on MIRFLICKR's tag halves, 17% of rows empty: +.007 at 16 bits)."""
    if mode in ("center-l2", "idf-center-l2"):
        centred = x - mean if mode == "center-l2" else (x - mean) * weight
        x = torch.where(nonempty_rows(x)[:, None], centred, x)
    return F.normalize(x, dim=1) if mode != "none" else x


class CFRHModel(nn.Module):
    """The image and text autoencoders of one bit length, plus the feature preparation they assume."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.image = ModalityAutoencoder(spec.image_dim, list(spec.image_hidden), spec.bits, spec.dropout, spec.decoder)
        self.text = ModalityAutoencoder(spec.text_dim, list(spec.text_hidden), spec.bits, spec.dropout, spec.decoder)
        self.register_buffer("image_mean", torch.zeros(spec.image_dim))
        self.register_buffer("text_mean", torch.zeros(spec.text_dim))
        # column weights only where a modality uses them, so models saved without them still load
        self.register_buffer("image_weight",
                             torch.ones(spec.image_dim) if spec.image_preprocess == "idf-center-l2" else None)
        self.register_buffer("text_weight",
                             torch.ones(spec.text_dim) if spec.text_preprocess == "idf-center-l2" else None)

    def set_feature_stats(self, image: FeatureStats, text: FeatureStats) -> None:
        """What preparation takes from the training split: the means (``center-l2``, ``idf-center-l2``) and
        the IDF column weights (``idf-center-l2``), kept in the saved model."""
        self.image_mean.copy_(torch.as_tensor(image.mean, dtype=torch.float32))
        self.text_mean.copy_(torch.as_tensor(text.mean, dtype=torch.float32))
        if self.image_weight is not None:
            self.image_weight.copy_(torch.from_numpy(idf_weights(image)))
        if self.text_weight is not None:
            self.text_weight.copy_(torch.from_numpy(idf_weights(text)))

    def prepare_image(self, x: torch.Tensor) -> torch.Tensor:
        return prepare_features(x, self.spec.image_preprocess, self.image_mean, self.image_weight)

    def prepare_text(self, x: torch.Tensor) -> torch.Tensor:
        return prepare_features(x, self.spec.text_preprocess, self.text_mean, self.text_weight)

    # -- hashing new features -------------------------------------------------------------
    @torch.no_grad()
    def _hash(self, features: np.ndarray, which: str) -> np.ndarray:
        dim = self.spec.image_dim if which == "image" else self.spec.text_dim
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != dim:
            raise ModelError(f"{which} features must be (N, {dim}) for this model, got shape {features.shape}")
        was_training = self.training
        self.eval()
        net = self.image if which == "image" else self.text
        prepare = self.prepare_image if which == "image" else self.prepare_text
        out = np.empty((features.shape[0], self.spec.bits // 8), dtype=np.uint8)
        for start in range(0, features.shape[0], HASH_BLOCK_ROWS):
            block = torch.from_numpy(np.asarray(features[start:start + HASH_BLOCK_ROWS], dtype=np.float32))
            out[start:start + block.shape[0]] = pack_codes(net.encoder(prepare(block)).numpy())
        self.train(was_training)
        return out

    def hash_image(self, features: np.ndarray) -> np.ndarray:
        """(N, image_dim) raw image features → (N, bits/8) packed codes sign(h)."""
        return self._hash(features, "image")

    def hash_text(self, features: np.ndarray) -> np.ndarray:
        """(N, text_dim) raw text features (e.g. BoW counts) → (N, bits/8) packed codes sign(h)."""
        return self._hash(features, "text")
