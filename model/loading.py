"""The one way to get a pipeline: the tiny random preset, a saved pipeline directory, or SD 2.x to inflate.

Generation, evaluation and training all load through `load_pipeline`, so dtype, device and CPU offload
mean the same everywhere. A saved directory is dispatched on its model_index.json `_class_name` through
`PIPELINE_CLASSES` (name -> module and class): our text-to-video pipeline, our image-to-video pipeline and
the diffusers name its exports carry (`StableVideoDiffusionPipeline`, so SVD downloads load too). A new
pipeline class is one entry there (or one `register_pipeline` call); its own `from_pretrained` then builds
the components.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from common.devices import pick_device
from model.folder_check import PipelineFolderError, check_finite_weights, check_pipeline_folder

DTYPES = ("float32", "bfloat16", "float16")
TINY = "tiny"

# model_index.json `_class_name` -> (module, class) of the pipeline that loads such a directory.
PIPELINE_CLASSES: dict[str, tuple[str, str]] = {
    "TextToVideoPipeline": ("model.pipeline", "TextToVideoPipeline"),
    "ImageToVideoPipeline": ("model.image_to_video", "ImageToVideoPipeline"),
    "StableVideoDiffusionPipeline": ("model.image_to_video", "ImageToVideoPipeline"),
}


def register_pipeline(class_name: str, module: str, cls: str | None = None) -> None:
    """Make `load_pipeline` load directories whose model_index.json names `class_name` with `module.cls`
    (`cls` defaults to `class_name`)."""
    PIPELINE_CLASSES[class_name] = (module, cls or class_name)


def pipeline_class(class_name: str) -> type:
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(f"unknown pipeline class {class_name!r}; known: {', '.join(sorted(PIPELINE_CLASSES))}")
    module, name = PIPELINE_CLASSES[class_name]
    return getattr(importlib.import_module(module), name)


def saved_class_name(directory: str | Path) -> str | None:
    """`_class_name` of a save_pretrained() directory, or None when `directory` has no model_index.json."""
    index = Path(directory) / "model_index.json"
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as error:
        raise PipelineFolderError(f"{index}: unreadable model_index.json ({error})") from None
    if not isinstance(data, dict):
        raise PipelineFolderError(f"{index}: must be a JSON object, got {type(data).__name__}")
    return str(data.get("_class_name"))


def saved_unet_frames(directory: str | Path) -> int | None:
    """The frame count a saved pipeline's U-Net was built for (`unet/config.json` num_frames: SVD 14, SVD-XT
    25), or None when the folder has no such config."""
    config = Path(directory) / "unet" / "config.json"
    if not config.is_file():
        return None
    try:
        frames = json.loads(config.read_text()).get("num_frames")
    except (OSError, ValueError) as error:
        raise ValueError(f"{config}: unreadable U-Net config ({error})") from None
    return int(frames) if isinstance(frames, int) and not isinstance(frames, bool) and frames > 0 else None


def load_pipeline(source: str | Path | None = TINY, *, dtype: str = "float32", device: str | None = None,
                  cpu_offload: bool = False, seed: int = 0, inflate_sd: bool = False) -> Any:
    """A pipeline from `source`:

    - None or "tiny": the random tiny TextToVideoPipeline (weights from `seed`; `dtype` not applied, it is a
      float32 test/demo model);
    - a save_pretrained() directory (a train-stage export, an SVD download): the class its model_index.json
      names (see PIPELINE_CLASSES), in `dtype`;
    - with `inflate_sd` (stage I initialisation), an SD 2.x directory or hub id: its U-Net inflated with
      temporal layers (`TextToVideoPipeline.from_sd_checkpoint`).

    `device`: None leaves the weights where they were loaded (CPU; the trainer places them itself), "auto"
    moves them to the GPU when there is one, any other value to that device. `cpu_offload` instead keeps each
    component on the CPU until it runs (diffusers' model offload)."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if source is None or str(source) == TINY:
        pipe = pipeline_class("TextToVideoPipeline").from_preset(TINY, seed=seed)
    else:
        class_name = saved_class_name(source) if Path(source).is_dir() else None
        if class_name in PIPELINE_CLASSES:
            check_pipeline_folder(source)  # one line naming the file, before diffusers reads any of it
            pipe = pipeline_class(class_name).from_pretrained(source, dtype=getattr(torch, dtype))
            check_finite_weights(pipe.components, source)
        elif inflate_sd:
            pipe = pipeline_class("TextToVideoPipeline").from_sd_checkpoint(str(source))
        elif class_name is None:
            raise ValueError(f"checkpoint {source}: not a pipeline directory (no model_index.json); pass a "
                             "train-stage export, an SVD download or a save_pretrained() directory")
        else:
            raise ValueError(f"{source}: model_index.json names {class_name!r}, not one of this project's "
                             f"pipelines ({', '.join(sorted(PIPELINE_CLASSES))})")
    return place_pipeline(pipe, device, cpu_offload)


def place_pipeline(pipe: Any, device: str | None = "auto", cpu_offload: bool = False) -> Any:
    """Put a loaded diffusers pipeline where it runs: model CPU offload, or `device` ("auto": the GPU when
    there is one; None: leave it where it is)."""
    if cpu_offload:
        pipe.enable_model_cpu_offload()
    elif device is not None:
        target = pick_device(device)
        if target != "cpu":
            pipe.to(target)
    return pipe


# ------------------------------------------------------------------- the start of a training stage


def load_initial_pipeline(init: str, seed: int = 0, conditioning: str = "text", image_encoder: str | None = None):
    """'tiny' (random tiny preset), a TextToVideoPipeline directory, or an SD 2.x checkpoint to inflate (all
    through model.loading); in image mode also a diffusers SVD folder (as it is), or any of the former turned
    into an image-to-video model."""
    from model.image_to_video import is_image_to_video_folder

    if conditioning == "image" and init != "tiny" and is_image_to_video_folder(init):
        return load_pipeline(init)
    text = load_pipeline(init, seed=seed, inflate_sd=True)
    if conditioning == "text":
        return text
    return image_to_video_from_text(text, "tiny" if init == "tiny" and image_encoder is None else image_encoder,
                                    seed=seed)


def image_to_video_from_text(text, image_encoder: str | None, seed: int = 0):
    """An image-to-video pipeline from a text-to-video one: U-Net `conv_in` 4 -> 8 channels (new ones zero),
    SD's VAE turned into the temporal decoder (identity temporal layers), and a CLIP image encoder loaded from
    `image_encoder` (an SVD folder or a CLIP vision folder; "tiny": a small random one for the tiny preset)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler

    from model.image_to_video import ImageToVideoPipeline
    from model.pipeline import SVD_SCHEDULER_CONFIG
    from model.unet import inflate_input_channels
    from model.vae import temporal_decoder_from_sd

    unet = inflate_input_channels(text.unet, 2 * text.vae.config.latent_channels)
    if image_encoder == "tiny":
        from model.image_encoder import tiny_image_encoder

        encoder, feature_extractor = tiny_image_encoder(unet.config.cross_attention_dim, seed=seed)
    elif image_encoder is None:
        raise ValueError("image-to-video training from a text-to-video checkpoint needs an image encoder: pass "
                         "image_encoder=<SVD folder or CLIPVisionModelWithProjection folder>")
    else:
        from model.image_encoder import load_image_encoder

        encoder, feature_extractor = load_image_encoder(image_encoder)
    if encoder.config.projection_dim != unet.config.cross_attention_dim:
        raise ValueError(f"the image encoder's embedding ({encoder.config.projection_dim}) does not fit the U-Net's "
                         f"cross-attention ({unet.config.cross_attention_dim})")
    vae = temporal_decoder_from_sd(text.vae) if isinstance(text.vae, AutoencoderKL) else text.vae
    return ImageToVideoPipeline(vae=vae, image_encoder=encoder, unet=unet, feature_extractor=feature_extractor,
                                scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG))
