"""EDM formulation with sigma_data = 1, as SVD trains it (docs/recipe.md §3; Karras et al. 2022, Table 1).

D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) with
c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1), c_in = 1/sqrt(sigma^2+1), c_noise = 0.25 ln sigma
(sgm's VScalingWithEDMcNoise: the network predicts v), loss weight (1+sigma^2)/sigma^2, and training
noise levels ln sigma ~ N(P_mean, P_std^2). One small class per formulation, constructor args = the
paper's table, in the style of NVlabs/edm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


class VPredictionPreconditioning:
    """SVD's preconditioning: EDM scalings with sigma_data = 1 (v-prediction) and c_noise = ln(sigma)/4."""

    def __init__(self, sigma_data: float = 1.0) -> None:
        self.sigma_data = sigma_data

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        return -sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (sigma**2 + self.sigma_data**2).sqrt()

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return 0.25 * sigma.log()

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2: unit effective loss weight."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoise(
        self, network: Callable[..., torch.Tensor], noisy: torch.Tensor, sigma: torch.Tensor, **conditioning
    ) -> torch.Tensor:
        """D(x; sigma): `network(c_in * x, c_noise, **conditioning)` wrapped in the skip/out scalings.

        `sigma` has one value per sample (batch dimension first); it broadcasts over the rest.
        """
        sigma = sigma.to(noisy.device, torch.float32)
        output = network(_broadcast(self.c_in(sigma), noisy) * noisy, self.c_noise(sigma), **conditioning)
        return _broadcast(self.c_skip(sigma), noisy) * noisy + _broadcast(self.c_out(sigma), noisy) * output


class LogNormalNoise:
    """Training noise levels: ln(sigma) ~ N(P_mean, P_std^2) (EDM; SVD stage table, docs/recipe.md §4)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        if p_std <= 0:
            raise ValueError(f"P_std must be positive, got {p_std}")
        self.p_mean = p_mean
        self.p_std = p_std

    def sample(self, count: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        normal = torch.randn(count, generator=generator, device=device)
        return (self.p_mean + self.p_std * normal.double()).exp().float()

    def sample_each(self, generators: Sequence[torch.Generator], shape: tuple[int, ...]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sigma, then one Gaussian noise tensor of `shape`, from each sample's own generator: (B,), (B, *shape).

        A sample's draw then depends on its generator alone, not on the batch it lands in (a trainer seeds
        one generator per global sample position, so splitting a batch across workers changes nothing)."""
        sigmas, noises = [], []
        for generator in generators:
            sigmas.append(self.sample(1, generator=generator))
            noises.append(torch.randn(shape, generator=generator))
        return torch.cat(sigmas), torch.stack(noises)


class EDMLoss:
    """Weighted denoising loss: lambda(sigma) * ||D(x + sigma n; sigma) - x||^2, mean over elements."""

    def __init__(self, preconditioning: VPredictionPreconditioning, noise: LogNormalNoise) -> None:
        self.preconditioning = preconditioning
        self.noise = noise

    def __call__(
        self,
        network: Callable[..., torch.Tensor],
        clean: torch.Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        sigma: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        **conditioning,
    ) -> torch.Tensor:
        """Per-sample loss (batch,); the caller reduces it (mean, or masked for padding).

        `generator`: one for the batch, or a sequence of one per sample (`LogNormalNoise.sample_each`: the draws
        do not depend on batching). `sigma` and `noise` may be given instead of drawn (a fixed validation sigma
        keeps the per-sample noise)."""
        if generator is not None and not isinstance(generator, torch.Generator):
            drawn_sigma, drawn_noise = self.noise.sample_each(generator, tuple(clean.shape[1:]))
            sigma = drawn_sigma.to(clean.device) if sigma is None else sigma
            noise = drawn_noise if noise is None else noise
        if sigma is None:
            sigma = self.noise.sample(clean.shape[0], generator=generator).to(clean.device)
        if noise is None:
            noise = torch.randn(clean.shape, generator=generator, device="cpu")
        noise = noise.to(clean.device, clean.dtype)
        noisy = clean + _broadcast(sigma, clean) * noise
        denoised = self.preconditioning.denoise(network, noisy, sigma, **conditioning)
        weight = self.preconditioning.loss_weight(sigma.to(clean.device, torch.float32))
        squared = (denoised.float() - clean.float()) ** 2
        return weight * squared.reshape(squared.shape[0], -1).mean(dim=1)


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 700.0, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5 noise levels, decreasing, with a final 0 appended (docs/recipe.md §3)."""
    if steps < 1:
        raise ValueError(f"need at least one sampling step, got {steps}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def initial_noise_scale(sigma_max: float) -> float:
    """x_T = randn * sqrt(1 + sigma_max^2): the marginal std at sigma_max for sigma_data = 1 data."""
    return math.sqrt(1.0 + sigma_max**2)
