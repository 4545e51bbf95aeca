"""How the video U-Net is conditioned (docs/recipe.md §2, §2b): micro-conditioning for every model, and SVD's image
conditioning for image-to-video. The image-to-video pipeline and the trainer both call these functions, so a
checkpoint trained here and SVD's released ones see the same numbers for the same request.

* `micro_conditioning(fps, motion_bucket_id, noise_aug_strength)` -> the U-Net's `added_time_ids`
  [fps - 1, motion_bucket_id, noise_aug_strength] (SVD trained on fps - 1; diffusers subtracts 1 too). Every
  caller passes the real frame rate; nobody else subtracts. `elevation=` appends SVD-MV's fourth id, the camera
  elevation in degrees (the paper's way, model/multiview.py).
* `clip_image_embedding(image_encoder, feature_extractor, frames)`: the conditioning frame, antialiased to
  224 x 224 (Gaussian blur, then bicubic, as diffusers does it) and CLIP-normalised, through the
  `CLIPVisionModelWithProjection`'s projection: ONE cross-attention token (B, 1, D).
* `augment_frame(frames, strength, noise)`: x + strength * noise, strength per sample.
* `conditioning_latent(vae, frames)`: the VAE latent of the (augmented) frame, `latent_dist.mode()`, NOT
  multiplied by the scaling factor (SVD's convention), repeated over the video's frames by `over_frames`.
* `ImageConditioning`: embedding + latent of a batch; `with_unconditional()` puts zeros first (what the
  unconditional branch of classifier-free guidance sees, and what training drops to); `model_input(x)`
  concatenates the latent to the noisy latents on channels (U-Net `in_channels` 8).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CLIP_IMAGE_SIZE = 224
Number = int | float


def micro_conditioning(
    fps: Number | Sequence[Number] | torch.Tensor,
    motion_bucket_id: Number | Sequence[Number] | torch.Tensor,
    noise_aug_strength: Number | Sequence[Number] | torch.Tensor,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    elevation: Number | Sequence[Number] | torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, 3) `added_time_ids` = [fps - 1, motion bucket, noise-aug strength] in SVD's order, or (B, 4) with
    the camera `elevation` (degrees) last, as SVD-MV's U-Net embeds it (model/multiview.py).

    `fps` is the video's frame rate (7 for SVD's default); each argument is a number or one value per sample.
    `batch_size` repeats scalars when no argument carries a batch."""
    values = (fps, motion_bucket_id, noise_aug_strength) + (() if elevation is None else (elevation,))
    columns = [torch.as_tensor(value, dtype=torch.float64).reshape(-1) for value in values]
    sizes = {column.numel() for column in columns if column.numel() != 1}
    if len(sizes) > 1 or (batch_size is not None and sizes and sizes != {batch_size}):
        raise ValueError(f"micro-conditioning values disagree on the batch size: "
                         f"{[c.numel() for c in columns]} (batch_size={batch_size})")
    rows = sizes.pop() if sizes else (batch_size or 1)
    if bool((columns[0] < 1).any()):
        raise ValueError(f"fps must be >= 1 (the model sees fps - 1), got {columns[0].tolist()}")
    ids = torch.stack([column.expand(rows) for column in columns], dim=1)
    ids[:, 0] -= 1
    return ids.to(device=device, dtype=dtype)


def resize_antialiased(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Downscale (B, C, H, W) without aliasing: a Gaussian blur with sigma = (factor - 1) / 2 per axis
    (reflect-padded, separable), then bicubic interpolation with aligned corners, as SVD's diffusers
    pipeline prepares its CLIP input (the kernel and sigma choices follow kornia's `resize(antialias=True)`)."""
    height, width = images.shape[-2:]
    sigmas = [max((height / size[0] - 1.0) / 2.0, 0.001), max((width / size[1] - 1.0) / 2.0, 0.001)]
    blurred = images
    for axis, sigma in ((-1, sigmas[1]), (-2, sigmas[0])):  # width first, then height
        kernel_size = int(max(4.0 * sigma, 3))
        kernel_size += 1 - kernel_size % 2  # odd
        offsets = torch.arange(kernel_size, dtype=images.dtype, device=images.device) - kernel_size // 2
        kernel = torch.exp(-offsets.pow(2) / (2 * torch.tensor(sigma, dtype=images.dtype) ** 2))
        kernel = kernel / kernel.sum()
        blurred = _blur_axis(blurred, kernel, axis)
    return F.interpolate(blurred, size=size, mode="bicubic", align_corners=True)


def _blur_axis(images: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """Depthwise 1-D convolution along height (-2) or width (-1) with reflect padding."""
    channels = images.shape[1]
    before = (kernel.numel() - 1) // 2
    after = kernel.numel() - 1 - before
    if axis == -1:
        weight, padding = kernel.reshape(1, 1, 1, -1), (before, after, 0, 0)
    else:
        weight, padding = kernel.reshape(1, 1, -1, 1), (0, 0, before, after)
    padded = F.pad(images, padding, mode="reflect")
    return F.conv2d(padded, weight.expand(channels, 1, *weight.shape[2:]), groups=channels)


def clip_pixel_values(feature_extractor, frames: torch.Tensor) -> torch.Tensor:
    """Frames (B, 3, H, W) in [-1, 1] -> the CLIP vision input: antialiased resize to 224 x 224 (the aspect
    ratio is not kept, as in SVD), then [0, 1] and the processor's mean/std normalisation."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"conditioning frames must be (batch, 3, height, width), got {tuple(frames.shape)}")
    resized = resize_antialiased(frames.float(), (CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE))
    unit = (resized + 1.0) / 2.0
    mean = torch.tensor(feature_extractor.image_mean, dtype=unit.dtype, device=unit.device).reshape(1, 3, 1, 1)
    std = torch.tensor(feature_extractor.image_std, dtype=unit.dtype, device=unit.device).reshape(1, 3, 1, 1)
    return (unit - mean) / std


def clip_image_embedding(image_encoder, feature_extractor, frames: torch.Tensor) -> torch.Tensor:
    """(B, 1, D): the projected CLIP image embedding of each (clean) conditioning frame, one context token."""
    parameter = next(image_encoder.parameters())
    pixels = clip_pixel_values(feature_extractor, frames).to(parameter.device, parameter.dtype)
    return image_encoder(pixels).image_embeds.unsqueeze(1)


def augment_frame(frames: torch.Tensor, strength: Number | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """SVD's noise augmentation of the conditioning frame: x + strength * noise, one strength per sample."""
    if noise.shape != frames.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must match the frames {tuple(frames.shape)}")
    strength = torch.as_tensor(strength, dtype=frames.dtype, device=frames.device).reshape(-1)
    if strength.numel() not in (1, frames.shape[0]):
        raise ValueError(f"{strength.numel()} noise-aug strengths for {frames.shape[0]} frames")
    return frames + strength.reshape(-1, *([1] * (frames.ndim - 1))) * noise.to(frames.device, frames.dtype)


def conditioning_latent(vae, frames: torch.Tensor) -> torch.Tensor:
    """(B, 4, H/8, W/8): the VAE posterior's mode of each frame, unscaled (SVD does not multiply the
    conditioning latent by the VAE's scaling factor, unlike the latents it denoises)."""
    return vae.encode(frames.to(vae.device, vae.dtype)).latent_dist.mode()


def over_frames(latent: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, T, C, h, w): the same conditioning latent next to every frame."""
    return latent.unsqueeze(1).expand(-1, num_frames, -1, -1, -1)


@dataclass
class ImageConditioning:
    """What the U-Net sees of the conditioning image: `embedding` (B, 1, D) as cross-attention context and
    `latent` (B, 4, h, w), concatenated to every frame's noisy latent."""

    embedding: torch.Tensor
    latent: torch.Tensor

    def with_unconditional(self) -> ImageConditioning:
        """(2B, ...): zeros (the unconditional branch) first, then the conditions, as guidance batches them."""
        return ImageConditioning(torch.cat([torch.zeros_like(self.embedding), self.embedding]),
                                 torch.cat([torch.zeros_like(self.latent), self.latent]))

    def dropped(self, keep: torch.Tensor) -> ImageConditioning:
        """Zero embedding and latent together where `keep` (B,) is False (classifier-free guidance training)."""
        keep = keep.to(self.embedding.device)
        return ImageConditioning(self.embedding * keep.reshape(-1, 1, 1).to(self.embedding.dtype),
                                 self.latent * keep.reshape(-1, 1, 1, 1).to(self.latent.dtype))

    def model_input(self, noisy: torch.Tensor) -> torch.Tensor:
        """(B, T, 4, h, w) noisy latents -> (B, T, 8, h, w) U-Net input (noisy first, then the condition)."""
        if noisy.shape[0] != self.latent.shape[0] or noisy.shape[-2:] != self.latent.shape[-2:]:
            raise ValueError(f"noisy latents {tuple(noisy.shape)} do not fit the conditioning latent "
                             f"{tuple(self.latent.shape)}")
        return torch.cat([noisy, over_frames(self.latent, noisy.shape[1]).to(noisy.dtype)], dim=2)


def encode_image_conditioning(
    image_encoder, feature_extractor, vae, frames: torch.Tensor, noise_aug_strength: Number | torch.Tensor,
    noise: torch.Tensor,
) -> ImageConditioning:
    """Everything SVD derives from the conditioning frames (B, 3, H, W) in [-1, 1]: the CLIP embedding of the
    clean frames and the unscaled VAE latent of the noise-augmented frames (`noise` drawn by the caller, so
    the pipeline can mirror diffusers' draw order and the trainer can draw per sample)."""
    embedding = clip_image_embedding(image_encoder, feature_extractor, frames)
    latent = conditioning_latent(vae, augment_frame(frames, noise_aug_strength, noise))
    return ImageConditioning(embedding=embedding, latent=latent.to(embedding.dtype))
