"""Conditioning (model/conditioning.py): micro-conditioning fps - 1, and SVD's image conditioning computed as
diffusers' StableVideoDiffusionPipeline computes it, on a real frame and a small random SVD pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

from model.conditioning import (
    ImageConditioning,
    clip_image_embedding,
    conditioning_latent,
    encode_image_conditioning,
    micro_conditioning,
    resize_antialiased,
)
from model.pipeline import TextToVideoPipeline
from tests.svd_helpers import bikes_frame, tiny_svd


@pytest.fixture(scope="module")
def svd():
    return tiny_svd(seed=3)


@pytest.fixture(scope="module")
def frame() -> torch.Tensor:
    """The bikes frame as (1, 3, 360, 640) in [-1, 1]."""
    array = np.asarray(bikes_frame(), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2 - 1


def test_micro_conditioning_is_fps_minus_one_motion_aug():
    ids = micro_conditioning(7, 127, 0.02)
    assert ids.shape == (1, 3) and torch.allclose(ids, torch.tensor([[6.0, 127.0, 0.02]]))
    per_sample = micro_conditioning(torch.tensor([8, 25]), 100, torch.tensor([0.1, 0.3]))
    assert torch.allclose(per_sample, torch.tensor([[7.0, 100.0, 0.1], [24.0, 100.0, 0.3]]))
    assert micro_conditioning(7, 127, 0.0, batch_size=4).shape == (4, 3)
    with pytest.raises(ValueError, match="batch size"):
        micro_conditioning([7, 8], [1, 2, 3], 0.0)
    with pytest.raises(ValueError, match="fps must be >= 1"):
        micro_conditioning(0, 127, 0.0)


def test_text_to_video_pipeline_passes_fps_minus_one():
    pipe = TextToVideoPipeline.from_preset("tiny", seed=0)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs["added_time_ids"]),
                                               with_kwargs=True)
    try:
        pipe("a cyclist", num_frames=2, height=32, width=32, num_inference_steps=1, fps=12, motion_bucket_id=90,
             progress=False, output_type="latent")
    finally:
        hook.remove()
    assert torch.allclose(seen[0], torch.tensor([[11.0, 90.0, 0.0]] * 2))


def test_antialiased_resize_matches_diffusers(frame):
    ours = resize_antialiased(frame, (224, 224))
    theirs = _resize_with_antialiasing(frame, (224, 224))
    assert ours.shape == (1, 3, 224, 224)
    assert torch.allclose(ours, theirs, atol=1e-6), (ours - theirs).abs().max()


def test_image_embedding_and_latent_match_diffusers(svd, frame):
    with torch.no_grad():
        embedding = clip_image_embedding(svd.image_encoder, svd.feature_extractor, frame)
        expected = svd._encode_image(bikes_frame(), "cpu", 1, False)
        latent = conditioning_latent(svd.vae, frame[..., :64, :128])
        expected_latent = svd._encode_vae_image(frame[..., :64, :128], "cpu", 1, False)
    assert embedding.shape == (1, 1, 32) and torch.allclose(embedding, expected, atol=1e-5)
    assert latent.shape == (1, 4, 8, 16) and torch.allclose(latent, expected_latent, atol=1e-6)
    assert embedding.std() > 0.01 and latent.std() > 0.01
    # unscaled: the conditioning latent is the posterior mode itself, not mode * 0.18215
    assert not torch.allclose(latent * svd.vae.config.scaling_factor, expected_latent, atol=1e-3)


def test_noise_augmentation_goes_to_the_latent_not_the_embedding(svd, frame):
    crop = frame[..., :64, :64].repeat(2, 1, 1, 1)
    noise = torch.randn(crop.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = encode_image_conditioning(svd.image_encoder, svd.feature_extractor, svd.vae, crop, 0.0, noise)
        noisy = encode_image_conditioning(svd.image_encoder, svd.feature_extractor, svd.vae, crop,
                                          torch.tensor([0.0, 0.5]), noise)
    assert torch.equal(clean.embedding, noisy.embedding)
    assert torch.allclose(clean.latent[0], noisy.latent[0]) and not torch.allclose(clean.latent[1], noisy.latent[1])


def test_guidance_batch_dropout_and_model_input():
    cond = ImageConditioning(embedding=torch.randn(2, 1, 32), latent=torch.randn(2, 4, 8, 8))
    both = cond.with_unconditional()
    assert both.embedding.shape == (4, 1, 32) and torch.equal(both.embedding[:2], torch.zeros(2, 1, 32))
    assert torch.equal(both.latent[2:], cond.latent) and torch.equal(both.latent[:2], torch.zeros(2, 4, 8, 8))
    dropped = cond.dropped(torch.tensor([True, False]))
    assert torch.equal(dropped.embedding[0], cond.embedding[0]) and not dropped.embedding[1].any()
    assert torch.equal(dropped.latent[0], cond.latent[0]) and not dropped.latent[1].any()
    noisy = torch.randn(2, 5, 4, 8, 8)
    model_input = cond.model_input(noisy)
    assert model_input.shape == (2, 5, 8, 8, 8)
    assert torch.equal(model_input[:, :, :4], noisy) and torch.equal(model_input[:, 3, 4:], cond.latent)
    with pytest.raises(ValueError, match="do not fit"):
        cond.model_input(torch.randn(2, 5, 4, 16, 16))
