"""DGCPN, Deep Graph-neighbor Coherence Preserving Network (Yu, Zhou, Zhan, Tao; AAAI 2021), as its public code
runs it.

Source: the project page github.com/Atmegal/DGCPN; the index read here held only that repository's README, so
the code was read from a copy of its training code found by content (the authors' data paths
``/media/zhouhao/...`` in ``load_data.py``): the main script (argparse defaults; it imports ``train_div``),
``train_div.py`` (``Session.cal_similarity``, ``Session.loss_cal``, ``Session.train``), ``load_data.py``
(``get_loader``, ``get_loader_wiki``) and ``models.py`` (``ImgNet``, ``TxtNet``).

Unlike DJSRH/JDSH the target is built **once, over the whole training set** of N pairs (``cal_similarity``
on ``global_imgs`` / ``global_txts``), and each batch uses its rows and columns (``self.gs[index, :][:, index]``),
hence ``Settings.target_scope = "training-set"``::

    S_I = cos(F_I, F_I),  S_T = cos(F_T, F_T)
    P0  = a1 S_T + (1 − a1) S_I                                    first-order similarity (a1)
    P   = P0 with, in every row, the knn_number smallest entries and the largest (itself) set to 0,
          then each row divided by its sum                          the kept neighbours, as a distribution
    S   = 2 ((1 − a2) P0 + a2 · scale · P Pᵀ) − 1                    graph-neighbour coherence (a2, scale)

Per batch, with B = row-normalised relaxed codes tanh(h) (α = 1: the ``set_alpha`` calls are commented out)
and I the identity (``loss_cal``)::

    pair = mse(diag(B_I B_Tᵀ), K · 1)                                 (K)
    dis  = mse(B_T B_Tᵀ∘(1−I), S∘(1−I)) + mse(B_I B_Tᵀ∘(1−I), S∘(1−I)) + mse(B_I B_Iᵀ∘(1−I), S∘(1−I))
    cons = mse(B_I B_Tᵀ, B_I B_Iᵀ) + mse(B_I B_Tᵀ, B_T B_Tᵀ) + mse(B_I B_Iᵀ, B_T B_Tᵀ) + mse(B_I B_Tᵀ, B_T B_Iᵀ)
    loss = pair + dw · dis + cw · cons                                (dw, cw)

mse = ``F.mse_loss`` (the mean over all entries, the masked diagonal included). The "half-real and half-binary"
optimisation is three steps per batch (``train``), :data:`UPDATES`: both nets on loss(B_I, B_T); then, codes
recomputed, the image net alone on loss(B_I, sign(B_T)) and the text net alone on loss(sign(B_I), B_T), the
sign codes detached.

Where each number comes from (the main script's argparse defaults, which are its MIRFLICKR settings,
``--data_name flickr``): ``--learning_rate`` .005 (both nets), ``--momentum`` .9, ``--weight_decay`` 5e-4,
``--batch_size`` 32, ``--num_epochs`` 100, ``--bit`` 64, ``--a1`` .01, ``--a2`` .3, ``--K`` 1.5, ``--dw`` 1,
``--cw`` 1, ``--knn_number`` 3000, ``--scale`` 4000; SGD (``train_div.Session.__init__``). The two counts
depend on the training-set size N = 5,000, so :data:`MIRFLICKR` gives them as fractions of N:

* ``neighbour_fraction`` = .4: the script's own comment says its knn_number is "5000 − knn number from paper",
  i.e. the paper keeps k = 5,000 − 3,000 = 2,000 = .4 N neighbours (the code keeps k − 1 of them besides the
  row's largest entry, itself); for a training set of N rows, knn_number = N − round(.4 N);
* ``scale_fraction`` = .8: scale = 4,000 = .8 N (P's rows sum to 1 over about .4 N entries, so P Pᵀ shrinks
  like 1/N and the scale keeps the coherence term comparable across N).

Networks (``models.py``, on precomputed VGG-19 fc7 features ``<data>_vgg19.npy``, 4096-d): ImgNet =
Linear(4096, 4096), ReLU, Dropout(.5), Linear(4096, bits); TxtNet = Linear(txt_feat_len, 4096), ReLU,
Dropout(.5), Linear(4096, bits) with the last weight drawn from N(0, .3²) (``torch.nn.init.normal``;
:data:`TEXT_HASH_INIT_STD`). Codes: tanh(h), α = 1.

What the code does that a reader of the method could miss (this module follows the code):

* knn_number in the code is the number of entries *removed* per row, not the paper's k (the script says so).
* The row's largest entry is removed whatever it is (``n1[:, -1:]``): normally the item itself, whose cosine 1
  is the maximum; with duplicated features it may be a twin. Ties in the sort fall in torch's order there;
  here a stable sort decides (the largest of equal values is the later column, the smallest the earlier one).
* The training loop stops early when mAP@all on a validation split has not improved for more than 10
  evaluations (one per epoch), then tests the best checkpoint; this is not part of the settings here.
* The pair target K = 1.5 exceeds any cosine, so the pair term keeps pulling paired codes together.

Where this module differs from the code: a row of P with nothing to keep (all its kept first-order entries
zero) is zero instead of 0/0 = NaN (:func:`neighbour_distribution`). MIRFLICKR's VGG features never give one;
its tags split in two halves do (2 of the 5,000 training rows), and there the public code's NaN would end
every run in NaN weights and constant codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import Training, code_products, cosine, mse, relax, weighted_total

__all__ = ["Settings", "MIRFLICKR", "UPDATES", "TEXT_HASH_INIT_STD", "knn_counts", "neighbour_distribution",
           "target", "batch_target", "loss", "relax"]

UPDATES = ("joint", "image-vs-sign-text", "text-vs-sign-image")  # the three optimiser steps per batch
TEXT_HASH_INIT_STD = 0.3  # TxtNet's last layer: weight ~ N(0, 0.3²)


@dataclass(frozen=True, kw_only=True)
class Settings(Training):
    """DGCPN's hyper-parameters (argparse names in brackets)."""

    a1: float                  # weight of S_T in the first-order similarity [a1]
    a2: float                  # weight of the neighbour-coherence term [a2]
    neighbour_fraction: float  # neighbours kept per row, as a fraction of N (the paper's k / N)
    scale_fraction: float      # scale / N [scale]
    pair_target: float         # target of the paired codes' cosine [K]
    w_dis: float               # weight of the three similarity terms [dw]
    w_cons: float              # weight of the intra/inter-modal consistency terms [cw]
    target_scope: str = "training-set"  # the target is computed once over the training set, sliced per batch


MIRFLICKR = Settings(optimizer="sgd", lr_image=0.005, lr_text=0.005, momentum=0.9, weight_decay=5e-4, batch_size=32,
                     epochs=100, bits=64, image_hidden=(4096,), text_hidden=(4096,), dropout=0.5,
                     alpha_schedule="constant", a1=0.01, a2=0.3, neighbour_fraction=0.4, scale_fraction=0.8,
                     pair_target=1.5, w_dis=1.0, w_cons=1.0)


def knn_counts(n: int, settings: Settings) -> tuple[int, int]:
    """(k, knn_number) for a training set of n rows: the paper's neighbour count k = round(fraction · n) and the
    code's count of entries removed per row, n − k (3,000 for MIRFLICKR's 5,000)."""
    k = int(round(settings.neighbour_fraction * n))
    if not 2 <= k <= n:
        raise ValueError(f"neighbour_fraction {settings.neighbour_fraction} keeps {k} of {n} rows per row; it must "
                         f"keep at least 2 (the row's largest entry, itself, is always removed)")
    return k, n - k


def neighbour_distribution(first_order: torch.Tensor, k: int) -> torch.Tensor:
    """P: in each row keep the k largest entries but the largest (itself), zero the rest, rows summing to 1.
    As the code: an ascending sort, the first n − k and the last entry zeroed (stable here, for ties).

    A row whose kept entries are all zero (an item that shares no feature with any other: on sparse tags, a
    tag only it carries) has no neighbours to spread over: its row of P is zero, where the code's division,
    0/0, makes it NaN, and with it the whole target and, one batch later, every weight. Every other row is the
    code's, bit for bit."""
    n = first_order.shape[1]
    order = torch.sort(first_order, dim=1, stable=True).indices
    keep = torch.zeros_like(first_order, dtype=torch.bool).scatter_(1, order[:, n - k:n - 1], True)
    kept = torch.where(keep, first_order, torch.zeros_like(first_order))
    total = kept.sum(dim=1, keepdim=True)
    return torch.where(total != 0, kept / total, torch.zeros_like(kept))


def target(image_features: torch.Tensor, text_features: torch.Tensor, settings: Settings) -> torch.Tensor:
    """S over all N training pairs (rows of the features): 2((1 − a2) P0 + a2 · scale · P Pᵀ) − 1."""
    n = image_features.shape[0]
    k, _ = knn_counts(n, settings)
    first_order = settings.a1 * cosine(text_features) + (1 - settings.a1) * cosine(image_features)
    p = neighbour_distribution(first_order, k)
    coherence = (settings.scale_fraction * n) * (p @ p.T)
    return 2 * ((1 - settings.a2) * first_order + settings.a2 * coherence) - 1


def batch_target(full_target: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The batch's block of the training-set target: ``S[rows][:, rows]`` (rows: the batch's training-set rows)."""
    return full_target[rows][:, rows]


def loss(image_codes: torch.Tensor, text_codes: torch.Tensor, similarity: torch.Tensor,
         settings: Settings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(pair + dw · Σ dis_* + cw · Σ cons_*, the unweighted terms); pass sign(codes).detach() for one side to get
    the half-binary steps of :data:`UPDATES`."""
    ii, tt, it = code_products(image_codes, text_codes)
    off = 1 - torch.eye(similarity.shape[0], dtype=similarity.dtype, device=similarity.device)
    s_off = similarity * off
    terms = {"pair": mse(torch.diagonal(it), torch.full_like(torch.diagonal(it), settings.pair_target)),
             "dis_text_text": mse(tt * off, s_off), "dis_image_text": mse(it * off, s_off),
             "dis_image_image": mse(ii * off, s_off),
             "cons_it_ii": mse(it, ii), "cons_it_tt": mse(it, tt), "cons_ii_tt": mse(ii, tt),
             "cons_it_ti": mse(it, it.T)}
    weights = {"pair": 1.0, **{name: settings.w_dis for name in terms if name.startswith("dis_")},
               **{name: settings.w_cons for name in terms if name.startswith("cons_")}}
    return weighted_total(terms, weights), terms
