"""A tiny randomly initialised CLIP (2 layers, hidden 32, 32-px images, patch 8) saved like a real
checkpoint, so tests exercise the real loading path (from_pretrained of a directory) in milliseconds."""
from __future__ import annotations

from pathlib import Path

import torch

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "models" / "clip-vit-base-patch32"


def make_tiny_clip(directory: Path, seed: int = 0, projection_dim: int = 16) -> Path:
    """Build and ``save_pretrained`` a tiny CLIPModel with its CLIPImageProcessor (and the real CLIP
    tokenizer when ../shared has it) into ``directory``; returns the directory."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    try:  # transformers 5.x without torchvision: the PIL processor (same preprocessing, saved the same way)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor

    directory = Path(directory)
    tokenizer = CLIPTokenizer.from_pretrained(SHARED_TOKENIZER, local_files_only=True) \
        if (SHARED_TOKENIZER / "vocab.json").exists() else None
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**small, "vocab_size": len(tokenizer) if tokenizer else 1000, "max_position_embeddings": 77},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
