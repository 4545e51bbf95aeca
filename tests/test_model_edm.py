"""EDM preconditioning, noise sampling, Karras schedule and the Euler sampler (parity with diffusers)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from model.edm import EDMLoss, LogNormalNoise, VPredictionPreconditioning, initial_noise_scale, karras_sigmas
from model.sampling import ClassifierFreeGuidance, linear_guidance_scales, sample_euler

SVD_SCHEDULER = dict(  # scheduler_config.json of stable-video-diffusion-img2vid(-xt)
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, interpolation_type="linear",
    num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
    timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
)


class TinyNet(torch.nn.Module):
    """A small deterministic network F(x, c_noise) standing in for the U-Net."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.time = torch.nn.Linear(1, 4)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x) + self.time(c_noise.reshape(-1, 1).float())[:, :, None, None])


def test_preconditioning_matches_spec_formulas():
    pre = VPredictionPreconditioning()
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0, 700.0])
    assert torch.allclose(pre.c_skip(sigma), 1 / (sigma**2 + 1))
    assert torch.allclose(pre.c_out(sigma), -sigma / torch.sqrt(sigma**2 + 1))
    assert torch.allclose(pre.c_in(sigma), 1 / torch.sqrt(sigma**2 + 1))
    assert torch.allclose(pre.c_noise(sigma), 0.25 * torch.log(sigma))
    assert torch.allclose(pre.loss_weight(sigma), (1 + sigma**2) / sigma**2)
    x = torch.randn(5, 4, 8, 8)
    zero = pre.denoise(lambda inp, c: torch.zeros_like(inp), x, sigma)
    assert torch.allclose(zero, x / (sigma**2 + 1).reshape(-1, 1, 1, 1))


def test_log_normal_noise_has_the_stage_parameters():
    sigmas = LogNormalNoise(p_mean=0.5, p_std=1.4).sample(200_000, generator=torch.Generator().manual_seed(0))
    assert sigmas.log().mean().item() == pytest.approx(0.5, abs=0.02)
    assert sigmas.log().std().item() == pytest.approx(1.4, abs=0.02)
    with pytest.raises(ValueError, match="P_std"):
        LogNormalNoise(0.0, 0.0)


def test_karras_schedule_endpoints():
    sigmas = karras_sigmas(25)
    assert len(sigmas) == 26 and sigmas[-1] == 0
    assert sigmas[0].item() == pytest.approx(700.0, rel=1e-5) and sigmas[-2].item() == pytest.approx(0.002, rel=1e-4)
    assert torch.all(sigmas[:-1] > sigmas[1:])
    assert initial_noise_scale(700.0) == pytest.approx(math.sqrt(1 + 700.0**2))


def test_edm_loss_is_zero_for_the_ideal_denoiser_and_positive_otherwise():
    pre = VPredictionPreconditioning()
    loss = EDMLoss(pre, LogNormalNoise(-1.2, 1.2))
    clean = torch.randn(3, 4, 8, 8)
    generator = torch.Generator().manual_seed(1)
    assert loss(TinyNet(), clean, generator=generator).shape == (3,)
    assert torch.all(loss(TinyNet(), clean, generator=generator) > 0)


@pytest.mark.parametrize("steps", [4, 25])
def test_euler_sampler_matches_diffusers_euler_discrete_configured_like_svd(steps):
    net, pre = TinyNet().eval(), VPredictionPreconditioning()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    ours = sample_euler(lambda x, s: pre.denoise(net, x, s), noise * initial_noise_scale(700.0),
                        karras_sigmas(steps), disable=True)

    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER)
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            latents = scheduler.step(net(model_input, t.expand(2)), t, latents).prev_sample
    assert torch.allclose(ours, latents, atol=1e-4, rtol=1e-4), (ours - latents).abs().max()


def test_guidance_rises_linearly_over_frames_and_mixes_per_frame():
    scales = linear_guidance_scales(14, 1.0, 2.5)
    assert scales[0].item() == 1.0 and scales[-1].item() == 2.5
    assert torch.allclose(scales[1:] - scales[:-1], torch.full((13,), 1.5 / 13))

    def denoiser(x, sigma, context):
        return x * 0 + context.reshape(-1, 1, 1, 1, 1)

    guided = ClassifierFreeGuidance(denoiser, linear_guidance_scales(3, 1.0, 3.0))
    out = guided(torch.zeros(1, 3, 2, 2, 2), torch.ones(1), context=torch.tensor([0.0, 1.0]))
    assert torch.allclose(out[0, :, 0, 0, 0], torch.tensor([1.0, 2.0, 3.0]))
    constant = ClassifierFreeGuidance(denoiser, torch.full((3,), 7.0))
    assert torch.allclose(constant(torch.zeros(1, 3, 1, 1, 1), torch.ones(1), context=torch.tensor([1.0, 2.0])),
                          torch.full((1, 3, 1, 1, 1), 8.0))
    with pytest.raises(ValueError, match="guidance scales"):
        guided(torch.zeros(1, 4, 1, 1, 1), torch.ones(1), context=torch.tensor([0.0, 1.0]))
