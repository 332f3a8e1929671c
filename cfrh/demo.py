"""The demo's choices that are not the stages' own: which CLIP to use, and where the scenes go.

The demo must run end to end on any machine, offline included. It asks for real CLIP weights
(``CLIP_MODEL``: a hub id or a local checkpoint directory); when they cannot be had it falls back
to the ViT-B/32 *architecture* with seeded random weights, and says so plainly (first and last
lines, and every report, which carry the cache manifest's warning).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
# The project's config-only ViT-B/32 (real config, no weights) as seen from a checkout's root; elsewhere absent.
SHARED_VIT_B32 = Path("../shared/models/clip-vit-base-patch32")


@dataclass
class DemoModel:
    location: str      # hub id or directory passed to the extractor
    random_init: bool  # True: untrained weights, numbers are not real retrieval quality
    reason: str        # why this model (shown to the user)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hugging Face endpoint, so an offline machine does not wait on retries."""
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover - huggingface_hub always ships with transformers
        endpoint = "https://huggingface.co"
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


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
        return DemoModel(model, False, f"pretrained weights from {model}")
    except ModelLoadError as e:
        local_error = str(e)
    if not is_dir and hub_reachable():
        try:
            resolve_clip(model, local_files_only=False)
            return DemoModel(model, False, f"pretrained weights from the hub ({model})")
        except ModelLoadError as e:
            local_error = str(e)
    why = local_error if is_dir else f"{model} is not in the local Hugging Face cache and the hub cannot be reached"
    return DemoModel(str(vit_b32_config_dir(cache_root)), True,
                     f"UNTRAINED ViT-B/32 (random weights): {why}")


def example_image(data_root: Path) -> Path:
    """The first generated scene, used as the demo's image query."""
    images = sorted((Path(data_root) / "images").glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"{data_root}/images: no generated scenes")
    return images[0]
