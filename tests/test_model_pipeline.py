"""Text-to-video pipeline: tiny end-to-end generation, save/load round trip, SD 2.x loading, VAE chunking."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder, UNet2DConditionModel

from common.video import save_video
from model.pipeline import TextToVideoPipeline
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
