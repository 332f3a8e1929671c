"""Train CFRH on a pipeline's feature cache and write hash codes for every item.

Reads only the cache (never images), so it is cheap to rerun. For each requested bit length:

1. build the model (:mod:`cfrh.model`) and optimiser, or restore both from the run's checkpoint;
2. per epoch: set α, then for each batch streamed from the cache (:mod:`cfrh.data`) build the
   fused similarity (:mod:`cfrh.similarity`), compute the loss terms (:mod:`cfrh.loss`), step;
   record the epoch's mean loss terms and write a checkpoint (safetensors; its JSON header holds
   epoch, config, history, optimiser settings and RNG state, so one atomic file is the truth);
3. hash every item of the cache, image codes from image features and text codes from text
   features, into ``runs/<run>/<bits>/{image_codes,text_codes}`` (packed, :func:`cfrh.codes.pack_codes`),
   save ``model.safetensors`` + ``model.json``, mark the bit length complete, drop the checkpoint.

All settings come from the pipeline's ``[train]`` table (:class:`TrainConfig`); the same seed
gives the same codes, and an interrupted run resumes where its last checkpoint left off and
ends with the same codes as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .cache import FeatureCache, describe_differences, open_pipeline_cache
from .config import ConfigError, Pipeline
from .data import PairBatches, feature_blocks, feature_mean
from .errors import CfrhError
from .loss import TERMS, LossWeights, loss_terms
from .model import ALPHA_SCHEDULES, PREPROCESS, CFRHModel, ModelSpec, alpha_for_epoch, model_files, save_model
from .similarity import REFINES, RESCALES, SCALES, fused_similarity

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
RUN_ATTR = "cfrh_run"
OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISIONS = ("float32", "bfloat16")
LR_SCHEDULES = ("constant", "cosine")
# Settings that change speed or bookkeeping but not the codes; a run may resume across them.
RESULT_NEUTRAL = ("bits", "threads", "checkpoint_every")


class TrainError(CfrhError, RuntimeError):
    """A run cannot start or resume as asked; the message says what differs and what to pass."""


@dataclass
class TrainConfig:
    """The ``[train]`` table. These are the defaults for a pipeline that sets nothing; each dataset's
    pipeline file overrides them and says where its values come from."""

    bits: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # the usual benchmark code lengths
    epochs: int = 50
    batch_size: int = 128          # UCMFH; DJSRH/JDSH use 32 (slower on CPU, no better here)
    seed: int = 0
    # optimiser: Adam (UCMFH) converges in far fewer epochs on frozen features than DJSRH/JDSH's SGD
    optimizer: str = "adam"        # "adam" | "adamw" | "sgd"
    lr_image: float = 1e-3
    lr_text: float = 1e-3
    momentum: float = 0.9          # sgd only (DJSRH/JDSH)
    weight_decay: float = 0.0      # DJSRH/JDSH use 5e-4 with SGD
    lr_schedule: str = "constant"  # "constant" | "cosine" (decays to 0 over the run)
    # architecture: one hidden layer per encoder/decoder (DJSRH/JDSH's text net has one of 4,096)
    image_hidden: list[int] = field(default_factory=lambda: [1024])
    text_hidden: list[int] = field(default_factory=lambda: [1024])
    dropout: float = 0.0
    # "none" | "l2" | "center-l2": centring first spreads cosines that are all positive (CLIP, BoW, LDA)
    # over [-1, 1]; measured on WIKI it lifts T→I mAP from .16 to .29 (64 bits), and it raises label
    # mAP of MIRFLICKR's tag cosines (.588 → .598)
    image_preprocess: str = "center-l2"
    text_preprocess: str = "center-l2"
    # relaxation: tanh(α h) with α = √(epoch+1) (DJSRH/JDSH)
    alpha_schedule: str = "sqrt"   # "sqrt" | "linear" | "constant"
    alpha_max: float = 10.0        # end value of "linear", value of "constant"
    # fused similarity S = μ(β S_I + γ S_T + η S_c): JDSH's MIRFLICKR weights (α=.5, β=.1, λ=.4)
    # "batch-std" divides the bracket by its off-diagonal std in the batch first, so μ is the target's spread
    # whatever the features' cosine spread (measured, README "Method quality": WIKI I→T +.006..+.01 and a
    # MIRFLICKR tag-split check +.02 mAP over "fixed" with JDSH's μ = 1.4; spread .5 beat .35 and .7 on both)
    similarity_scale: str = "batch-std"   # "batch-std" | "fixed" (DJSRH/JDSH: S = μ(...) as is, μ = 1.4)
    mu: float = 0.5
    beta: float = 0.5
    gamma: float = 0.1
    eta: float = 0.4
    rescale: str = "none"          # "none" | "affine" (2S−1, JDSH's code)
    refine: str = "none"           # "none" | "djsrh" (S ← (1−ρ)S + ρ S Sᵀ/n)
    refine_weight: float = 0.4     # ρ; DJSRH's η for MIRFLICKR
    # loss weights (cfrh.loss): JDSH's INTRA = 0.1 and cross = 1
    w_intra: float = 0.1
    w_cross: float = 1.0
    w_recon: float = 0.1
    w_pair: float = 0.0
    precision: str = "float32"     # "float32" | "bfloat16" (autocast of the autoencoders; codes hashed in float32)
    # data and bookkeeping
    in_memory_mb: float = 2048     # load the training split whole when it needs at most this much
    window_blocks: int = 8         # storage blocks per shuffling window when streaming
    drop_last: bool = True         # similarity needs full batches (DJSRH/JDSH drop the last one)
    threads: int = 0               # torch threads; 0 = the idle cores this process may use (auto_threads)
    checkpoint_every: int = 1      # epochs between checkpoints (the last epoch always writes one)

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
            ok = (isinstance(value, bool) if isinstance(default, bool)
                  else isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int)
                  else isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float)
                  else isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                  if isinstance(default, list) else isinstance(value, str))
            if not ok:
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
                   "similarity_scale": SCALES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{where}: train.{name} = {getattr(self, name)!r}; "
                                  f"choose one of {', '.join(allowed)}")
        if not self.bits or any(b <= 0 or b % 8 for b in self.bits):
            raise ConfigError(f"{where}: bits {self.bits} must be positive multiples of 8 (codes are stored packed)")
        for name in ("epochs", "batch_size", "checkpoint_every", "window_blocks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: train.{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError(f"{where}: train.batch_size must be at least 2 (the loss compares pairs in a batch)")

    def result_config(self) -> dict[str, Any]:
        """The settings that determine the codes (what a resumed run must share with its checkpoint)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RESULT_NEUTRAL}


def run_paths(run: str, bits: int) -> dict[str, str]:
    """Cache-relative paths of everything one run writes for one bit length."""
    base = f"runs/{run}/{bits}"
    weights, description = model_files(run, bits)
    return {"group": base, "image_codes": f"{base}/image_codes", "text_codes": f"{base}/text_codes",
            "model": weights, "model_json": description, "checkpoint": f"{base}/checkpoint.safetensors"}


# -- checkpoints ----------------------------------------------------------------------------------
def save_checkpoint(cache: FeatureCache, path: str, model: CFRHModel, optimizer: torch.optim.Optimizer,
                    epoch: int, config: dict[str, Any], history: list[dict]) -> None:
    """One atomic safetensors file: model and optimiser tensors, the rest as JSON in its header."""
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
    cache.write_bytes(path, st_save(tensors, metadata={"checkpoint": json.dumps(header)}))


def load_checkpoint(cache: FeatureCache, path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of a checkpoint written by :func:`save_checkpoint`."""
    raw = cache.read_bytes(path)
    # safetensors layout: 8-byte little-endian header length, then the JSON header with "__metadata__".
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(json.loads(raw[8:8 + n])["__metadata__"]["checkpoint"])
    if header.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{cache.url}/{path}: checkpoint format {header.get('format')!r} is not "
                         f"{CHECKPOINT_FORMAT}; rerun with --no-resume")
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


# -- pieces of the loop -----------------------------------------------------------------------------
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


def set_learning_rate(optimizer: torch.optim.Optimizer, config: TrainConfig, epoch: int) -> None:
    factor = 1.0 if config.lr_schedule == "constant" else 0.5 * (1 + math.cos(math.pi * epoch / config.epochs))
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def training_step(model: CFRHModel, optimizer: torch.optim.Optimizer, image: torch.Tensor, text: torch.Tensor,
                  alpha: float, config: TrainConfig, weights: LossWeights) -> dict[str, torch.Tensor]:
    """One batch: similarity target, both autoencoders, the loss terms, one optimiser step."""
    f_image, f_text = model.prepare_image(image), model.prepare_text(text)
    with torch.no_grad():
        target = fused_similarity(f_image, f_text, mu=config.mu, beta=config.beta, gamma=config.gamma,
                                  eta=config.eta, rescale=config.rescale, refine=config.refine,
                                  refine_weight=config.refine_weight, scale=config.similarity_scale)
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


def emit_codes(cache: FeatureCache, model: CFRHModel, paths: dict[str, str], block_rows: int = 65536) -> None:
    """Hash every item of the cache (not only the training split) into the run's code arrays."""
    n, nbytes = cache.array("image").shape[0], model.spec.bits // 8
    for modality, hash_fn in (("image", model.hash_image), ("text", model.hash_text)):
        out = cache.require_array(paths[f"{modality}_codes"], (n, nbytes), np.uint8, chunk_rows=block_rows)
        for start, block in feature_blocks(cache, modality, block_rows):
            out[start:start + block.shape[0]] = hash_fn(block)


def _format_terms(terms: dict[str, float]) -> str:
    return " ".join(f"{k} {terms[k]:.4f}" for k in (*TERMS, "total") if k in terms)


# -- the run --------------------------------------------------------------------------------------
def _run_attrs(cache: FeatureCache, run: str) -> dict[str, Any]:
    return dict(cache.run_group(run, create=True).attrs.get(RUN_ATTR, {}))


def _update_run_attrs(cache: FeatureCache, run: str, **changes: Any) -> None:
    """Merge ``changes`` (nested dicts ``history``/``complete`` key by bit length) into the run's attrs."""
    group = cache.run_group(run, create=True)
    attrs = dict(group.attrs.get(RUN_ATTR, {}))
    for key, value in changes.items():
        if isinstance(value, dict) and key in ("history", "complete"):
            attrs[key] = {**attrs.get(key, {}), **value}
        else:
            attrs[key] = value
    group.attrs[RUN_ATTR] = json.loads(json.dumps(attrs))


def _mismatch(cache: FeatureCache, what: str, have: dict, want: dict) -> TrainError:
    return TrainError(f"{cache.url}: {what} with other settings — {'; '.join(describe_differences(have, want))}. "
                      f"Pass --no-resume to start over, or --run NAME for a separate run.")


def train_bits(cache: FeatureCache, data: PairBatches, feature_means: tuple[np.ndarray, np.ndarray],
               config: TrainConfig,
               bits: int, run: str, resume: bool, on_batch: Callable[[int, dict[str, float] | None], None]) -> dict:
    """Train one bit length to completion (or resume it), emit its codes, return its summary."""
    paths = run_paths(run, bits)
    want = config.result_config()
    spec = ModelSpec(image_dim=data.image_dim, text_dim=data.text_dim, bits=bits, image_hidden=config.image_hidden,
                     text_hidden=config.text_hidden, dropout=config.dropout,
                     image_preprocess=config.image_preprocess, text_preprocess=config.text_preprocess)
    complete = _run_attrs(cache, run).get("complete", {}).get(str(bits), False)

    # Finished before: keep it if it was trained with these settings, refuse to mix otherwise.
    if resume and complete and cache.file_exists(paths["model_json"]):
        done = json.loads(cache.read_bytes(paths["model_json"]))
        if done.get("train_config") != want:
            raise _mismatch(cache, f"run {run!r} ({bits} bits) was trained", done.get("train_config", {}), want)
        history = done.get("history", [])
        return {"skipped": True, "epochs": len(history), "seconds": sum(h["seconds"] for h in history),
                "loss": history[-1] if history else {}, **{k: paths[k] for k in ("image_codes", "text_codes", "model")}}

    # Same seed → same initial weights, whatever bit lengths ran before in this process.
    torch.manual_seed(config.seed * 1_000_003 + bits)
    model = CFRHModel(spec)
    model.set_means(*feature_means)
    optimizer = make_optimizer(model, config)
    weights = LossWeights(intra=config.w_intra, cross=config.w_cross, recon=config.w_recon, pair=config.w_pair)
    start_epoch, history = 0, []
    if resume and cache.file_exists(paths["checkpoint"]):
        header, tensors = load_checkpoint(cache, paths["checkpoint"])
        if header["config"] != want:
            raise _mismatch(cache, f"the checkpoint of run {run!r} ({bits} bits) was made", header["config"], want)
        restore_checkpoint(header, tensors, model, optimizer)
        start_epoch, history = header["epoch"] + 1, header["history"]
        log.info("run %s, %d bits: resuming after epoch %d", run, bits, header["epoch"] + 1)
    _update_run_attrs(cache, run, complete={str(bits): False}, history={str(bits): history})
    on_batch(start_epoch * len(data), None)

    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        alpha = alpha_for_epoch(epoch, config.alpha_schedule, config.epochs, config.alpha_max)
        set_learning_rate(optimizer, config, epoch)
        model.train()
        sums = torch.zeros(len(TERMS) + 1, dtype=torch.float64)
        n_batches = 0
        for image, text in data.epoch(epoch):
            terms = training_step(model, optimizer, image, text, alpha, config, weights)
            sums += torch.stack([terms[k].detach() for k in (*TERMS, "total")]).double()
            n_batches += 1
            on_batch(1, {"epoch": epoch + 1, **dict(zip((*TERMS, "total"), (sums / n_batches).tolist()))})
        epoch_terms = dict(zip((*TERMS, "total"), (sums / max(1, n_batches)).tolist()))
        history.append({"epoch": epoch + 1, "alpha": alpha, "seconds": round(time.perf_counter() - t0, 4),
                        **epoch_terms})
        _update_run_attrs(cache, run, history={str(bits): history})
        if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs:
            save_checkpoint(cache, paths["checkpoint"], model, optimizer, epoch, want, history)

    model.eval()
    emit_codes(cache, model, paths)
    save_model(cache, run, model, extra={"run": run, "cache": cache.url, "train_config": want, "history": history})
    _update_run_attrs(cache, run, complete={str(bits): True})
    cache.fs.rm(cache.file_path(paths["checkpoint"]))
    return {"skipped": False, "resumed_from_epoch": start_epoch, "epochs": len(history),
            "seconds": round(sum(h["seconds"] for h in history), 3), "loss": history[-1] if history else {},
            **{k: paths[k] for k in ("image_codes", "text_codes", "model")}}


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


def train(pipeline: Pipeline, cache_root: str | None = None, bits: list[int] | None = None, run: str = "cfrh",
          resume: bool = True, progress: bool = True) -> dict:
    """Train every requested bit length of a pipeline from its cache; returns a per-bit summary."""
    where = f"{pipeline.path or pipeline.name} [train]"
    config = TrainConfig.from_dict(pipeline.train, where)
    if bits:
        config = dataclasses.replace(config, bits=[int(b) for b in bits])
        config.check(where)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", run):
        raise TrainError(f"run name {run!r}: use letters, digits, '.', '_' or '-' (it becomes a folder name)")
    cache = open_pipeline_cache(pipeline, cache_root, mode="r+")
    train_rows = cache.split("train")
    if len(train_rows) < config.batch_size and config.drop_last:
        raise TrainError(f"{cache.url}: {len(train_rows)} training rows are fewer than train.batch_size = "
                         f"{config.batch_size}; lower it with --set train.batch_size=N")

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or auto_threads())
    try:
        data = PairBatches(cache, train_rows, config.batch_size, seed=config.seed, in_memory_mb=config.in_memory_mb,
                           window_blocks=config.window_blocks, drop_last=config.drop_last)
        if data.in_memory:
            feature_means = (data.image.mean(0).numpy(), data.text.mean(0).numpy())
        else:
            feature_means = (feature_mean(cache, "image", data.rows), feature_mean(cache, "text", data.rows))
        done_bits = sorted(set(_run_attrs(cache, run).get("bits", [])) | set(config.bits))
        _update_run_attrs(cache, run, config=dataclasses.asdict(config), bits=done_bits)
        summary: dict[str, Any] = {"run": run, "cache": cache.url, "train_rows": int(len(train_rows)),
                                   "streamed": not data.in_memory, "bits": {}}
        bar = None
        if progress:
            from .cli.common import progress as make_progress  # late: the CLI package imports this module
            bar = make_progress()
            bar.start()
        try:
            for b in config.bits:
                task = bar.add_task(f"{b} bits", total=config.epochs * len(data), info="") if bar else None

                def on_batch(advance: int, terms: dict[str, float] | None, task=task) -> None:
                    if bar is not None:
                        info = f"ep {terms['epoch']}/{config.epochs} {_format_terms(terms)}" if terms else ""
                        bar.update(task, advance=advance, **({"info": info} if info else {}))

                summary["bits"][str(b)] = train_bits(cache, data, feature_means, config, b, run, resume, on_batch)
        finally:
            if bar is not None:
                bar.stop()
    finally:
        torch.set_num_threads(previous_threads)
    return summary
