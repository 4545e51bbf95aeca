"""model package: one module per paper concept (unet, edm, sampling, text, vae, conditioning, pipelines).

Classes are exported lazily so that `diffusers` can resolve `["model", "VideoUNet"]` entries in a saved
pipeline's model_index.json without importing torch for every `lvd` command.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"VideoUNet": "model.unet", "TextToVideoPipeline": "model.pipeline",
            "ImageToVideoPipeline": "model.image_to_video"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
