"""The demo's choices that are not the stages' own: which CLIP to use, and what data it runs on.

The demo must run end to end on any machine, offline included. It asks for real CLIP weights
(``CLIP_MODEL``: a hub id or a local checkpoint directory); when they cannot be had it falls back
to the ViT-B/32 *architecture* with seeded random weights, and says so plainly (first and last
lines, and every report, which carry the cache manifest's warning).

Data (``--data DIR``, :func:`prepare_data`): a new or empty folder, or one the demo made (its marker
``.cfrh-demo``), gets the generated scenes; a folder holding a collection the product reads — images
with a captions CSV/JSONL (the folder reader), or the COCO layout — is run through the same stages
as it is, only read (its pipeline and cache go under the cache root); any other folder is refused in
one line, and never written into.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Pipeline
from .collection import collection_reader, collection_tables, pipeline_name, pipeline_text
from .datasets.shapes import NotDemoFolder, generate_shapes, is_demo_folder

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
# The project's config-only ViT-B/32 (real config, no weights) as seen from a checkout's root; elsewhere absent.
SHARED_VIT_B32 = Path("../shared/models/clip-vit-base-patch32")


@dataclass
class DemoModel:
    location: str      # hub id or directory passed to the extractor
    random_init: bool  # True: untrained weights, numbers are not real retrieval quality
    reason: str        # why this model (shown to the user)


def hub_reachable(timeout: float = 3.0) -> bool:
    """:func:`cfrh.features.image.hub_reachable` (the one check), imported when asked so that importing the
    demo does not import torch."""
    from .features.image import hub_reachable as check

    return check(timeout)


def vit_b32_config_dir(cache_root: Path) -> Path:
    """A config-only ViT-B/32 checkpoint folder: ../shared's real files when present, else transformers'
    CLIP defaults (which are ViT-B/32: 12 layers, width 768, patch 32, 224 px, 512-d projection)."""
    if (SHARED_VIT_B32 / "config.json").is_file():
        return SHARED_VIT_B32
    from transformers import CLIPConfig, CLIPImageProcessor

    folder = Path(cache_root) / "demo-model" / "clip-vit-base-patch32-config"
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        CLIPConfig().save_pretrained(folder)
        CLIPImageProcessor().save_pretrained(folder)
    return folder


def choose_model(requested: str | None, cache_root: Path) -> DemoModel:
    """Real weights when ``requested`` (or the default hub id) can be loaded; else untrained ViT-B/32."""
    from .features.image import ModelLoadError, resolve_clip

    model = requested or DEFAULT_CLIP
    is_dir = Path(model).expanduser().is_dir()
    try:
        # Cached hub files or a local directory load without the network; only then try the hub itself.
        resolve_clip(model, local_files_only=True)
        return DemoModel(os.path.abspath(model) if is_dir else model, False, f"pretrained weights from {model}")
    except ModelLoadError as e:
        local_error = str(e)
    if not is_dir and hub_reachable():
        try:
            resolve_clip(model, local_files_only=False)
            return DemoModel(model, False, f"pretrained weights from the hub ({model})")
        except ModelLoadError as e:
            local_error = str(e)
    why = local_error if is_dir else f"{model} is not in the local Hugging Face cache and the hub cannot be reached"
    if is_dir and (Path(model).expanduser() / "config.json").is_file():   # a config without weights: its architecture
        return DemoModel(os.path.abspath(os.path.expanduser(model)), True, f"UNTRAINED {Path(model).name} "
                         f"(random weights): {why}")
    return DemoModel(os.path.abspath(vit_b32_config_dir(cache_root)), True,
                     f"UNTRAINED ViT-B/32 (random weights): {why}")


def model_settings(choice: DemoModel) -> dict[str, Any]:
    """The ``[features]`` settings that select the demo's model (directories as absolute paths, so they
    mean the same from any pipeline file)."""
    return {"image_model": choice.location, "random_init": choice.random_init,
            "local_files_only": True if choice.random_init else "auto"}


def example_image(data_root: Path) -> Path:
    """The first generated scene, used as the demo's image query."""
    images = sorted((Path(data_root) / "images").glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"{data_root}/images: no generated scenes")
    return images[0]


@dataclass
class DemoData:
    """What the demo's stages run on: the pipeline (a name or a file), its overrides, the example image
    query, and whether the collection has labels to score."""

    root: Path
    pipeline: str
    overrides: tuple[str, ...]
    example: Path
    scored: bool
    generated: bool  # True: the demo's own scenes; False: a user's collection, only read


def collection_pipeline(folder: Path, base: Pipeline, cache_root: Path, model: DemoModel) -> DemoData:
    """A pipeline for the collection in ``folder`` (:func:`cfrh.collection.collection_tables`: columns detected,
    split and batch scaled to its size), written under ``cache_root`` — never into ``folder`` — with the demo
    pipeline's training and evaluation and ``model``. Its name (``demo-<folder>-<digest of the path>``) keeps
    its cache apart from the scenes' and from another folder's."""
    tables, collection = collection_tables(folder, {**base.features, **model_settings(model)}, base.train,
                                           base.evaluate)
    name = f"demo-{pipeline_name(folder)}-{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"
    path = Path(cache_root) / "demo-pipelines" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(pipeline_text(tables, name))
    return DemoData(folder, str(path), (), collection.image_paths[0], collection.labels is not None, False)


def prepare_data(folder: Path, base: Pipeline, cache_root: Path, model: DemoModel) -> DemoData:
    """What the demo runs on in ``folder`` (the module docstring's rule): the scenes, rendered there when the
    folder is new, empty or the demo's own; the user's collection there, only read; else one line saying
    what the demo expects."""
    folder = Path(folder).resolve()
    if not folder.exists() or is_demo_folder(folder) or (folder.is_dir() and not any(folder.iterdir())):
        generate_shapes(folder)
        return DemoData(folder, base.name, (f"dataset.root={json.dumps(str(folder))}",), example_image(folder),
                        True, True)
    reader = collection_reader(folder) if folder.is_dir() else None
    if reader is None:
        raise NotDemoFolder(
            f"{folder}: holds files the demo did not make and no collection it can read; give --data a new or "
            f"empty folder (the demo renders its scenes there), or a folder with images and one captions CSV/JSONL "
            f"(fields image, text or tags, optional labels) or the COCO layout (annotations/captions_*.json) — the "
            f"demo only reads such a folder")
    return collection_pipeline(folder, base, cache_root, model)
