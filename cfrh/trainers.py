"""What one training step of each method does: CFRH and the field's baselines, for the one training loop.

:meth:`cfrh.estimator.CFRH.fit_batches` is the only training loop; it asks a :class:`Trainer` for everything
that differs between methods:

* the settings the loop runs with (:attr:`Trainer.config`: optimiser, learning rates, batch, epochs, network
  shapes) — the ``[train]`` table for CFRH, the published settings (:mod:`cfrh.methods`) for a baseline;
* the networks (:meth:`Trainer.spec`, :meth:`Trainer.init_model`): CFRH's autoencoders, or the baselines' hash
  networks on the given features, raw (not centred), no decoder;
* once before training, anything computed over the whole training set (:meth:`Trainer.begin`: DGCPN's target);
* per batch the relaxation's α (:meth:`Trainer.alpha`), the target, the loss and the optimiser
  step(s) (:meth:`Trainer.step`: one for CFRH, DJSRH and JDSH, three for DGCPN).

Codes are sign(h) of the hash layer for every method (:meth:`cfrh.model.CFRHModel.hash_image`).

Which published settings a baseline trains with (``train.method``):

=========  ===================================================================================================
``djsrh``  :data:`cfrh.methods.djsrh.WIKI` (SGD lr .01, batch 32, 200 epochs, β = λ1 = λ2 = .3, μ = 1.5, η = .4)
``jdsh``   :data:`cfrh.methods.jdsh.MIRFLICKR` (SGD lr .01, batch 32, 300 epochs, its distribution weighting)
``dgcpn``  :data:`cfrh.methods.dgcpn.MIRFLICKR` (SGD lr .005, batch 32, 100 epochs; k and scale as fractions of
           the training set; target over the whole training set; three updates per batch)
=========  ===================================================================================================

A pipeline may change any of a baseline's settings by name in a sub-table (``[train.djsrh] epochs = 20``, or
``--set train.djsrh.epochs=20``); the ``[train]`` table's own keys are CFRH's and do not reach a baseline, except
those every method shares: ``bits``, ``seed``, ``threads``, ``in_memory_mb``, ``window_blocks``, ``drop_last``,
``checkpoint_every``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .loss import LossWeights, loss_terms
from .methods import METHODS, dgcpn, djsrh, jdsh
from .methods import alpha as baseline_alpha
from .model import CFRHModel, ModelSpec, alpha_for_epoch, alpha_stage
from .similarity import fused_similarity

if TYPE_CHECKING:  # the estimator imports this module; TrainConfig is only a type here
    from .data import PairBatches
    from .estimator import TrainConfig

# The settings every baseline runs with unless a pipeline overrides them (train.<method> sub-table).
PUBLISHED = {"djsrh": djsrh.WIKI, "jdsh": jdsh.MIRFLICKR, "dgcpn": dgcpn.MIRFLICKR}
METHOD_NAMES = ("cfrh", *PUBLISHED)
# [train] keys that reach every method; the others are CFRH's own.
# the random stream of the S_c anchors, apart from the batches' (seed, epoch) streams
ANCHOR_STREAM = 0xA2C4
SHARED_KEYS = ("bits", "seed", "threads", "in_memory_mb", "window_blocks", "drop_last", "checkpoint_every")


class Trainer:
    """CFRH: the fused similarity target, the autoencoders, :func:`cfrh.loss.loss_terms`, one step per batch."""

    name = "cfrh"
    needs_positions = False    # True: step() needs each batch's positions in the training set

    def __init__(self, config: "TrainConfig"):
        self.config = config
        self.weights = LossWeights(intra=config.w_intra, cross=config.w_cross, recon=config.w_recon,
                                   pair=config.w_pair)
        self.anchors: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- what the loop asks ------------------------------------------------------------------------
    def epochs(self, batches_per_epoch: int) -> int:
        """Epochs of this run: ``train.epochs``, fewer when they would take more than ``train.max_steps`` optimiser
        steps (the nearest whole number of epochs to max_steps, at least one)."""
        c = self.config
        if c.max_steps and c.epochs * batches_per_epoch > c.max_steps:
            return max(1, round(c.max_steps / max(1, batches_per_epoch)))
        return c.epochs

    def spec(self, image_dim: int, text_dim: int, bits: int) -> ModelSpec:
        c = self.config
        return ModelSpec(image_dim=image_dim, text_dim=text_dim, bits=bits, image_hidden=list(c.image_hidden),
                         text_hidden=list(c.text_hidden), dropout=c.dropout, image_preprocess=c.image_preprocess,
                         text_preprocess=c.text_preprocess)

    def init_model(self, model: CFRHModel) -> None:
        """Initialisation beyond torch's defaults (none for CFRH)."""

    def begin(self, data: "PairBatches", model: CFRHModel) -> None:
        """Once before the first epoch (and on resume), with the whole batch source: CFRH draws its S_c anchors
        (``train.joint_anchors`` training pairs, the same for a seed, prepared as the model prepares a batch)."""
        c = self.config
        if not (c.joint_anchors and c.eta):
            return
        n = len(data.rows)
        picked = np.sort(np.random.default_rng([c.seed, ANCHOR_STREAM]).choice(n, min(c.joint_anchors, n),
                                                                               replace=False))
        if data.in_memory:
            image, text = data.image[torch.from_numpy(picked)], data.text[torch.from_numpy(picked)]
        else:
            rows = data.rows[picked]
            image = torch.from_numpy(data.cache.read("image", rows).astype(np.float32))
            text = torch.from_numpy(data.cache.read("text", rows).astype(np.float32))
        with torch.no_grad():
            self.anchors = (model.prepare_image(image), model.prepare_text(text))

    def alpha(self, epoch: int, epochs: int, batch: int = 0, batches: int = 1) -> float:
        """α at one batch of the run: the schedule over :func:`cfrh.model.alpha_stage`'s stages."""
        c = self.config
        stage, stages = alpha_stage(epoch, epochs, batch, batches)
        return alpha_for_epoch(stage, c.alpha_schedule, stages, c.alpha_max)

    def step(self, model: CFRHModel, optimizer: torch.optim.Optimizer, image: torch.Tensor, text: torch.Tensor,
             positions: torch.Tensor | None, alpha: float) -> dict[str, torch.Tensor]:
        """One batch: similarity target, both autoencoders, the loss terms, one optimiser step."""
        return cfrh_step(model, optimizer, image, text, alpha, self.config, self.weights, self.anchors)

    def describe(self) -> dict[str, Any]:
        """The settings this method trained with, for model.json."""
        return {"method": self.name}


def cfrh_step(model: CFRHModel, optimizer: torch.optim.Optimizer, image: torch.Tensor, text: torch.Tensor,
              alpha: float, config: "TrainConfig", weights: LossWeights,
              anchors: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """CFRH's batch: fused similarity of the prepared features (S_c over ``anchors`` when given), both
    autoencoders, the loss terms, one step."""
    f_image, f_text = model.prepare_image(image), model.prepare_text(text)
    with torch.no_grad():
        target = fused_similarity(f_image, f_text, mu=config.mu, beta=config.beta, gamma=config.gamma,
                                  eta=config.eta, rescale=config.rescale, refine=config.refine,
                                  refine_weight=config.refine_weight, scale=config.similarity_scale,
                                  weighting=config.weighting, anchors=anchors)
    # bfloat16 runs the autoencoders' matmuls at the CPU's bf16 rate; similarity and loss stay float32.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bfloat16"):
        _, code_image, recon_image = model.image(f_image, alpha)
        _, code_text, recon_text = model.text(f_text, alpha)
    terms = loss_terms(code_image.float(), code_text.float(), target, recon_image.float(), f_image,
                       recon_text.float(), f_text, weights)
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    optimizer.step()
    return terms


def _only(optimizer: torch.optim.Optimizer, group: int, loss: torch.Tensor) -> None:
    """Step one parameter group (0 image, 1 text) on ``loss``: the other group has no gradient, which SGD skips
    (its momentum untouched), as the baselines' separate per-network optimisers do."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for i, g in enumerate(optimizer.param_groups):
        if i != group:
            for p in g["params"]:
                p.grad = None
    optimizer.step()


class BaselineTrainer(Trainer):
    """A baseline of :mod:`cfrh.methods` with its published settings: hash networks on the raw given features,
    its target and loss per batch, SGD as published, the final epoch's model."""

    def __init__(self, config: "TrainConfig"):
        self.user_config = config
        self.name = config.method
        self.module = METHODS[self.name]
        self.settings = dataclasses.replace(PUBLISHED[self.name], **settings_overrides(config, self.name))
        s = self.settings
        # The loop's settings: the published ones; the [train] table gives only the keys every method shares.
        self.config = dataclasses.replace(
            config, optimizer=s.optimizer, lr_image=s.lr_image, lr_text=s.lr_text, momentum=s.momentum,
            weight_decay=s.weight_decay, lr_schedule="constant", batch_size=s.batch_size, epochs=s.epochs, max_steps=0,
            image_hidden=list(s.image_hidden), text_hidden=list(s.text_hidden), dropout=s.dropout,
            image_preprocess="none", text_preprocess="none", precision="float32")
        self.full_target: torch.Tensor | None = None

    def spec(self, image_dim: int, text_dim: int, bits: int) -> ModelSpec:
        return dataclasses.replace(super().spec(image_dim, text_dim, bits), decoder=False)

    def begin(self, data: "PairBatches", model: CFRHModel) -> None:
        """Nothing before training (CFRH's anchors are CFRH's own); DGCPN overrides this."""

    def alpha(self, epoch: int, epochs: int, batch: int = 0, batches: int = 1) -> float:
        """Per epoch, as the published code."""
        return baseline_alpha(epoch, self.settings.alpha_schedule)

    def target(self, image: torch.Tensor, text: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return self.module.target(image, text, self.settings)

    def codes(self, model: CFRHModel, image: torch.Tensor, text: torch.Tensor, alpha: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
        return model.image(image, alpha)[1], model.text(text, alpha)[1]

    def step(self, model, optimizer, image, text, positions, alpha):
        with torch.no_grad():
            target = self.target(image, text, positions)
        code_image, code_text = self.codes(model, image, text, alpha)
        total, terms = self.module.loss(code_image, code_text, target, self.settings)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return {**terms, "total": total}

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "settings": dataclasses.asdict(self.settings)}


class DGCPNTrainer(BaselineTrainer):
    """DGCPN: the target over the whole training set (sliced per batch) and three updates per batch
    (:data:`cfrh.methods.dgcpn.UPDATES`): both nets on the relaxed codes, then the image net against the text
    net's sign codes, then the text net against the image net's sign codes (codes recomputed before each)."""

    needs_positions = True

    def init_model(self, model: CFRHModel) -> None:
        torch.nn.init.normal_(model.text.encoder[-1].weight, mean=0.0, std=dgcpn.TEXT_HASH_INIT_STD)

    def begin(self, data: "PairBatches", model: CFRHModel) -> None:
        if not data.in_memory:
            raise ValueError("dgcpn builds its target over the whole training set: the training split must fit in "
                             "train.in_memory_mb (raise it)")
        n = data.image.shape[0]
        if n * n * 4 / 2**20 > self.config.in_memory_mb:
            raise ValueError(f"dgcpn's training-set target for {n:,} pairs needs {n * n * 4 / 2**30:.1f} GiB; raise "
                             f"train.in_memory_mb or train on fewer pairs")
        self.full_target = dgcpn.target(data.image, data.text, self.settings)

    def target(self, image, text, positions):
        return dgcpn.batch_target(self.full_target, positions)

    def step(self, model, optimizer, image, text, positions, alpha):
        s = self.settings
        with torch.no_grad():
            target = self.target(image, text, positions)
        code_image, code_text = self.codes(model, image, text, alpha)
        total, terms = dgcpn.loss(code_image, code_text, target, s)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        # the half-binary steps: one net's relaxed codes against the other's sign codes, that net alone
        with torch.no_grad():
            sign_text = model.text(text, alpha)[1].sign()
        _only(optimizer, 0, dgcpn.loss(model.image(image, alpha)[1], sign_text, target, s)[0])
        with torch.no_grad():
            sign_image = model.image(image, alpha)[1].sign()
        _only(optimizer, 1, dgcpn.loss(sign_image, model.text(text, alpha)[1], target, s)[0])
        return {**terms, "total": total}


def settings_overrides(config: "TrainConfig", method: str) -> dict[str, Any]:
    """A baseline's ``[train.<method>]`` sub-table, with lists turned into the settings' tuples."""
    table = getattr(config, method, None) or {}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}


def check_overrides(method: str, table: Any, where: str) -> str | None:
    """Why a ``[train.<method>]`` sub-table is invalid, or None."""
    if not isinstance(table, dict):
        return f"{where}: train.{method} should be a table of {method}'s settings, got {table!r}"
    # the code length is train.bits, and DGCPN's target is over the training set by construction
    fields = {f.name for f in dataclasses.fields(PUBLISHED[method])} - {"bits", "target_scope"}
    unknown = sorted(set(table) - fields)
    if unknown:
        return f"{where}: unknown {method} settings {unknown}; known: {', '.join(sorted(fields))}"
    for key, value in table.items():
        default = getattr(PUBLISHED[method], key)
        ok = (isinstance(value, list) and all(isinstance(v, int) and v > 0 for v in value) if isinstance(default, tuple)
              else isinstance(value, str) if isinstance(default, str)
              else isinstance(value, int) and not isinstance(value, bool) and value > 0 if isinstance(default, int)
              else isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        if not ok:
            return f"{where}: train.{method}.{key} = {value!r} should be like {default!r}"
    return None


def trainer_for(config: "TrainConfig") -> Trainer:
    """The trainer of ``config.method``."""
    if config.method == "cfrh":
        return Trainer(config)
    if config.method == "dgcpn":
        return DGCPNTrainer(config)
    return BaselineTrainer(config)


__all__ = ["Trainer", "BaselineTrainer", "DGCPNTrainer", "trainer_for", "cfrh_step", "PUBLISHED", "METHOD_NAMES",
           "SHARED_KEYS", "check_overrides"]
