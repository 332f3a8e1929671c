"""JDSH, Joint-modal Distribution-based Similarity Hashing (Liu, Qian, Guan, Zhan, Ying; SIGIR 2020), as its public
code runs it.

Source: github.com/KaiserLew/JDSH: ``JDSH.py`` (commit 559fd4f; ``JDSH.cal_similarity_matrix`` and
``JDSH.cal_loss``), ``main.py`` (commit 1219621; the argparse defaults that override the config file),
``config.py`` (commit 5762a24; the MIRFlickr block), ``models.py`` (commit 9f8ddb4). Per batch of m pairs::

    S_I = 2 cos(F_I, F_I) − 1,  S_T = 2 cos(F_T, F_T) − 1
    S_h = N(S_I) N(S_T)ᵀ            N = row L2-normalisation: how alike two items' similarity profiles are
    S_  = a S_I + b S_T + l (S_h + S_hᵀ)/2                         (config alpha, beta, lamb)
    left  = LOC_LEFT − ALPHA · SCALE_LEFT,  right = LOC_RIGHT + BETA · SCALE_RIGHT
    S_ij ← S_ij (1 + L1 e^{−(S_ij − MIN)})  where S_ij < left       the distribution-based weighting:
    S_ij ← S_ij (1 + L2 e^{S_ij − MAX})     where S_ij > right      push clear dissimilar / similar pairs out
    S   = μ S_                                                     (mu)

and, with B = row-normalised relaxed codes tanh(α h)::

    loss = INTRA mse(B_I B_Iᵀ, S) + [mse(B_I B_Tᵀ, S) + mse(B_T B_Iᵀ, S) − mean_i ⟨B_I,i, B_T,i⟩]
           + INTRA mse(B_T B_Tᵀ, S)

mse = ``F.mse_loss`` (mean over m² entries); α = √(epoch + 1) (``models.py`` ``set_alpha``).

Where each number comes from (MIRFLICKR, :data:`MIRFLICKR`):

* ``main.py`` argparse defaults, which replace the config values: ``--alpha`` .5, ``--beta`` .1, ``--mu`` 1.4,
  ``--Bit`` 16. (``--lamada`` .4 is written to ``config.lamada``, a misspelling the loss never reads, so
  ``lamb`` keeps the config's value.)
* ``config.py`` MIRFlickr block: lamb = .4, INTRA = .1, LR_IMG = LR_TXT = .01, MIN = −.52, MAX = .68,
  ALPHA = 2, LOC_LEFT = −.49, SCALE_LEFT = .019, BETA = 4, LOC_RIGHT = −.49, SCALE_RIGHT = .088, L1 = .1,
  L2 = .2; and for every dataset BATCH_SIZE = 32, MOMENTUM = .9, WEIGHT_DECAY = 5e-4, NUM_EPOCH = 300
  (its mu = 1.47 is overridden by main.py's 1.4). The final repository's ``main.py`` loads
  ``config/JDSH_MIRFlickr.json`` instead, which was not in the index read here; its NUS-WIDE sibling
  ``config/JDSH_NUSWIDE.json`` differs from config.py's NUS block (mu 1.33, LR_IMG .01, MAX .75, MIN −.64),
  so the MIRFLICKR JSON may differ from config.py too: a number to re-check when that file is at hand.
* Networks (``models.py``): ImgNet = trainable AlexNet to fc7 + ``fc_encode`` Linear(4096, bits); TxtNet =
  Linear(txt_feat_len, 4096), ReLU, Linear(4096, bits). SGD for both (``JDSH.py``). On precomputed image
  features only the hash layer remains (``image_hidden=()``).

What the code does that a reader of the method could miss (this module follows the code):

* The method is named after the similarity distribution its weighting decides on; in the code the thresholds
  are constants per dataset (LOC_*, SCALE_*, MIN, MAX above; a fit on that dataset, by the look of them). The
  paper was not available offline when this module was written: how it obtains them is left to check there.
* The weighting multiplies the value itself: a value below ``left`` (negative) becomes more negative, one
  above ``right`` larger; the diagonal is weighted like any entry (the ``S_mask`` lines are commented out).
  ``JDSH.py`` applies the two masks in place one after the other; with ``left`` < 0 (−.528 here) a weighted
  value below ``left`` only moves further down, so applying both to the unweighted S_ (as here) is the same.
* F_I in the target comes from the same AlexNet that is being trained, without ``detach``, so the loss also
  back-propagates through S into the features; with fixed precomputed features there is nothing to update
  there, and :func:`target` returns a tensor that carries gradients only if its inputs do.
* The cross-modal term counts both B_I B_Tᵀ and B_T B_Iᵀ (equal only when S is symmetric, which it is) and
  adds −mean_i⟨B_I,i, B_T,i⟩, a pull between the two codes of a pair, with weight 1.
* ``JDSH.py`` calls ``self.TxtNet(txt)`` as if it returned the code alone, while the ``models.py`` in the index
  returns (feat, hid, code); the shapes above are those of that ``models.py``.
* Evaluation: mAP@50 with the field's "hits-in-top-k" rule (``utils.calculate_top_map``, topk=50) every
  EVAL_INTERVAL = 40 epochs; the logged "Best" is the maximum over those test-set evaluations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._common import Training, code_products, cosine, mse, relax, weighted_total

__all__ = ["Settings", "MIRFLICKR", "joint_similarity", "weighting", "target", "loss", "relax"]


@dataclass(frozen=True, kw_only=True)
class Settings(Training):
    """JDSH's hyper-parameters (config names in brackets)."""

    a: float            # weight of S_I [alpha]
    b: float            # weight of S_T [beta]
    l: float            # weight of the joint-modal S_h [lamb]
    mu: float           # scale of the target [mu]
    intra: float        # weight of the image–image and text–text terms [INTRA]
    loc_left: float     # [LOC_LEFT]
    scale_left: float   # [SCALE_LEFT]
    k_left: float       # left = loc_left − k_left · scale_left [ALPHA]
    loc_right: float    # [LOC_RIGHT]
    scale_right: float  # [SCALE_RIGHT]
    k_right: float      # right = loc_right + k_right · scale_right [BETA]
    l1: float           # push strength below left [L1]
    l2: float           # push strength above right [L2]
    min_value: float    # [MIN]
    max_value: float    # [MAX]


MIRFLICKR = Settings(optimizer="sgd", lr_image=0.01, lr_text=0.01, momentum=0.9, weight_decay=5e-4, batch_size=32,
                     epochs=300, bits=16, image_hidden=(), text_hidden=(4096,), dropout=0.0, alpha_schedule="sqrt",
                     a=0.5, b=0.1, l=0.4, mu=1.4, intra=0.1, loc_left=-0.49, scale_left=0.019, k_left=2.0,
                     loc_right=-0.49, scale_right=0.088, k_right=4.0, l1=0.1, l2=0.2, min_value=-0.52,
                     max_value=0.68)


def joint_similarity(s_image: torch.Tensor, s_text: torch.Tensor) -> torch.Tensor:
    """(S_h + S_hᵀ)/2 with S_h = N(S_I) N(S_T)ᵀ: items whose neighbourhoods agree across the two modalities."""
    s_h = F.normalize(s_image, dim=1) @ F.normalize(s_text, dim=1).T
    return 0.5 * (s_h + s_h.T)


def weighting(s: torch.Tensor, settings: Settings) -> torch.Tensor:
    """The distribution-based weighting: values below ``left`` and above ``right`` are scaled away from the middle
    (by 1 + L1 e^{−(s − MIN)} and 1 + L2 e^{s − MAX}); the others stay."""
    left = settings.loc_left - settings.k_left * settings.scale_left
    right = settings.loc_right + settings.k_right * settings.scale_right
    low = s * (1 + settings.l1 * torch.exp(-(s - settings.min_value)))
    high = s * (1 + settings.l2 * torch.exp(s - settings.max_value))
    return torch.where(s < left, low, torch.where(s > right, high, s))


def target(image_features: torch.Tensor, text_features: torch.Tensor, settings: Settings) -> torch.Tensor:
    """The batch's target S = μ · weighting(a S_I + b S_T + l (S_h + S_hᵀ)/2), S_* = 2 cos − 1."""
    s_image = 2 * cosine(image_features) - 1
    s_text = 2 * cosine(text_features) - 1
    fused = settings.a * s_image + settings.b * s_text + settings.l * joint_similarity(s_image, s_text)
    return settings.mu * weighting(fused, settings)


def loss(image_codes: torch.Tensor, text_codes: torch.Tensor, similarity: torch.Tensor,
         settings: Settings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(INTRA·(image_image + text_text) + image_text + text_image + pair, the unweighted terms)."""
    ii, tt, it = code_products(image_codes, text_codes)
    terms = {"image_image": mse(ii, similarity), "image_text": mse(it, similarity),
             "text_image": mse(it.T, similarity), "text_text": mse(tt, similarity),
             "pair": -torch.diagonal(it).mean()}
    weights = {"image_image": settings.intra, "image_text": 1.0, "text_image": 1.0, "text_text": settings.intra,
               "pair": 1.0}
    return weighted_total(terms, weights), terms
