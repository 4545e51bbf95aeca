"""CLIP image conditioning's encoder (docs/recipe.md §2b): SVD's `CLIPVisionModelWithProjection` with its
`CLIPImageProcessor`, loaded from a local folder, or a tiny random one for the tiny preset (no hub either way).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection


def tiny_image_encoder(projection_dim: int = 64, seed: int = 0
                       ) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """A random 2-layer CLIP vision model (224 px input, as SVD's) whose embedding fits a U-Net with
    `cross_attention_dim` = `projection_dim`, and CLIP's standard processor."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=224, patch_size=32, projection_dim=projection_dim)
    return (CLIPVisionModelWithProjection(config).eval(),
            CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}))


def load_image_encoder(path: str | Path) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """From a diffusers SVD folder (its image_encoder/ and feature_extractor/) or a CLIP vision model folder
    (config.json + weights, preprocessor_config.json beside them)."""
    root = Path(path)
    if (root / "image_encoder" / "config.json").is_file():
        encoder_dir, processor_dir = root / "image_encoder", root / "feature_extractor"
    elif (root / "config.json").is_file():
        encoder_dir, processor_dir = root, root
    else:
        raise ValueError(f"no CLIP image encoder at {path}: pass an SVD folder (image_encoder/) or a "
                         "CLIPVisionModelWithProjection folder")
    encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_dir).eval()
    has_processor = (processor_dir / "preprocessor_config.json").is_file()
    processor = CLIPImageProcessor.from_pretrained(processor_dir) if has_processor else CLIPImageProcessor()
    return encoder, processor
