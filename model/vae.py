"""Latent space (docs/recipe.md §2): SD 2.x's AutoencoderKL encoder (f = 8, 4 channels) and either its image
decoder or SVD's temporal decoder (`AutoencoderKLTemporalDecoder`), decoding in chunks of frames to bound memory.

`temporal_decoder_from_sd` builds the temporal decoder from an SD 2.x VAE: the encoder, `quant_conv` and every
spatial decoder layer are copied, and the temporal layers start as the identity (each temporal ResBlock's
output conv is zero, so its AlphaBlender mixes x with x; `time_conv_out` passes the middle frame through).
One difference cannot be removed: the temporal decoder has no `post_quant_conv`, so SD's 1x1 `post_quant_conv`
is folded into `decoder.conv_in`. That is exact for the weights, and for the bias everywhere except at the
one-latent-pixel border: `conv_in` pads its input with zeros, so in SD the padded taps see 0 while the folded
bias also reaches them. No choice of weights of the stock class reproduces that (the border term is not
constant over space and the following GroupNorm/attention are not affine), so the decode equals SD's exactly
(float rounding) when `post_quant_conv` has no bias, and otherwise differs by the effect of that border term
(`fold_border_error` gives it at `conv_in`'s output; tests bound the decoded difference).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder
from diffusers.models.resnet import TemporalResnetBlock

Autoencoder = AutoencoderKL | AutoencoderKLTemporalDecoder


DECODE_CHUNK_SIZE = 14  # frames per temporal-decoder call (sgm's decoding_t for SVD)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A random AutoencoderKL with SD 2.x's layout (4 levels: f = 8, 4 latent channels, 2 ResBlocks per level,
    32 norm groups) at small widths, so it converts to a temporal decoder like the real one."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32), sample_size=64, scaling_factor=0.18215,
    ).eval()


def temporal_decoder_from_sd(vae: AutoencoderKL) -> AutoencoderKLTemporalDecoder:
    """SVD's `AutoencoderKLTemporalDecoder` from an SD 2.x `AutoencoderKL`: spatial weights copied, temporal
    layers the identity (see the module docstring for the one border term this cannot keep)."""
    config = vae.config
    required = {"layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu", "in_channels": 3,
                "out_channels": 3, "mid_block_add_attention": True, "use_quant_conv": True,
                "use_post_quant_conv": True}
    wrong = {k: config.get(k) for k, v in required.items() if config.get(k, v) != v}
    if wrong or set(config.down_block_types) != {"DownEncoderBlock2D"} or set(config.up_block_types) != {
            "UpDecoderBlock2D"}:
        raise ValueError(f"a temporal decoder needs an SD 2.x-layout VAE ({required}, plain encoder/decoder "
                         f"blocks); this one has {wrong or dict(config)}")
    temporal = AutoencoderKLTemporalDecoder(
        in_channels=3, out_channels=3, down_block_types=tuple(config.down_block_types),
        block_out_channels=tuple(config.block_out_channels), layers_per_block=2,
        latent_channels=config.latent_channels, sample_size=config.sample_size,
        scaling_factor=config.scaling_factor, force_upcast=config.force_upcast,
    )
    if vae.dtype != temporal.dtype or vae.device != temporal.device:
        temporal = temporal.to(device=vae.device, dtype=vae.dtype)
    own = temporal.state_dict()
    mapped = {}
    for key, value in vae.state_dict().items():
        if key.startswith("post_quant_conv.") or key.startswith("decoder.conv_in."):
            continue
        target = _temporal_decoder_key(key)
        if target not in own or own[target].shape != value.shape:
            raise ValueError(f"SD VAE weight {key!r} has no place in the temporal decoder ({target!r})")
        mapped[target] = value
    mapped["decoder.conv_in.weight"], mapped["decoder.conv_in.bias"] = fold_post_quant_conv(vae)
    spatial_missing = [k for k in own if k not in mapped and not is_temporal_decoder_parameter(k)]
    if spatial_missing:
        raise ValueError(f"the SD VAE lacks decoder weights for {spatial_missing[:5]}")
    temporal.load_state_dict(mapped, strict=False)
    identity_temporal_layers(temporal)
    return temporal.eval()


TEMPORAL_DECODER_MARKERS = ("temporal_res_block", "time_mixer", "time_conv_out")


def is_temporal_decoder_parameter(name: str) -> bool:
    """The temporal decoder's layers that an SD VAE does not have."""
    return any(marker in name for marker in TEMPORAL_DECODER_MARKERS)


@torch.no_grad()
def identity_temporal_layers(vae: AutoencoderKLTemporalDecoder) -> None:
    """Temporal ResBlocks add zero (output conv zeroed) and `time_conv_out` passes the middle frame through."""
    for module in vae.decoder.modules():
        if isinstance(module, TemporalResnetBlock):
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
    time_conv = vae.decoder.time_conv_out
    time_conv.weight.zero_()
    time_conv.bias.zero_()
    for channel in range(time_conv.out_channels):
        time_conv.weight[channel, channel, 1, 0, 0] = 1.0


@torch.no_grad()
def fold_post_quant_conv(vae: AutoencoderKL) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of the 3x3 conv equal to `decoder.conv_in(post_quant_conv(z))` away from the border."""
    post_weight = vae.post_quant_conv.weight[:, :, 0, 0]  # (latent, latent)
    post_bias = vae.post_quant_conv.bias
    conv_weight, conv_bias = vae.decoder.conv_in.weight, vae.decoder.conv_in.bias  # (C, latent, 3, 3)
    weight = torch.einsum("oikl,ij->ojkl", conv_weight, post_weight)
    bias = conv_bias + torch.einsum("oikl,i->o", conv_weight, post_bias)
    return weight.contiguous(), bias.contiguous()


@torch.no_grad()
def fold_border_error(vae: AutoencoderKL, height: int, width: int) -> torch.Tensor:
    """(C, height, width): folded `conv_in` minus SD's `conv_in(post_quant_conv(.))` on any latent of that size,
    i.e. the post_quant_conv bias seen through the taps that fall on zero padding (zero in the interior)."""
    inside = torch.zeros(1, vae.post_quant_conv.out_channels, height + 2, width + 2, device=vae.device,
                         dtype=vae.dtype)
    inside[:, :, 1:-1, 1:-1] = 1.0
    padding = (1 - inside) * vae.post_quant_conv.bias.reshape(1, -1, 1, 1)
    return torch.nn.functional.conv2d(padding, vae.decoder.conv_in.weight)[0]


def _temporal_decoder_key(key: str) -> str:
    """Where an SD VAE weight lives in the temporal decoder: decoder ResBlocks become `spatial_res_block`."""
    parts = key.split(".")
    if parts[0] == "decoder" and "resnets" in parts:
        index = parts.index("resnets")
        return ".".join(parts[: index + 2] + ["spatial_res_block"] + parts[index + 2 :])
    return key


def scale_factor(vae: Autoencoder) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_frames(vae: Autoencoder, frames: torch.Tensor, chunk_size: int = 8, sample: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, T, 3, H, W) in [-1, 1] -> scaled latents (B, T, 4, H/8, W/8), `chunk_size` frames at a time."""
    if frames.ndim != 5:
        raise ValueError(f"frames must be (batch, frames, 3, height, width), got {tuple(frames.shape)}")
    batch, count = frames.shape[:2]
    flat = frames.flatten(0, 1).to(vae.device, vae.dtype)
    latents = []
    for start in range(0, flat.shape[0], _check_chunk(chunk_size)):
        posterior = vae.encode(flat[start : start + chunk_size]).latent_dist
        latents.append(posterior.sample(generator) if sample else posterior.mode())
    latents = torch.cat(latents) * vae.config.scaling_factor
    return latents.reshape(batch, count, *latents.shape[1:])


@torch.no_grad()
def decode_latents(vae: Autoencoder, latents: torch.Tensor, chunk_size: int = DECODE_CHUNK_SIZE) -> torch.Tensor:
    """Scaled latents (B, T, 4, h, w) -> frames (B, T, 3, 8h, 8w) in [-1, 1], `chunk_size` frames per call.

    The temporal decoder mixes frames inside each chunk, so its chunks never straddle two videos.
    """
    if latents.ndim != 5:
        raise ValueError(f"latents must be (batch, frames, channels, height, width), got {tuple(latents.shape)}")
    _check_chunk(chunk_size)
    videos = []
    for video in latents.to(vae.device, vae.dtype) / vae.config.scaling_factor:
        frames = []
        for start in range(0, video.shape[0], chunk_size):
            chunk = video[start : start + chunk_size]
            if isinstance(vae, AutoencoderKLTemporalDecoder):
                frames.append(vae.decode(chunk, num_frames=chunk.shape[0]).sample)
            else:
                frames.append(vae.decode(chunk).sample)
        videos.append(torch.cat(frames))
    return torch.stack(videos).clamp(-1, 1)


def _check_chunk(chunk_size: int) -> int:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"decode/encode chunk size must be a positive number of frames, got {chunk_size!r}")
    return chunk_size
