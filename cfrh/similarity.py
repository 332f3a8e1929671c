"""The fused similarity matrix CFRH's codes are trained to reproduce, built per batch.

Pure functions on tensors, no state. With row-wise cosine similarities S_I (images) and
S_T (texts) of one batch, the default path is the one CFRH names::

    S_c = ½ (N(S_I) N(S_T)ᵀ + (N(S_I) N(S_T)ᵀ)ᵀ)        joint-modal similarity (JDSH), N = row L2-normalisation
    S   = μ (β S_I + γ S_T + η S_c)                     fused similarity

**Scale** (``scale``). The relaxed codes' inner products B̂B̂ᵀ live in [-1, 1], so what the loss asks
of them depends on the spread of S, and that spread depends on the features, not on the method:
centred cosines of WIKI's 10-d LDA topics have an off-diagonal standard deviation of ≈ .38, of
MIRFLICKR's sparse 693-tag halves ≈ .07. ``scale = "fixed"`` is DJSRH/JDSH's S = μ(...) as written
(μ a constant tuned per dataset); ``scale = "batch-std"`` first divides the weighted sum by its
off-diagonal standard deviation in the batch, so μ is the target's spread on any features
(measured, README "Method quality": μ = .5 beat the fixed μ = 1.4 at every bit length on WIKI, e.g.
.272/.552 against .266/.548 at 64 bits in ``benchmarks/quality.py``, and lifted a MIRFLICKR
tag-split check from .583 to .605). ``scale = "batch-iqr"``, the default of the ``[train]`` table, divides by
the interquartile range instead (over a normal's, :func:`offdiagonal_iqr_spread`): about the standard deviation
on targets that look normal, but sparse tags put a few pairs far out (MIRFLICKR's tag halves, target at
``batch-std`` and μ = .5: 90% of the entries under .09, the 99th percentile at 2.6; WIKI's and UCI's 90th
percentiles are .67–.76), and the standard deviation those few inflate squeezes the rest of the target. In
batches of 128 the interquartile spread is .89–.94 of the standard deviation on WIKI and UCI and .23–.31 of it on
the tag halves (.19–.23 with the default IDF column weights, :func:`cfrh.model.idf_weights`; WIKI and UCI
unchanged), so μ = .45 with it asks WIKI and UCI for the spread μ = .5 did with ``batch-std``.

**Anchors** (``anchors``). JDSH's S_c compares two items' similarity profiles over the batch; in a batch of
128 sparse texts most profiles are nearly all zero, so S_c says little. Given the features of m training
pairs drawn once (``train.joint_anchors``, :meth:`cfrh.trainers.Trainer.begin`), S_c compares the profiles
over those anchors instead: the same formula, a steadier second-order neighbourhood, the way DGCPN's
target looks at neighbours over the whole training set, at O(n·m) per batch instead of O(N²) once.

Optional adjustments, all off by default:

``rescale = "affine"``
    S_I, S_T ← 2S − 1 before fusing (JDSH's code does this for non-negative features, whose cosines
    lie in [0, 1], so that unrelated pairs get negative targets).
``refine = "djsrh"``
    S ← (1 − ρ) S + ρ S Sᵀ / n, DJSRH's second-order "neighbours agree" term, ρ = ``refine_weight``.
``refine = "dgcpn"``
    DGCPN's graph-neighbour coherence within the batch: P = each row's k = ⌈.4 n⌉ largest entries but itself,
    as a distribution (:func:`cfrh.methods.dgcpn.neighbour_distribution`), S ← (1 − ρ) S + ρ · .8 n · P Pᵀ
    (DGCPN's a2 = ρ, its k and scale as the same fractions of the n rows).
``weighting = "jdsh"``
    JDSH's distribution-based weighting with thresholds from the batch's own distribution instead of
    MIRFLICKR's constants: off-diagonal values below its 13th percentile are pushed away from the mean by
    1 + .1 e^{−(s − min)}, above its 98th by 1 + .2 e^{s − max} (JDSH's left/right thresholds, loc − 2·scale and
    loc + 4·scale of Gumbel fits, sit at about those quantiles; L1 = .1, L2 = .2), applied after the scale.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RESCALES = ("none", "affine")
REFINES = ("none", "djsrh", "dgcpn")
SCALES = ("fixed", "batch-std", "batch-iqr")
NORMAL_IQR = 1.3489795   # the interquartile range of a standard normal distribution
IQR_FLOOR = 0.1          # batch-iqr's spread is at least this fraction of the standard deviation
WEIGHTINGS = ("none", "jdsh")
DGCPN_NEIGHBOURS, DGCPN_SCALE = 0.4, 0.8     # DGCPN's knn and scale as fractions of the rows (cfrh.methods.dgcpn)
# JDSH's thresholds loc − 2·scale and loc + 4·scale of Gumbel fits are about these quantiles of the distribution
JDSH_QUANTILES = (0.13, 0.98)


def cosine_similarity(x: torch.Tensor) -> torch.Tensor:
    """(n, d) rows → (n, n) cosine similarities (zero rows give zero similarity, not NaN)."""
    xn = F.normalize(x, dim=1)
    return xn @ xn.T


def joint_modal_similarity(s_image: torch.Tensor, s_text: torch.Tensor) -> torch.Tensor:
    """JDSH's S_c: how alike two items' similarity profiles are, one profile per modality, symmetrised. A
    profile is a row: the item's similarities to the batch (JDSH), or to fixed anchors (:func:`anchor_profiles`)."""
    p = F.normalize(s_image, dim=1) @ F.normalize(s_text, dim=1).T
    return 0.5 * (p + p.T)


def anchor_profiles(batch: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(n, d) batch rows, (m, d) anchor rows → (n, m) cosine similarities of each batch row to each anchor."""
    return F.normalize(batch, dim=1) @ F.normalize(anchors, dim=1).T


def offdiagonal_std(s: torch.Tensor) -> torch.Tensor:
    """Standard deviation of the entries of a square matrix off its diagonal (0-d tensor)."""
    if s.shape[0] < 2:
        return s.new_zeros(())
    return offdiagonal(s).std()


def offdiagonal_iqr_spread(s: torch.Tensor) -> torch.Tensor:
    """Interquartile range of the off-diagonal entries over that of a standard normal: the standard deviation
    for normal entries, but blind to a heavy tail (sparse tags: a few pairs far out, the bulk of the target
    between −.3 and .1). At least :data:`IQR_FLOOR` of the standard deviation, so a batch whose bulk is one value
    (most rows alike) is not blown up by a near-zero spread."""
    if s.shape[0] < 2:
        return s.new_zeros(())
    entries = offdiagonal(s)
    q = torch.quantile(entries, torch.tensor([0.25, 0.75], dtype=s.dtype, device=s.device))
    return torch.maximum((q[1] - q[0]) / NORMAL_IQR, IQR_FLOOR * entries.std())


def offdiagonal(s: torch.Tensor) -> torch.Tensor:
    """The n(n − 1) entries of a square matrix off its diagonal, as a vector."""
    n = s.shape[0]
    return s.reshape(-1)[1:].reshape(n - 1, n + 1)[:, :-1].reshape(-1)


def jdsh_weighting(s: torch.Tensor, q_left: float = JDSH_QUANTILES[0], q_right: float = JDSH_QUANTILES[1],
                   l1: float = 0.1, l2: float = 0.2) -> torch.Tensor:
    """JDSH's weighting (:func:`cfrh.methods.jdsh.weighting`) with thresholds from this matrix's own off-diagonal
    distribution: left, right = its q_left and q_right quantiles; a value's distance from the mean grows by
    1 + l1 e^{−(s − min)} below left, by 1 + l2 e^{s − max} above right; the diagonal stays."""
    off = offdiagonal(s)
    mean = off.mean()
    left, right = torch.quantile(off, torch.tensor([q_left, q_right], dtype=off.dtype))
    # pushed away from the distribution's centre (JDSH multiplies the value itself: its centre is 0 there)
    low = mean + (s - mean) * (1 + l1 * torch.exp(-(s - off.min())))
    high = mean + (s - mean) * (1 + l2 * torch.exp(s - off.max()))
    eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    return torch.where(eye, s, torch.where(s < left, low, torch.where(s > right, high, s)))


def dgcpn_coherence(s: torch.Tensor) -> torch.Tensor:
    """.8 n · P Pᵀ with P each row's ⌈.4 n⌉ largest entries but itself, normalised (DGCPN, within a batch)."""
    from .methods.dgcpn import neighbour_distribution

    n = s.shape[0]
    k = max(2, min(n, math.ceil(DGCPN_NEIGHBOURS * n)))
    p = neighbour_distribution(s, k)
    return DGCPN_SCALE * n * (p @ p.T)


def fused_similarity(image: torch.Tensor, text: torch.Tensor, *, mu: float, beta: float, gamma: float,
                     eta: float, rescale: str = "none", refine: str = "none",
                     refine_weight: float = 0.0, scale: str = "fixed", weighting: str = "none",
                     anchors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """S = μ(β S_I + γ S_T + η S_c) for a batch of paired features (see the module docstring); with
    ``scale = "batch-std"`` the sum in brackets is first divided by its off-diagonal standard deviation
    (``"batch-iqr"``: by :func:`offdiagonal_iqr_spread`);
    with ``anchors`` (image rows, text rows of the same m training pairs) S_c compares the items' profiles
    over those anchors instead of over the batch."""
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
    if refine not in REFINES:
        raise ValueError(f"refine must be one of {REFINES}, got {refine!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    s_i, s_t = cosine_similarity(image), cosine_similarity(text)
    if rescale == "affine":
        s_i, s_t = 2 * s_i - 1, 2 * s_t - 1
    fused = beta * s_i + gamma * s_t
    if eta and anchors is not None:
        p_i, p_t = anchor_profiles(image, anchors[0]), anchor_profiles(text, anchors[1])
        if rescale == "affine":
            p_i, p_t = 2 * p_i - 1, 2 * p_t - 1
        fused = fused + eta * joint_modal_similarity(p_i, p_t)
    elif eta:
        fused = fused + eta * joint_modal_similarity(s_i, s_t)
    if refine == "djsrh" and refine_weight:
        fused = (1 - refine_weight) * fused + refine_weight * (fused @ fused.T) / fused.shape[0]
    elif refine == "dgcpn" and refine_weight:
        fused = (1 - refine_weight) * fused + refine_weight * dgcpn_coherence(fused)
    if scale != "fixed":
        # A batch whose items all look alike has no spread to rescale: leave it as it is.
        spread = offdiagonal_std(fused) if scale == "batch-std" else offdiagonal_iqr_spread(fused)
        fused = fused / spread if spread > 1e-6 else fused
    if weighting == "jdsh":
        fused = jdsh_weighting(fused)
    return mu * fused
