"""What the three baselines share: their training settings, cosine similarities, the code products their losses
compare with the target, the field's mean-squared error, and the tanh relaxation with its α schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ALPHA_SCHEDULES = ("sqrt", "constant")


@dataclass(frozen=True, kw_only=True)
class Training:
    """How the public code trains: the optimiser and its numbers, the batch, the epochs, the networks.

    Network shapes are for precomputed features: ``image_hidden`` are the hidden widths of the image net between
    the given feature and the hash layer (DJSRH/JDSH: none, their hash layer sits on AlexNet's fc7; DGCPN: one
    layer on VGG-19's fc7), ``text_hidden`` those of the text net (every one: 4096, ReLU), ``dropout`` the rate
    after each hidden layer. ``bits`` is the code length the script runs with when none is given."""

    optimizer: str                    # "sgd" (torch.optim.SGD) everywhere
    lr_image: float
    lr_text: float
    momentum: float
    weight_decay: float
    batch_size: int                   # with drop_last=True: every batch is full
    epochs: int
    bits: int
    image_hidden: tuple[int, ...]
    text_hidden: tuple[int, ...]
    dropout: float
    alpha_schedule: str               # relaxed code tanh(α h): "sqrt" α = √(epoch + 1), "constant" α = 1


def cosine(x: torch.Tensor) -> torch.Tensor:
    """(n, d) rows → (n, n) cosine similarities, as ``F.normalize(x) @ F.normalize(x).t()`` (zero rows give 0)."""
    xn = F.normalize(x, dim=1)
    return xn @ xn.T


def code_products(image_codes: torch.Tensor, text_codes: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B_I B_Iᵀ, B_T B_Tᵀ, B_I B_Tᵀ) of the row-normalised relaxed codes: the cosines of codes that every
    baseline's loss asks to reproduce the target (the sign codes' Hamming distance is an affine map of them)."""
    b_image, b_text = F.normalize(image_codes, dim=1), F.normalize(text_codes, dim=1)
    return b_image @ b_image.T, b_text @ b_text.T, b_image @ b_text.T


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The field's reconstruction error: ``F.mse_loss``, the mean over all entries (the papers write ‖·‖²_F; the
    1/n² only rescales the learning rate)."""
    return F.mse_loss(a, b)


def alpha(epoch: int, schedule: str) -> float:
    """α of the relaxation tanh(α h) at a 0-based epoch: √(epoch + 1) (DJSRH/JDSH ``set_alpha``) or 1."""
    if schedule == "sqrt":
        return math.sqrt(epoch + 1.0)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"alpha_schedule = {schedule!r}; choose one of {', '.join(ALPHA_SCHEDULES)}")


def relax(hash_logits: torch.Tensor, epoch: int, settings: Training) -> torch.Tensor:
    """The relaxed codes tanh(α h) the losses take, from the hash layer's output h; codes are sign(h)."""
    return torch.tanh(alpha(epoch, settings.alpha_schedule) * hash_logits)


def weighted_total(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ weight × term over the weighted terms: the one value that is differentiated."""
    return torch.stack([w * terms[name] for name, w in weights.items()]).sum()
