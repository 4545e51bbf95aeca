"""The video U-Net: temporal layers inserted into a 2D text-to-image U-Net (docs/recipe.md §2).

Built on diffusers' `UNetSpatioTemporalConditionModel`, whose blocks are sgm's VideoUNet: after every
spatial ResBlock a temporal ResBlock (Conv3d kernel (3,1,1)), inside every spatial transformer a
temporal transformer over the frames at each pixel (frame-index embedding, cross-attention to the
first frame's context), each pair blended by an AlphaBlender (`learned_with_images`, mix 0.5).
What this class adds:

* `forward(..., image_only_indicator=...)`: diffusers hard-codes the indicator to zeros; here a
  per-frame flag makes every AlphaBlender pick the spatial path exactly, so images and videos share a
  batch (stage I) and temporal parameters get exactly zero gradient from image samples.
* `from_image_unet`: inflation from an SD 2.x `UNet2DConditionModel` (object, path or hub id). Spatial
  weights are copied; the temporal output layers, the frame-index embedding and the micro-conditioning
  embedding start at zero (sgm zero-initialises the temporal ResBlock's output conv; diffusers does not),
  so at initialisation the video model on T frames equals the image model on each frame.
* presets `tiny` (CPU tests, demo) and `svd` (docs/recipe.md §2 sizes), and parameter counts on the meta device.

API: `VideoUNet.from_preset(name, **config)`, `VideoUNet.from_image_unet(unet_or_path, num_frames=14)`,
`VideoUNet.from_pretrained(path_or_hub_id, subfolder="unet")` (SVD checkpoints load as they are),
`forward(sample (B,T,C,H,W), timestep (B,) = c_noise, encoder_hidden_states (B,L,D) or per frame
(B,T,L,D), added_time_ids (B,3)
= [fps, motion_bucket_id, noise_aug_strength], image_only_indicator (B,T) or None) -> output.sample`,
`is_temporal_parameter(name)`, `parameter_counts(preset)`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNetSpatioTemporalConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import TemporalBasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - DiffusionPipeline.from_pretrained looks
from diffusers.models.resnet import SpatioTemporalResBlock, TemporalResnetBlock  # up base classes in this module
from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionOutput

from model.shared_context import install_shared_context, uses_shared_context

PRESETS: dict[str, dict[str, Any]] = {
    # Two levels, 32/64 channels: a few million parameters, seconds per step on a CPU.
    "tiny": dict(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64), addition_time_embed_dim=32, projection_class_embeddings_input_dim=96,
        layers_per_block=1, cross_attention_dim=64, num_attention_heads=(2, 4), num_frames=8,
    ),
    # docs/recipe.md §2: 320/640/1280/1280, head dim 64, cross-attention 1024 (OpenCLIP ViT-H), text-to-video input.
    "svd": dict(
        sample_size=96, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
        up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
        block_out_channels=(320, 640, 1280, 1280), addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=768, layers_per_block=2, cross_attention_dim=1024,
        num_attention_heads=(5, 10, 20, 20), num_frames=14,
    ),
}

TEMPORAL_MARKERS = ("temporal_res_block", "temporal_transformer_blocks", "time_mixer", "time_pos_embed")


def is_temporal_parameter(name: str) -> bool:
    """Parameters of the inserted temporal layers (and their blend factors)."""
    return any(marker in name for marker in TEMPORAL_MARKERS)


class VideoUNet(UNetSpatioTemporalConditionModel):
    """`UNetSpatioTemporalConditionModel` with a usable image-only path and SD inflation (see module doc).

    `spatial_resnet_eps`: GroupNorm epsilon of every spatial ResBlock. None keeps diffusers' SVD layout
    (1e-6 in down/up blocks, 1e-5 in the mid block); SD 2.x U-Nets use 1e-5 everywhere, and inflation sets
    that so the image path stays exact.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 8,
        out_channels: int = 4,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal",
        ),
        up_block_types: tuple[str, ...] = (
            "UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        addition_time_embed_dim: int = 256,
        projection_class_embeddings_input_dim: int = 768,
        layers_per_block: int | tuple[int] = 2,
        cross_attention_dim: int | tuple[int] = 1024,
        transformer_layers_per_block: int | tuple[int, tuple[tuple]] = 1,
        num_attention_heads: int | tuple[int, ...] = (5, 10, 20, 20),
        num_frames: int = 25,
        spatial_resnet_eps: float | None = None,
        camera_embedding: bool = False,
    ) -> None:
        super().__init__(
            sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            down_block_types=down_block_types, up_block_types=up_block_types, block_out_channels=block_out_channels,
            addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
            layers_per_block=layers_per_block, cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=transformer_layers_per_block, num_attention_heads=num_attention_heads,
            num_frames=num_frames,
        )
        for module in self.modules() if spatial_resnet_eps is not None else ():
            if isinstance(module, SpatioTemporalResBlock):
                module.spatial_res_block.norm1.eps = spatial_resnet_eps
                module.spatial_res_block.norm2.eps = spatial_resnet_eps
        if camera_embedding:  # SV3D-style per-frame camera (model/multiview.py): new layers diffusers does not have
            from model.camera import CameraEmbedding

            self.camera_mlp = CameraEmbedding(block_out_channels[0] * 4)
        install_shared_context(self)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VideoUNet:
        if name not in PRESETS:
            raise ValueError(f"unknown U-Net preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_image_unet(
        cls, image_unet: UNet2DConditionModel | str, num_frames: int = 14, subfolder: str | None = "unet", **kwargs
    ) -> VideoUNet:
        """Inflate an SD 2.x U-Net (object, local path or hub id with `subfolder`) into a video U-Net."""
        if not isinstance(image_unet, UNet2DConditionModel):
            image_unet = UNet2DConditionModel.from_pretrained(image_unet, subfolder=subfolder, **kwargs)
        config = image_unet.config
        heads = config.num_attention_heads or config.attention_head_dim  # SD 2.x stores heads here
        count = len(config.block_out_channels)
        heads = tuple(heads) if isinstance(heads, list | tuple) else (heads,) * count
        if config.down_block_types[-1] != "DownBlock2D" or config.up_block_types[0] != "UpBlock2D":
            raise ValueError("expected an SD-style U-Net: cross-attention blocks with a plain outermost-deep block")
        video = cls(
            sample_size=config.sample_size,
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            down_block_types=("CrossAttnDownBlockSpatioTemporal",) * (count - 1) + ("DownBlockSpatioTemporal",),
            up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * (count - 1),
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            cross_attention_dim=config.cross_attention_dim,
            num_attention_heads=heads,
            transformer_layers_per_block=config.transformer_layers_per_block,
            num_frames=num_frames,
            spatial_resnet_eps=config.norm_eps,
        )
        video.load_image_weights(image_unet.state_dict())
        return video

    def load_image_weights(self, image_state: dict[str, torch.Tensor]) -> None:
        """Copy 2D U-Net weights into the spatial layers; zero the temporal outputs; check nothing is lost."""
        own = self.state_dict()
        mapped: dict[str, torch.Tensor] = {}
        for key, value in image_state.items():
            target = _spatial_key(key)
            if target not in own:
                raise ValueError(f"image U-Net weight {key!r} has no place in the video U-Net ({target!r})")
            if own[target].shape != value.shape:
                if value.ndim == 4 and value.shape[2:] == (1, 1) and own[target].ndim == 2:
                    value = value[:, :, 0, 0]  # SD 1.x 1x1-conv projections -> linear projections
                else:
                    raise ValueError(f"shape mismatch for {key}: {tuple(value.shape)} vs {tuple(own[target].shape)}")
            mapped[target] = value
        missing = [k for k in own if k not in mapped and not is_temporal_parameter(k) and not k.startswith("add_")]
        if missing:
            raise ValueError(f"the image U-Net lacks spatial weights: {missing[:5]}")
        self.load_state_dict(mapped, strict=False)
        self.zero_init_temporal_outputs()

    @torch.no_grad()
    def zero_init_temporal_outputs(self) -> None:
        """Make every temporal path start as the identity (and the micro-conditioning as a no-op)."""
        for name, module in self.named_modules():
            if isinstance(module, TemporalResnetBlock):
                _zero(module.conv2)
            elif isinstance(module, TemporalBasicTransformerBlock):
                _zero(module.ff_in.net[-1])
                _zero(module.attn1.to_out[0])
                if module.attn2 is not None:
                    _zero(module.attn2.to_out[0])
                _zero(module.ff.net[-1])
            elif name.endswith("time_pos_embed"):
                _zero(module.linear_2)
        _zero(self.add_embedding.linear_2)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        added_time_ids: torch.Tensor,
        image_only_indicator: torch.Tensor | None = None,
        return_dict: bool = True,
        camera: torch.Tensor | None = None,
    ) -> UNetSpatioTemporalConditionOutput | tuple:
        """diffusers' forward with the caller's `image_only_indicator` (B, T): 1 = image sample, spatial only.
        `camera` (B, T, 2) [elevation, azimuth] degrees: required by, and only accepted by, a U-Net built with
        `camera_embedding=True` (its per-frame embedding is added to each frame's time embedding)."""
        if sample.ndim != 5:
            raise ValueError(f"sample must be (batch, frames, channels, height, width), got {tuple(sample.shape)}")
        batch_size, num_frames = sample.shape[:2]
        ids = self.config.projection_class_embeddings_input_dim // self.config.addition_time_embed_dim
        if tuple(added_time_ids.shape) != (batch_size, ids):
            raise ValueError(f"added_time_ids must be ({batch_size}, {ids}) [fps, motion_bucket_id, noise_aug], "
                             f"got {tuple(added_time_ids.shape)}")
        if image_only_indicator is None:
            image_only_indicator = torch.zeros(batch_size, num_frames, dtype=sample.dtype, device=sample.device)
        elif image_only_indicator.shape != (batch_size, num_frames):
            raise ValueError(f"image_only_indicator must be ({batch_size}, {num_frames}), "
                             f"got {tuple(image_only_indicator.shape)}")
        image_only_indicator = image_only_indicator.to(sample.device, sample.dtype)

        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(batch_size)
        emb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))
        time_embeds = self.add_time_proj(added_time_ids.flatten()).reshape(batch_size, -1).to(emb.dtype)
        emb = emb + self.add_embedding(time_embeds)

        sample = self.conv_in(sample.flatten(0, 1))
        emb = emb.repeat_interleave(num_frames, dim=0)
        has_camera = bool(getattr(self.config, "camera_embedding", False))
        if has_camera != (camera is not None):
            raise ValueError("this U-Net has a camera embedding: pass camera (B, T, 2)" if has_camera else
                             "camera given, but this U-Net has no camera embedding (camera_embedding=False)")
        if camera is not None:
            if tuple(camera.shape) != (batch_size, num_frames, 2):
                raise ValueError(f"camera must be ({batch_size}, {num_frames}, 2), got {tuple(camera.shape)}")
            emb = emb + self.camera_mlp(camera.to(sample.device)).to(emb.dtype)
        if encoder_hidden_states.ndim == 4:  # one context per frame (B, T, L, D), e.g. an interpolation walk
            if encoder_hidden_states.shape[:2] != (batch_size, num_frames):
                raise ValueError(f"per-frame encoder_hidden_states must start with ({batch_size}, {num_frames}), "
                                 f"got {tuple(encoder_hidden_states.shape)}")
            encoder_hidden_states = encoder_hidden_states.flatten(0, 1)
        elif not uses_shared_context(self):  # model/shared_context.py keeps one context row per video
            encoder_hidden_states = encoder_hidden_states.repeat_interleave(num_frames, dim=0)
        shared = {"temb": emb, "image_only_indicator": image_only_indicator}

        up_factor = 2**self.num_upsamplers
        forward_upsample_size = any(s % up_factor != 0 for s in sample.shape[-2:])
        skips = (sample,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, residuals = block(hidden_states=sample, encoder_hidden_states=encoder_hidden_states, **shared)
            else:
                sample, residuals = block(hidden_states=sample, **shared)
            skips += residuals
        sample = self.mid_block(hidden_states=sample, encoder_hidden_states=encoder_hidden_states, **shared)
        for index, block in enumerate(self.up_blocks):
            residuals, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            upsample_size = skips[-1].shape[2:] if forward_upsample_size and index < len(self.up_blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, res_hidden_states_tuple=residuals, upsample_size=upsample_size,
                               encoder_hidden_states=encoder_hidden_states, **shared)
            else:
                sample = block(hidden_states=sample, res_hidden_states_tuple=residuals, upsample_size=upsample_size,
                               **shared)
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        sample = sample.reshape(batch_size, num_frames, *sample.shape[1:])
        return UNetSpatioTemporalConditionOutput(sample=sample) if return_dict else (sample,)


def _spatial_key(image_key: str) -> str:
    """Where a 2D U-Net weight lives in the video U-Net: ResBlocks become `resnets.i.spatial_res_block`."""
    parts = image_key.split(".")
    if "resnets" in parts:
        index = parts.index("resnets")
        return ".".join(parts[: index + 2] + ["spatial_res_block"] + parts[index + 2 :])
    return image_key


def _zero(module: torch.nn.Module) -> None:
    for parameter in module.parameters(recurse=False):
        parameter.zero_()


def parameter_counts(preset: str = "svd") -> dict[str, int]:
    """Total and temporal parameter counts of a preset, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        unet = VideoUNet.from_preset(preset)
    total = sum(p.numel() for p in unet.parameters())
    temporal = sum(p.numel() for n, p in unet.named_parameters() if is_temporal_parameter(n))
    return {"total": total, "temporal": temporal, "spatial": total - temporal}


def inflate_input_channels(unet: VideoUNet, in_channels: int = 8) -> VideoUNet:
    """A copy of `unet` whose `conv_in` takes `in_channels` (image-to-video: 4 noisy + 4 conditioning-latent
    channels). The new channels' weights start at zero, so the output is the text-to-video model's until they
    train."""
    old = unet.config.in_channels
    if in_channels < old:
        raise ValueError(f"cannot shrink the U-Net input from {old} to {in_channels} channels")
    inflated = type(unet).from_config({**unet.config, "in_channels": in_channels})
    state = unet.state_dict()
    weight = state["conv_in.weight"]
    extra = weight.new_zeros(weight.shape[0], in_channels - old, *weight.shape[2:])
    state["conv_in.weight"] = torch.cat([weight, extra], dim=1)
    inflated.load_state_dict(state)
    return inflated.to(device=unet.device, dtype=unet.dtype)
