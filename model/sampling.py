"""Samplers and guidance for the video model (docs/recipe.md §3), in the style of k-diffusion.

`denoiser(x, sigma, **extra)` returns D(x; sigma), the denoised estimate (model.edm applies the
preconditioning). Samplers are plain functions; guidance wraps a denoiser.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import trange

Denoiser = Callable[..., torch.Tensor]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. eq. 3)."""
    return (x - denoised) / sigma


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Deterministic Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without the
    Heun correction and without churn): what SVD samples with (docs/recipe.md §3). `x` starts at noise scaled by
    sqrt(1 + sigma_max^2); `sigmas` ends with 0."""
    extra_args = extra_args or {}
    batch_ones = x.new_ones([x.shape[0]], dtype=torch.float32)
    for i in trange(len(sigmas) - 1, disable=disable, desc="sampling"):
        sigma = sigmas[i]
        denoised = denoiser(x, sigma * batch_ones, **extra_args)
        d = to_d(x, sigma.to(x.dtype), denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "denoised": denoised})
        x = x + d * (sigmas[i + 1] - sigma).to(x.dtype)
    return x


def linear_guidance_scales(num_frames: int, min_scale: float, max_scale: float) -> torch.Tensor:
    """Classifier-free guidance that rises linearly over frames (SVD 1.0 -> 2.5, SVD-XT 1.5 -> 3.0)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return torch.linspace(min_scale, max_scale, num_frames)


class ClassifierFreeGuidance:
    """D_guided = D(x | uncond) + w_t (D(x | cond) - D(x | uncond)), one scale w_t per frame.

    Batches the conditional and unconditional passes together. `sample` is (B, T, C, H, W); the
    conditioning keyword arguments hold (2B, ...) tensors: unconditional first, then conditional.
    A constant scale (UCF-101 text-to-video uses w = 7) is a tensor of equal values.
    """

    def __init__(self, denoiser: Denoiser, frame_scales: torch.Tensor) -> None:
        self.denoiser = denoiser
        self.frame_scales = frame_scales

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conditioning) -> torch.Tensor:
        if self.frame_scales.shape[0] != x.shape[1]:
            raise ValueError(f"{self.frame_scales.shape[0]} guidance scales for {x.shape[1]} frames")
        denoised = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **conditioning)
        uncond, cond = denoised.chunk(2)
        scale = self.frame_scales.to(x.device, x.dtype).reshape(1, -1, *([1] * (x.ndim - 2)))
        return uncond + scale * (cond - uncond)
