"""Latent space (docs/recipe.md §2): SD 2.x's AutoencoderKL encoder (f = 8, 4 channels) and either its image decoder
or SVD's temporal decoder (`AutoencoderKLTemporalDecoder`), decoding in chunks of frames to bound memory.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, AutoencoderKLTemporalDecoder

Autoencoder = AutoencoderKL | AutoencoderKLTemporalDecoder


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A random AutoencoderKL with SD's layout (4 levels: f = 8, 4 latent channels), small widths."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), sample_size=64, scaling_factor=0.18215,
    ).eval()


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
def decode_latents(vae: Autoencoder, latents: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
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
