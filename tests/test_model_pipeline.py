"""Text-to-video pipeline: tiny end-to-end generation, save/load round trip, SD 2.x loading, VAE chunking."""

from __future__ import annotations

import math

import av
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder, UNet2DConditionModel

from common.video import save_video
from model.conditioning import micro_conditioning
from model.edm import VPredictionPreconditioning, karras_sigmas
from model.pipeline import TextToVideoPipeline
from model.sampling import ClassifierFreeGuidance, linear_guidance_scales, sample_euler
from model.text import encode_prompts
from model.vae import decode_latents, encode_frames, tiny_vae

STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    return TextToVideoPipeline.from_preset("tiny", seed=0)


def _generate(pipeline, **kwargs):
    return pipeline(["a cyclist on a street", "a rabbit in a meadow"], num_frames=8, num_inference_steps=STEPS,
                    generator=torch.Generator().manual_seed(0), progress=False, **kwargs).frames


def test_tiny_generation_to_mp4_and_gif(pipe, tmp_path):
    frames = _generate(pipe)
    assert frames.shape == (2, 8, 64, 64, 3) and frames.dtype == np.uint8
    assert frames.std() > 1.0  # not a constant image
    mp4 = save_video(frames[0], tmp_path / "a.mp4", fps=8)
    with av.open(str(mp4)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 8 and decoded[0].shape == (64, 64, 3)
    gif = save_video(frames[0], tmp_path / "a.gif", fps=8)
    assert gif.read_bytes()[:6] in (b"GIF89a", b"GIF87a")


def test_save_and_load_round_trip_is_exact(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = TextToVideoPipeline.from_pretrained(tmp_path / "ckpt")
    assert type(loaded.unet).__name__ == "VideoUNet"
    assert np.array_equal(_generate(pipe), _generate(loaded))


def test_guidance_and_conditioning_change_the_output(pipe):
    base = _generate(pipe, guidance_scale=(1.0, 2.5))
    assert not np.array_equal(base, _generate(pipe, guidance_scale=7.0))
    assert not np.array_equal(base, _generate(pipe, fps=25))


def test_bad_inputs_are_clear(pipe, tmp_path):
    with pytest.raises(ValueError, match="prompt list is empty"):
        pipe([], num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe("x", height=60, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe("x", num_frames=8, latents=torch.zeros(1, 4, 4, 8, 8), num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="chunk size"):
        pipe("x", num_frames=2, num_inference_steps=1, decode_chunk_size=0, progress=False)
    with pytest.raises(ValueError, match="negative prompts"):
        pipe(["a", "b"], negative_prompt=["c"], num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="unsupported video extension"):
        save_video(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "a.avi")
    with pytest.raises(ValueError, match="only the 'tiny' preset"):
        TextToVideoPipeline.from_preset("svd")


def test_vae_chunking_does_not_change_image_decoder_output():
    vae = tiny_vae()
    frames = torch.rand(1, 5, 3, 64, 64) * 2 - 1
    latents = encode_frames(vae, frames, chunk_size=2)
    assert torch.allclose(decode_latents(vae, latents, chunk_size=2), decode_latents(vae, latents, chunk_size=5),
                          atol=1e-4)


def test_temporal_decoder_decodes_in_chunks():
    torch.manual_seed(0)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=(32, 32, 32, 32), layers_per_block=1, latent_channels=4,
                                       down_block_types=("DownEncoderBlock2D",) * 4).eval()
    latents = torch.randn(1, 6, 4, 8, 8)
    out = decode_latents(vae, latents, chunk_size=3)
    assert out.shape == (1, 6, 3, 64, 64)


def test_stage_one_initialisation_from_an_sd_checkpoint(pipe, tmp_path):
    """An SD 2.x-layout checkpoint on disk (tiny, random) loads through the real-weight code path."""
    torch.manual_seed(0)
    image_unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
    )
    root = tmp_path / "sd21"
    image_unet.save_pretrained(root / "unet")
    pipe.vae.save_pretrained(root / "vae")
    pipe.text_encoder.save_pretrained(root / "text_encoder")
    pipe.tokenizer.save_pretrained(root / "tokenizer")
    video = TextToVideoPipeline.from_sd_checkpoint(str(root), num_frames=8)
    frames = video("a prompt", num_frames=8, num_inference_steps=2, progress=False).frames
    assert frames.shape == (1, 8, 64, 64, 3)
    with pytest.raises(OSError):
        TextToVideoPipeline.from_sd_checkpoint(str(tmp_path / "missing"))


def test_generation_is_the_edm_euler_sampler_written_out(pipe):
    """The pipeline's steps (check_inputs, prepare_context, prepare_latents, sampling, decode) compute exactly
    what the building blocks give when chained by hand: text context unconditional first, CPU noise times
    sqrt(1 + sigma_max^2), EDM-preconditioned U-Net under frame-wise CFG, Euler on the Karras schedule."""
    prompts, frames, steps = ["a cyclist", "a rabbit"], 4, 2
    got = pipe(prompts, negative_prompt="blurry", num_frames=frames, num_inference_steps=steps,
               guidance_scale=(1.0, 2.5), fps=12, generator=torch.Generator().manual_seed(3), progress=False,
               output_type="latent").frames
    context = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["blurry", "blurry", *prompts])
    ids = micro_conditioning(12, 127, 0.0, batch_size=4)
    config = pipe.scheduler.config
    x = torch.randn((2, frames, 4, 8, 8), generator=torch.Generator().manual_seed(3)) * math.sqrt(
        1 + config.sigma_max**2)

    def denoiser(x_t, sigma):
        return VPredictionPreconditioning().denoise(
            lambda x_in, c_noise: pipe.unet(x_in, c_noise, encoder_hidden_states=context, added_time_ids=ids).sample,
            x_t, sigma)

    with torch.no_grad():
        expected = sample_euler(ClassifierFreeGuidance(denoiser, linear_guidance_scales(frames, 1.0, 2.5)), x,
                                karras_sigmas(steps, config.sigma_min, config.sigma_max), disable=True)
    assert torch.equal(got, expected)
    # img2img from init_latents: the same sampler from init_sigma
    clean = torch.randn((1, frames, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    renoised = pipe("a cyclist", num_frames=frames, init_latents=clean, init_sigma=2.0, num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(5), progress=False, output_type="latent").frames
    again = pipe("a cyclist", num_frames=frames, init_latents=clean, init_sigma=2.0, num_inference_steps=steps,
                 latents=torch.randn((1, frames, 4, 8, 8), generator=torch.Generator().manual_seed(5)),
                 progress=False, output_type="latent").frames
    assert torch.equal(renoised, again) and not torch.equal(renoised, got[:1])


def test_check_inputs_refuses_before_any_model_runs(pipe):
    embeds = torch.zeros(1, 4, 77, 64)
    for kwargs, message in [
        (dict(prompt="x", prompt_embeds=embeds), "either prompt or prompt_embeds"),
        (dict(prompt=None, prompt_embeds=None), "prompt .or prompt_embeds. is required"),
        (dict(prompt=None, prompt_embeds=torch.zeros(77, 64)), "prompt_embeds must be"),
        (dict(prompt=None, prompt_embeds=embeds, negative_prompt_embeds=torch.zeros(1, 77, 64)), "must match"),
        (dict(prompt=None, prompt_embeds=embeds, num_frames=3), "per-frame prompt_embeds have 4 frames"),
        (dict(prompt="x", output_type="gif"), "output_type must be"),
        (dict(prompt="x", init_latents=torch.zeros(1, 4, 4, 8, 8), init_sigma=900.0), "init_sigma must be in"),
    ]:
        arguments = dict(prompt_embeds=None, negative_prompt_embeds=None, height=64, width=64, num_frames=4,
                         output_type="np", init_latents=None, init_sigma=None) | kwargs
        with pytest.raises(ValueError, match=message):
            pipe.check_inputs(**arguments)
    pipe.check_inputs("x", None, None, 64, 64, 4, "np", None, None)  # good inputs pass
