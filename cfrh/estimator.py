"""The CFRH estimator: fit on paired feature arrays, hash new features, save and load.

A scikit-learn-style object for anyone with their own arrays (no cache needed)::

    from cfrh import CFRH
    model = CFRH(bits=64, seed=0).fit(image_features, text_features)   # (N, D_I), (N, D_T) paired rows
    image_codes = model.hash_image(new_images)                            # (M, 8) uint8, packed bits
    model.save("out/cfrh-64"); CFRH.load("out/cfrh-64")

Settings are the pipeline ``[train]`` keys (:class:`TrainConfig`), given to the constructor. The pipeline
stage (:mod:`cfrh.training`) drives the same loop over batches streamed from a feature cache, adding
checkpoints and resume; :meth:`CFRH.fit_batches` is that shared loop. Per epoch: set α, then per batch
build the fused similarity (:mod:`cfrh.similarity`) of the prepared features, run both autoencoders
(:mod:`cfrh.model`), add the loss terms (:mod:`cfrh.loss`), step.

``train.method`` picks what the loop trains: ``cfrh`` (the default) or one of the field's baselines, ``djsrh``,
``jdsh``, ``dgcpn``, with their published settings; :mod:`cfrh.trainers` holds what differs per method (networks,
target, loss, optimiser steps per batch), so every method goes through this one loop, its checkpoints and resume.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import fsspec
import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import ConfigError
from .data import PairBatches
from .errors import CfrhError
from .locations import join
from .model import ALPHA_SCHEDULES, PREPROCESS, CFRHModel, FeatureStats, ModelSpec
from .similarity import REFINES, RESCALES, SCALES, WEIGHTINGS
from .trainers import METHOD_NAMES, PUBLISHED, SHARED_KEYS, Trainer, cfrh_step, check_overrides, trainer_for

CHECKPOINT_FORMAT = 1
MODEL_FORMAT = 1
OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISIONS = ("float32", "bfloat16")
LR_SCHEDULES = ("constant", "cosine")
# Settings that change speed or bookkeeping but not the codes; a run may resume across them.
RESULT_NEUTRAL = ("bits", "threads", "checkpoint_every")
MAX_CHECKPOINTS = 100          # checkpoint_every = 0: every epoch, or every few when a run has more epochs than this

BatchCallback = Callable[[int, dict[str, float] | None], None]   # (batches advanced, running mean loss terms)
# (0-based epoch, a function making its checkpoint, history, whether to checkpoint now)
EpochCallback = Callable[[int, Callable[[], bytes], list[dict], bool], None]


class TrainError(CfrhError, RuntimeError):
    """Training cannot start, resume or go on as asked; the message says what differs and what to pass."""


class RunMismatch(TrainError):
    """What a run already holds (a finished bit length, a checkpoint, the cache it was trained on) was made with
    other settings than asked for: starting over (``resume=False``, ``--no-resume``) is the way on."""


@dataclass
class TrainConfig:
    """The ``[train]`` table. These are the defaults for a pipeline that sets nothing, chosen by measurement on
    every real dataset here (``benchmarks/quality.py``: WIKI, WIKI with 480 training pairs, UCI Multiple
    Features, MIRFLICKR-25K's tags as two views; README "Method quality"); a pipeline file sets a key only for a
    documented exception."""

    bits: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # the usual benchmark code lengths
    # what to train: "cfrh", or a baseline with its published settings (cfrh.trainers): "djsrh" | "jdsh" | "dgcpn"
    method: str = "cfrh"
    # Training length: 50 epochs, capped at max_steps optimiser steps (whole epochs, at least one). Small sets
    # get 50 passes (480 pairs: 150 steps; WIKI's 2,173: 800), MIRFLICKR's 5,000 pairs 1,950 steps, 20,000
    # pairs 13 epochs, 200,000 one epoch (1,562 steps). Measured: a JDSH-sized 4,000 steps did not help on 480
    # or 2,173 pairs (WIKI-480 64 bits .223/.261 → .210/.245) and 800 steps matched 1,950 on the 5,000 tag pairs.
    epochs: int = 50
    max_steps: int = 2000          # 0: no cap
    batch_size: int = 128          # UCMFH; DJSRH/JDSH use 32 (slower on CPU; 64 was mixed across datasets)
    seed: int = 0
    # optimiser: Adam (UCMFH) converges in far fewer epochs on frozen features than DJSRH/JDSH's SGD
    optimizer: str = "adam"        # "adam" | "adamw" | "sgd"
    lr_image: float = 1e-3
    lr_text: float = 1e-3
    momentum: float = 0.9          # sgd only (DJSRH/JDSH)
    weight_decay: float = 0.0      # DJSRH/JDSH use 5e-4 with SGD
    lr_schedule: str = "constant"  # "constant" | "cosine" (decays to 0 over the run; measured −.005..−.01)
    # architecture: one hidden layer per encoder/decoder; the image net DJSRH/JDSH's 4,096 wide (measured: WIKI
    # +.002..+.03, WIKI-480 +.004..+.014, UCI −.02..0), the text net 1,024 (4,096 measured no better), dropout .3
    # after each hidden layer (measured: +.005..+.05 on WIKI, WIKI-480 and UCI)
    image_hidden: list[int] = field(default_factory=lambda: [4096])
    text_hidden: list[int] = field(default_factory=lambda: [1024])
    dropout: float = 0.3
    # "none" | "l2" | "center-l2" | "idf-center-l2": centring first spreads cosines that are all positive (CLIP,
    # BoW, LDA) over [-1, 1]; measured on WIKI it lifts T→I mAP from .16 to .29 (64 bits), and it raises label
    # mAP of MIRFLICKR's tag cosines (.588 → .598). Empty rows stay zero (cfrh.model.prepare_features). "idf-"
    # also weights each column by its smoothed IDF over the training rows (cfrh.model.idf_weights): rare tags and
    # visual words count for more; a column non-zero in every row (CLIP, LDA, Fourier) keeps weight 1. Measured
    # against "center-l2", 3 seeds: MIRFLICKR tag halves +.003..+.007 mAP@all at every bit length, WIKI, WIKI-480
    # and UCI −.004..+.006 (16 of 24 up; README "Method quality").
    image_preprocess: str = "idf-center-l2"
    text_preprocess: str = "idf-center-l2"
    # relaxation: tanh(α h) with α = √(stage+1): DJSRH/JDSH's √(epoch+1), over 50 equal stages of the steps
    # when a run has fewer epochs (cfrh.model.alpha_stage; UCI, 5 epochs of 100 steps: +.03 mAP@all over per-epoch)
    alpha_schedule: str = "sqrt"   # "sqrt" | "sqrt-progress" | "linear" | "constant"
    alpha_max: float = 10.0        # end value of "sqrt-progress" and "linear", value of "constant"
    # fused similarity S = μ(β S_I + γ S_T + η S_c). The bracket is divided by a spread of its off-diagonal
    # entries in the batch first, so μ is the target's spread whatever the features' cosine spread ("batch-std",
    # measured: WIKI I→T +.006..+.01 and a MIRFLICKR tag-split check +.02 over "fixed" with JDSH's μ = 1.4; .5
    # beat .35 and .7). "batch-iqr" takes the interquartile spread, which the few far-out pairs of sparse tags do
    # not inflate; μ = .45 with it is μ = .5 with the std on WIKI and UCI (spread .89–.94 of the std there).
    # Measured, 3 seeds, every dataset and bit length: MIRFLICKR tag halves +.001..+.006 mAP@all over batch-std,
    # WIKI, WIKI-480 and UCI within the seeds' spread (README "Method quality").
    # Equal weights for the two modalities: nothing unsupervised says which one to trust, and the field's
    # weights lean one way per dataset (JDSH's image-heavy .5/.1/.4: WIKI .23/.40 at 64 bits; WIKI's text-heavy
    # .2/.6/.2: UCI i→t −.05); .35/.35/.3 was within ±.005 of the best of those on each set.
    similarity_scale: str = "batch-iqr"   # "batch-iqr" | "batch-std" | "fixed" (DJSRH/JDSH: S = μ(...), μ = 1.4)
    mu: float = 0.45
    beta: float = 0.35
    gamma: float = 0.35
    eta: float = 0.3
    rescale: str = "none"          # "none" | "affine" (2S−1, JDSH's code)
    # S_c over the items' similarity profiles against this many training pairs drawn once (seeded), not against
    # the batch (JDSH; 0). Measured with 4,096: MIRFLICKR tag halves 16 bits +.000..+.002, WIKI and WIKI-480
    # within ±.002, UCI 16 bits −.006: off.
    joint_anchors: int = 0
    # DGCPN's neighbour coherence (in the batch, ρ = .3): UCI −.04..−.08, WIKI i→t +.005, t→i −.01; JDSH's
    # distribution-based weighting (batch quantiles): within ±.005 everywhere. Both off.
    refine: str = "none"           # "none" | "djsrh" (S ← (1−ρ)S + ρ S Sᵀ/n) | "dgcpn" (batch k-NN coherence)
    weighting: str = "none"        # "none" | "jdsh" (JDSH's distribution-based push, batch thresholds)
    refine_weight: float = 0.4     # ρ; DJSRH's η for MIRFLICKR
    # loss weights (cfrh.loss): JDSH's INTRA = .1, cross = 1 and its pair term −mean⟨b_I, b_T⟩ with weight 1
    # (measured: UCI +.02..+.04, WIKI +.006..+.016, WIKI-480 +.002..+.011; weight 2 helped UCI, hurt WIKI),
    # over the pairs with no empty side (MIRFLICKR tag halves: +.005 at 16 and 128 bits)
    w_intra: float = 0.1
    w_cross: float = 1.0
    w_recon: float = 0.1           # measured: 0 helps UCI (+.05 at 16 bits), hurts WIKI-480 (−.01..−.03): kept
    w_pair: float = 1.0
    precision: str = "float32"     # "float32" | "bfloat16" (autocast of the autoencoders; codes hashed in float32)
    # data and bookkeeping
    in_memory_mb: float = 2048     # load the training split whole when it needs at most this much
    window_blocks: int = 8         # storage blocks per shuffling window when streaming
    drop_last: bool = True         # similarity needs full batches (DJSRH/JDSH drop the last one)
    threads: int = 0               # torch threads; 0 = the idle cores this process may use (auto_threads)
    # epochs between checkpoints (the last epoch always writes one); 0: every epoch, at most MAX_CHECKPOINTS
    checkpoint_every: int = 0
    # a baseline's published settings changed by name ([train.djsrh] epochs = 20); CFRH ignores them
    djsrh: dict = field(default_factory=dict)
    jdsh: dict = field(default_factory=dict)
    dgcpn: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, table: dict[str, Any], where: str = "[train]") -> "TrainConfig":
        """Validate types and values; unknown keys fail with the list of known ones."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown train settings {unknown}; known: {', '.join(known)}")
        defaults = cls()
        values: dict[str, Any] = {}
        for name, value in table.items():
            default = getattr(defaults, name)
            if isinstance(default, dict):    # a baseline's sub-table, checked in check()
                values[name] = value
                continue
            ok = (isinstance(value, bool) if isinstance(default, bool)
                  else isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int)
                  else isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float)
                  else isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                  if isinstance(default, list) else isinstance(value, str))
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise ConfigError(f"{where}: train.{name} = {value!r} should be a {type(default).__name__} "
                                  f"like {default!r}")
            values[name] = float(value) if isinstance(default, float) else value
        config = cls(**values)
        config.check(where)
        return config

    def check(self, where: str = "[train]") -> None:
        choices = {"optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES, "alpha_schedule": ALPHA_SCHEDULES,
                   "image_preprocess": PREPROCESS, "text_preprocess": PREPROCESS,
                   "rescale": RESCALES, "refine": REFINES, "precision": PRECISIONS,
                   "similarity_scale": SCALES, "weighting": WEIGHTINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{where}: train.{name} = {getattr(self, name)!r}; "
                                  f"choose one of {', '.join(allowed)}")
        if not self.bits or any(b <= 0 or b % 8 for b in self.bits):
            raise ConfigError(f"{where}: bits {self.bits} must be positive multiples of 8 (codes are stored packed)")
        if self.method not in METHOD_NAMES:
            raise ConfigError(f"{where}: train.method = {self.method!r}; choose one of {', '.join(METHOD_NAMES)}")
        for method in PUBLISHED:
            problem = check_overrides(method, getattr(self, method), where)
            if problem:
                raise ConfigError(problem)
        for name in ("epochs", "batch_size", "window_blocks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "checkpoint_every", "joint_anchors"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}: train.{name} must be 0 or more, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError(f"{where}: train.batch_size must be at least 2 (the loss compares pairs in a batch)")

    def result_config(self) -> dict[str, Any]:
        """The settings that determine the codes (what a resumed run must share with its checkpoint). A baseline's
        are its own sub-table and the keys every method shares; CFRH's are the rest."""
        values = dataclasses.asdict(self)
        if self.method == "cfrh":
            keep = set(values) - set(PUBLISHED)
        else:
            keep = {"method", self.method, *SHARED_KEYS}
        return {k: v for k, v in values.items() if k in keep and k not in RESULT_NEUTRAL}


def make_optimizer(model: CFRHModel, config: TrainConfig) -> torch.optim.Optimizer:
    """One optimiser, two parameter groups (image net, text net) with their own learning rates."""
    groups = [{"params": list(model.image.parameters()), "lr": config.lr_image, "base_lr": config.lr_image},
              {"params": list(model.text.parameters()), "lr": config.lr_text, "base_lr": config.lr_text}]
    # fused=True: one pass over each parameter per step instead of one per update formula (measured
    # ~4x faster Adam step on CPU); same update rule and state layout as the default implementation.
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr_image, momentum=config.momentum,
                               weight_decay=config.weight_decay, fused=True)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=config.lr_image, weight_decay=config.weight_decay, fused=True)


def set_learning_rate(optimizer: torch.optim.Optimizer, config: TrainConfig, epoch: int,
                      epochs: int | None = None) -> None:
    epochs = epochs or config.epochs
    factor = 1.0 if config.lr_schedule == "constant" else 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def training_step(model: CFRHModel, optimizer: torch.optim.Optimizer, image: torch.Tensor, text: torch.Tensor,
                  alpha: float, config: TrainConfig, weights: Any) -> dict[str, torch.Tensor]:
    """One CFRH batch: similarity target, both autoencoders, the loss terms, one optimiser step
    (:func:`cfrh.trainers.cfrh_step`)."""
    return cfrh_step(model, optimizer, image, text, alpha, config, weights)


def epoch_batches(data: PairBatches, epoch: int, positions: bool
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(image, text, positions in the training set or None) of one epoch. With ``positions`` the data must be
    in memory: the batches are cut from the same seeded order as :meth:`PairBatches.epoch`."""
    if not positions:
        for image, text in data.epoch(epoch):
            yield image, text, None
        return
    order = torch.from_numpy(np.random.default_rng([data.seed, epoch]).permutation(len(data.rows)))
    stop = len(order) // data.batch_size * data.batch_size if data.drop_last else len(order)
    for start in range(0, stop, data.batch_size):
        idx = order[start:start + data.batch_size]
        yield data.image.index_select(0, idx), data.text.index_select(0, idx), idx


# -- checkpoints: one safetensors file, the state as tensors and the rest as JSON in its header -----------
def checkpoint_bytes(model: CFRHModel, optimizer: torch.optim.Optimizer, epoch: int, config: dict[str, Any],
                     history: list[dict]) -> bytes:
    """Model and optimiser tensors and the torch RNG state; epoch, settings and history in the header."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    header = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "config": config, "history": history,
              "param_groups": opt_state["param_groups"], "optim_scalars": scalars}
    return st_save(tensors, metadata={"checkpoint": json.dumps(header)})


def read_checkpoint(raw: bytes, where: str = "checkpoint") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of :func:`checkpoint_bytes` output."""
    # safetensors layout: 8-byte little-endian header length, then the JSON header with "__metadata__".
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(json.loads(raw[8:8 + n])["__metadata__"]["checkpoint"])
    if header.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{where}: checkpoint format {header.get('format')!r} is not {CHECKPOINT_FORMAT}; "
                         f"rerun with --no-resume")
    return header, st_load(raw)


def restore_checkpoint(header: dict, tensors: dict[str, torch.Tensor], model: CFRHModel,
                       optimizer: torch.optim.Optimizer) -> None:
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, extra in header["optim_scalars"].items():
        state.setdefault(int(idx), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": header["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])


def _cgroup_cpu_limit() -> int | None:
    """A container's CPU quota in whole cores (cgroup v2 cpu.max or v1 cfs quota), None when unlimited."""
    from pathlib import Path

    try:
        v2 = Path("/sys/fs/cgroup/cpu.max")
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
        else:
            quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
            period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def available_threads() -> int:
    """Cores this process may use: its CPU affinity, capped by a container's CPU quota. torch's own default
    counts the host's cores, which oversubscribes a CPU-limited container (threads then spin-wait)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return min(n, limit) if limit else n


def auto_threads() -> int:
    """``train.threads = 0``: the cores this process may use, less those other processes keep busy (the
    1-minute load average). Oversubscribed torch threads spin-wait on each other: on a shared 2-core machine
    with one other busy process, 2 threads trained WIKI ~10x slower than 1 (measured). The thread count does
    not change the codes (same losses and codes at 1 and 2 threads, measured)."""
    n = available_threads()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        busy = 0.0
    return max(1, min(n, round(n - busy)))


# -- the estimator ----------------------------------------------------------------------------------
def _as_features(x: Any, what: str) -> np.ndarray:
    """A finite 2-D float32 array, or one line saying what is wrong with it."""
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty 2-D array (rows = items), got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{what} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return arr


class CFRH:
    """CLIP-based Fusion-modal Reconstructing Hashing on paired image and text feature arrays.

    ``CFRH(bits=64, **settings)``: settings are :class:`TrainConfig`'s keys (the pipeline's ``[train]``
    names), validated here. After :meth:`fit` (or :meth:`load`), :meth:`hash_image` and :meth:`hash_text`
    give packed codes ``(N, bits/8) uint8`` in one Hamming space. ``CFRH(bits=64, method="djsrh")`` trains a
    baseline instead, with its published settings (:mod:`cfrh.trainers`), through the same loop."""

    def __init__(self, bits: int = 64, **settings: Any):
        if "bits" in settings:
            raise ConfigError("CFRH(bits=...) takes one code length; train several with one estimator each")
        self.bits = int(bits)
        self.config = TrainConfig.from_dict({**settings, "bits": [self.bits]}, where="CFRH()")
        self.model_: CFRHModel | None = None
        self.history_: list[dict] = []

    @property
    def trainer(self) -> Trainer:
        """What differs per method (:mod:`cfrh.trainers`); ``trainer.config`` is the settings the loop runs with."""
        return trainer_for(self.config)

    @property
    def batch_size(self) -> int:
        """The batch the method trains with (a baseline's published one, else ``train.batch_size``)."""
        return self.trainer.config.batch_size

    def checkpoint_interval(self, epochs: int) -> int:
        """Epochs between checkpoints: ``train.checkpoint_every``, or (0) every epoch of a run of up to
        MAX_CHECKPOINTS epochs, every few of a longer one (a step budget on a small training set)."""
        return self.config.checkpoint_every or max(1, math.ceil(epochs / MAX_CHECKPOINTS))

    def __repr__(self) -> str:
        changed = {k: v for k, v in dataclasses.asdict(self.config).items()
                   if k != "bits" and v != getattr(TrainConfig(), k)}
        return f"CFRH(bits={self.bits}" + "".join(f", {k}={v!r}" for k, v in changed.items()) + ")"

    def get_params(self) -> dict[str, Any]:
        """The settings that determine the codes (what a checkpoint must share to be resumed)."""
        return self.config.result_config()

    # -- training ------------------------------------------------------------------------------
    def fit(self, image_features: Any, text_features: Any) -> "CFRH":
        """Train on paired rows: ``image_features[i]`` and ``text_features[i]`` describe the same item."""
        image = _as_features(image_features, "image_features")
        text = _as_features(text_features, "text_features")
        if image.shape[0] != text.shape[0]:
            raise ValueError(f"image_features has {image.shape[0]} rows and text_features {text.shape[0]}; "
                             f"rows must be paired")
        if self.config.drop_last and image.shape[0] < self.batch_size:
            raise ValueError(f"{image.shape[0]} training pairs are fewer than batch_size = "
                             f"{self.batch_size}; pass a smaller batch_size")
        batches = PairBatches.from_arrays(image, text, self.batch_size, seed=self.config.seed,
                                          drop_last=self.config.drop_last)
        return self.fit_batches(batches, (FeatureStats.of(image), FeatureStats.of(text)))

    def fit_batches(self, data: PairBatches, feature_stats: tuple[FeatureStats, FeatureStats], *,
                    resume_from: bytes | None = None, on_batch: BatchCallback | None = None,
                    on_epoch: EpochCallback | None = None) -> "CFRH":
        """The training loop over any batch source; resumes from :func:`checkpoint_bytes` output when given.
        ``on_epoch`` gets each finished epoch with a function that makes its checkpoint."""
        trainer, bits = self.trainer, self.bits
        config, want = trainer.config, self.get_params()
        epochs = trainer.epochs(len(data))
        checkpoint_every = self.checkpoint_interval(epochs)
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(config.threads or auto_threads())
        try:
            # Same seed → same initial weights, whatever ran before in this process.
            torch.manual_seed(config.seed * 1_000_003 + bits)
            model = CFRHModel(trainer.spec(data.image_dim, data.text_dim, bits))
            trainer.init_model(model)
            model.set_feature_stats(*feature_stats)
            optimizer = make_optimizer(model, config)
            start_epoch, history = 0, []
            if resume_from is not None:
                header, tensors = read_checkpoint(resume_from)
                if header["config"] != want:
                    from .cache import describe_differences

                    raise RunMismatch("the checkpoint was made with other settings — "
                                     + "; ".join(describe_differences(header["config"], want, "checkpoint"))
                                     + ". Pass --no-resume to start over, or --run NAME for a separate run.")
                restore_checkpoint(header, tensors, model, optimizer)
                start_epoch, history = header["epoch"] + 1, list(header["history"])
            try:
                trainer.begin(data, model)
            except ValueError as e:
                raise TrainError(str(e)) from None
            if on_batch is not None:
                on_batch(start_epoch * len(data), None)
            names: list[str] = []
            for epoch in range(start_epoch, epochs):
                t0 = time.perf_counter()
                set_learning_rate(optimizer, config, epoch, epochs)
                model.train()
                sums: torch.Tensor | None = None
                n_batches = 0
                alpha = trainer.alpha(epoch, epochs, 0, len(data))
                for batch, (image, text, positions) in enumerate(epoch_batches(data, epoch, trainer.needs_positions)):
                    alpha = trainer.alpha(epoch, epochs, batch, len(data))
                    terms = trainer.step(model, optimizer, image, text, positions, alpha)
                    if sums is None:
                        names = [k for k in terms if k != "total"] + ["total"]
                        sums = torch.zeros(len(names), dtype=torch.float64)
                    sums += torch.stack([terms[k].detach().float() for k in names]).double()
                    n_batches += 1
                    if on_batch is not None:
                        on_batch(1, {"epoch": epoch + 1, **dict(zip(names, (sums / n_batches).tolist()))})
                if sums is not None and not torch.isfinite(sums).all():
                    # A NaN loss makes every later weight NaN and every code the same: stop before anything
                    # of this epoch is kept (an earlier checkpoint stays as it was).
                    bad = [n for n, v in zip(names, sums.tolist()) if not math.isfinite(v)]
                    key = "train." if trainer.name == "cfrh" else f"train.{trainer.name}."
                    raise TrainError(f"training diverged in epoch {epoch + 1} of {epochs} at {bits} bits: the loss "
                                     f"terms {', '.join(bad)} are not finite; nothing of this epoch was saved. "
                                     f"Lower the learning rates ({key}lr_image, {key}lr_text) and train again")
                means = (sums / max(1, n_batches)).tolist() if sums is not None else []
                # alpha: the epoch's last (it rises within an epoch when a run has fewer than 50)
                history.append({"epoch": epoch + 1, "alpha": alpha, "seconds": round(time.perf_counter() - t0, 4),
                                **dict(zip(names, means))})
                if on_epoch is not None:
                    save = (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs
                    on_epoch(epoch, lambda e=epoch: checkpoint_bytes(model, optimizer, e, want, history), history,
                             save)
        finally:
            torch.set_num_threads(previous_threads)
        self.model_, self.history_ = model.eval(), history
        return self

    # -- hashing -------------------------------------------------------------------------------
    def _fitted(self) -> CFRHModel:
        if self.model_ is None:
            raise ValueError("this CFRH is not fitted yet; call fit(image_features, text_features) or CFRH.load")
        return self.model_

    def hash_image(self, image_features: Any) -> np.ndarray:
        """(N, image_dim) features → (N, bits/8) packed codes sign(h_I)."""
        return self._fitted().hash_image(np.asarray(image_features))

    def hash_text(self, text_features: Any) -> np.ndarray:
        """(N, text_dim) features (e.g. bag-of-words counts) → (N, bits/8) packed codes sign(h_T)."""
        return self._fitted().hash_text(np.asarray(text_features))

    # -- storage -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> str:
        """``path/model.safetensors`` (weights, feature means, IDF column weights) then ``path/model.json`` (spec,
        settings, history; written last, it marks the model complete). ``path``: a folder or fsspec URL."""
        model = self._fitted()
        fs, root = fsspec.core.url_to_fs(str(path))
        fs.makedirs(root, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        description = {"format": MODEL_FORMAT, "bits": self.bits, "spec": dataclasses.asdict(model.spec),
                       "train_config": self.get_params(), **self.trainer.describe(), "history": self.history_,
                       **(extra or {})}
        for name, data in (("model.safetensors", st_save(state)),
                           ("model.json", json.dumps(description, indent=2).encode())):
            tmp = join(root, f"{name}.partial-{os.getpid()}")
            fs.pipe_file(tmp, data)
            fs.mv(tmp, join(root, name))
        return str(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CFRH":
        """A saved model, ready to hash (``path`` as given to :meth:`save`)."""
        fs, root = fsspec.core.url_to_fs(str(path))
        if not fs.exists(join(root, "model.json")):
            raise FileNotFoundError(f"{path}: no saved CFRH model here (model.json missing)")
        description = json.loads(fs.cat_file(join(root, "model.json")))
        if description.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path}: model format {description.get('format')!r}, this cfrh reads {MODEL_FORMAT}; "
                             f"retrain it")
        settings = {k: v for k, v in description.get("train_config", {}).items() if k not in RESULT_NEUTRAL}
        est = cls(bits=int(description["bits"]), **settings)
        model = CFRHModel(ModelSpec(**description["spec"]))
        model.load_state_dict(st_load(fs.cat_file(join(root, "model.safetensors"))))
        est.model_, est.history_ = model.eval(), list(description.get("history", []))
        est.description_ = description
        return est


