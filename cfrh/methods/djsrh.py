"""DJSRH, Deep Joint-Semantics Reconstructing Hashing (Su, Zhong, Zhang; ICCV 2019), as its public code runs it.

Source: github.com/zzs1994/DJSRH (read from its copy zs-zhong/DJSRH, commit f6deff2): ``train.py``
(``Session.train``), ``settings.py``, ``models.py``. Per batch of m pairs (F_I: image features, F_T: text
features), ``train.py`` builds::

    S_I = 2 cos(F_I, F_I) − 1,  S_T = 2 cos(F_T, F_T) − 1         ("S_I = S_I * 2 - 1")
    S̃  = β S_I + (1 − β) S_T                                       ("S_tilde", BETA)
    S   = μ ((1 − η) S̃ + η S̃ S̃ᵀ / m)                               (ETA, MU; m = BATCH_SIZE)

and, with B = row-normalised relaxed codes tanh(α h) (``F.normalize(code_I)``)::

    loss = λ1 mse(B_I B_Iᵀ, S) + 1 · mse(B_I B_Tᵀ, S) + λ2 mse(B_T B_Tᵀ, S)      (LAMBDA1, LAMBDA2)

mse is ``F.mse_loss``, the mean over the m² entries. α = √(epoch + 1) (``models.py`` ``set_alpha``, epoch
0-based). Codes at test time: sign of the relaxed code. Both nets: SGD with momentum and weight decay.

Where each number comes from (``settings.py`` unless said otherwise):

* WIKI: BETA = .3, LAMBDA1 = LAMBDA2 = .3, NUM_EPOCH = 200, LR_IMG = LR_TXT = .01;
* MIRFlickr: BETA = .9, LAMBDA1 = LAMBDA2 = .1, NUM_EPOCH = 80, LR_IMG = .001, LR_TXT = .01;
* every dataset: BATCH_SIZE = 32, CODE_LEN = 64, MU = 1.5, ETA = .4, MOMENTUM = .9, WEIGHT_DECAY = 5e-4;
  the train loader has ``drop_last=True`` (``train.py``), so m is always BATCH_SIZE;
* networks (``models.py``): ImgNet = torchvision AlexNet up to fc7 (4096, after ReLU) + ``fc_encode``
  Linear(4096, CODE_LEN); TxtNet = Linear(txt_feat_len, 4096), ReLU, Linear(4096, CODE_LEN); no dropout
  besides AlexNet's own. On given (precomputed) image features only the hash layer remains: ``image_hidden=()``.
  For WIKI ``train.py`` optimises only AlexNet's classifier and ``fc_encode`` (the conv layers stay fixed).

What the code does that a reader of the method could miss (this module follows the code):

* The target's image features come from a second, frozen ImageNet AlexNet (``FeatNet_I``, eval mode), while
  the codes come from a fine-tuned one (``CodeNet_I``); with precomputed features both are the given feature.
* S_I and S_T are rescaled 2·cos − 1 before fusing (the cosines of non-negative fc7/BoW features lie in
  [0, 1]; this sends unrelated pairs to −1). The README's ablation (mAP@50 on NUS-WIDE: DJSRH-1..6) names
  β, η = .4, μ = 1.5, λ1 = λ2 = .1 and α but not this rescale; the paper itself was not available offline
  when this module was written, so check any further paper/code difference there.
* The squared Frobenius norms of the objective are means (``F.mse_loss``), i.e. divided by m².
* S̃S̃ᵀ/m divides by the constant BATCH_SIZE; with ``drop_last=True`` that is the batch's row count, which
  is what :func:`target` uses, so a partial batch gets the same normalisation.
* Evaluation is mAP@50 under the field's "hits-in-top-k" rule (``metric.calculate_top_map``, topk=50).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import Training, code_products, cosine, mse, relax, weighted_total

__all__ = ["Settings", "WIKI", "MIRFLICKR", "target", "loss", "relax"]


@dataclass(frozen=True, kw_only=True)
class Settings(Training):
    """DJSRH's hyper-parameters (names as in ``settings.py``: BETA, ETA, MU, LAMBDA1, LAMBDA2)."""

    beta: float      # weight of S_I in S̃ (S_T gets 1 − β)
    eta: float       # weight of the second-order term S̃S̃ᵀ/m
    mu: float        # scale of the target
    lambda1: float   # weight of the image–image term
    lambda2: float   # weight of the text–text term (the image–text term has weight 1)


_COMMON = dict(optimizer="sgd", momentum=0.9, weight_decay=5e-4, batch_size=32, bits=64, image_hidden=(),
               text_hidden=(4096,), dropout=0.0, alpha_schedule="sqrt", eta=0.4, mu=1.5)
WIKI = Settings(**_COMMON, beta=0.3, lambda1=0.3, lambda2=0.3, epochs=200, lr_image=0.01, lr_text=0.01)
MIRFLICKR = Settings(**_COMMON, beta=0.9, lambda1=0.1, lambda2=0.1, epochs=80, lr_image=0.001, lr_text=0.01)


def target(image_features: torch.Tensor, text_features: torch.Tensor, settings: Settings) -> torch.Tensor:
    """The batch's joint-semantics matrix S = μ((1 − η)S̃ + η S̃S̃ᵀ/m), S̃ = β(2cos_I − 1) + (1 − β)(2cos_T − 1)."""
    s_image = 2 * cosine(image_features) - 1
    s_text = 2 * cosine(text_features) - 1
    s_tilde = settings.beta * s_image + (1 - settings.beta) * s_text
    m = s_tilde.shape[0]
    return settings.mu * ((1 - settings.eta) * s_tilde + settings.eta * (s_tilde @ s_tilde.T) / m)


def loss(image_codes: torch.Tensor, text_codes: torch.Tensor, similarity: torch.Tensor,
         settings: Settings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(λ1·image_image + image_text + λ2·text_text, the unweighted terms) for relaxed codes tanh(α h)."""
    ii, tt, it = code_products(image_codes, text_codes)
    terms = {"image_image": mse(ii, similarity), "image_text": mse(it, similarity), "text_text": mse(tt, similarity)}
    weights = {"image_image": settings.lambda1, "image_text": 1.0, "text_text": settings.lambda2}
    return weighted_total(terms, weights), terms
