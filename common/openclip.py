"""Loading open_clip models (CLIP and CoCa) from local weights only, and turning frames into model input.

Real weights are given either as `model_name='ViT-L-14'` + `pretrained='/path/weights.bin'`, or as
`model_name='local-dir:/path'` (a folder with open_clip_config.json and the weights file, open_clip's
own format, which is also how the tests save their tiny random models). A pretrained *tag* works only
if open_clip finds it in its local cache; nothing is downloaded here on purpose.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from common.video import resize_cover_crop
from common.weights import MissingWeightsError, require_file

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")


def load_open_clip(model_name: str, pretrained: str | None, setting_prefix: str, device: str) -> tuple[Any, dict]:
    """Create an open_clip model with real weights; errors name `<setting_prefix>.model_name/pretrained`."""
    import open_clip

    if model_name.startswith("local-dir:"):
        folder = Path(model_name.removeprefix("local-dir:")).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise MissingWeightsError(
                f"`{setting_prefix}.model_name` = {model_name!r}: no open_clip_config.json in {folder}"
            )
        if not any(folder.glob(f"*{suffix}") for suffix in WEIGHT_SUFFIXES):
            raise MissingWeightsError(f"`{setting_prefix}.model_name` = {model_name!r}: no weights file in {folder}")
        model_name, pretrained = f"local-dir:{folder}", None
    elif not pretrained:
        raise MissingWeightsError(
            f"{model_name}: no weights configured; set `{setting_prefix}.pretrained` to a local weights file "
            f"or `{setting_prefix}.model_name` to 'local-dir:/folder'"
        )
    elif pretrained.endswith(WEIGHT_SUFFIXES) or "/" in pretrained:
        pretrained = str(require_file(pretrained, f"{setting_prefix}.pretrained", model_name))
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, device=device, pretrained_text=False)
    except MissingWeightsError:
        raise
    except Exception as error:
        raise MissingWeightsError(
            f"could not load {model_name} with pretrained={pretrained!r} ({type(error).__name__}: {error}); "
            f"set `{setting_prefix}.pretrained` to a local weights file (no downloads at run time)"
        ) from error
    model.eval()
    return model, open_clip.get_model_preprocess_cfg(model)


def model_input_size(preprocess_cfg: dict) -> tuple[int, int]:
    size = preprocess_cfg.get("size", 224)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_for_model(frames: np.ndarray, preprocess_cfg: dict) -> np.ndarray:
    """open_clip's eval geometry on uint8 RGB frames (N, H, W, 3): scale the short side to the model's
    size, centre-crop. Done with OpenCV on the CPU (area filter when shrinking, like PIL's antialiased
    bicubic), so clips of different sizes can be stacked into one model batch."""
    return resize_cover_crop(frames, *model_input_size(preprocess_cfg))


def frames_to_model_input(frames: np.ndarray, preprocess_cfg: dict, device: str):
    """Model-sized uint8 frames (N, h, w, 3) -> normalised float tensor (N, 3, h, w) on `device`."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), device=device)
    std = torch.tensor(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), device=device)
    return (x - mean[:, None, None]) / std[:, None, None]


def save_local_dir(model: Any, model_cfg: dict, folder: str | Path, preprocess_cfg: dict | None = None) -> Path:
    """Write `model` in open_clip's local-dir format (config json + weights) so `local-dir:` loads it."""
    import json

    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder
