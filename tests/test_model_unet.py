"""Video U-Net: identity at init after SD inflation, exact image-only bypass, SVD checkpoint parity."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel, UNetSpatioTemporalConditionModel

from model.unet import PRESETS, VideoUNet, is_temporal_parameter, parameter_counts

FRAMES = 4


@pytest.fixture(scope="module")
def image_unet_dir(tmp_path_factory):
    """A tiny random SD 2.x-style U-Net (linear projections, heads per level), saved as a checkpoint."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
    )
    with torch.no_grad():  # random, non-trivial spatial weights (diffusers zero-inits some outputs)
        for parameter in unet.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("sd") / "unet"
    unet.save_pretrained(path)
    return path


def _inputs(batch: int = 2, frames: int = FRAMES):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, frames, 4, 8, 8, generator=generator)
    sigma = torch.tensor([0.5, 3.0])[:batch]
    text = torch.randn(batch, 77, 64, generator=generator)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * batch)
    return sample, 0.25 * sigma.log(), text, ids


def _image_model_per_frame(image_unet, sample, c_noise, text):
    batch, frames = sample.shape[:2]
    out = image_unet(sample.flatten(0, 1), c_noise.repeat_interleave(frames),
                     encoder_hidden_states=text.repeat_interleave(frames, dim=0)).sample
    return out.reshape(batch, frames, *out.shape[1:])


def _randomise_temporal(unet):
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if is_temporal_parameter(name) or name.startswith("add_"):
                parameter.add_(0.05 * torch.randn_like(parameter))


def test_inflated_model_equals_image_model_on_every_frame_at_init(image_unet_dir):
    image_unet = UNet2DConditionModel.from_pretrained(image_unet_dir).eval()
    video = VideoUNet.from_image_unet(str(image_unet_dir), num_frames=FRAMES, subfolder=None).eval()
    sample, c_noise, text, ids = _inputs()
    with torch.no_grad():
        expected = _image_model_per_frame(image_unet, sample, c_noise, text)
        got = video(sample, c_noise, text, ids).sample
    assert (got - expected).abs().max().item() <= 1e-5
    assert expected.abs().mean() > 1e-3  # a real output, not zeros


def test_image_only_flag_bypasses_temporal_layers_exactly(image_unet_dir):
    image_unet = UNet2DConditionModel.from_pretrained(image_unet_dir).eval()
    video = VideoUNet.from_image_unet(image_unet, num_frames=FRAMES).eval()
    _randomise_temporal(video)
    with torch.no_grad():  # micro-conditioning off: compare with SD, which has none
        video.add_embedding.linear_2.weight.zero_()
        video.add_embedding.linear_2.bias.zero_()
    sample, c_noise, text, ids = _inputs()
    flags = torch.tensor([[1.0] * FRAMES, [0.0] * FRAMES])  # sample 0 is an image batch, sample 1 a video
    out = video(sample, c_noise, text, ids, image_only_indicator=flags).sample
    with torch.no_grad():
        expected = _image_model_per_frame(image_unet, sample, c_noise, text)
    assert (out[0] - expected[0]).abs().max().item() <= 1e-5
    assert (out[1] - expected[1]).abs().max().item() > 1e-3  # the video sample does use the temporal layers

    video.zero_grad()
    out[0].square().mean().backward()
    temporal = {n: p.grad for n, p in video.named_parameters() if is_temporal_parameter(n)}
    assert temporal and all(g is None or torch.count_nonzero(g) == 0 for g in temporal.values())
    spatial = [p.grad for n, p in video.named_parameters() if n.startswith("down_blocks.0.resnets.0.spatial")]
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in spatial)


def test_svd_checkpoint_loads_and_matches_diffusers(tmp_path):
    torch.manual_seed(2)
    config = {**PRESETS["tiny"], "in_channels": 8}  # SVD's image-to-video input: noise + conditioning latent
    reference = UNetSpatioTemporalConditionModel(**config).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    reference.save_pretrained(tmp_path / "unet")
    ours = VideoUNet.from_pretrained(tmp_path / "unet").eval()
    sample = torch.randn(2, FRAMES, 8, 8, 8)
    _, c_noise, text, ids = _inputs()
    with torch.no_grad():
        expected = reference(sample, c_noise, text, ids).sample
        got = ours(sample, c_noise, text, ids).sample
    assert torch.equal(got, expected)


def test_bad_inputs_are_named(image_unet_dir):
    video = VideoUNet.from_preset("tiny")
    sample, c_noise, text, ids = _inputs()
    with pytest.raises(ValueError, match="added_time_ids"):
        video(sample, c_noise, text, ids[:, :2])
    with pytest.raises(ValueError, match="image_only_indicator"):
        video(sample, c_noise, text, ids, image_only_indicator=torch.zeros(2, FRAMES + 1))
    with pytest.raises(ValueError, match="sample must be"):
        video(sample[:, 0], c_noise, text, ids)
    with pytest.raises(ValueError, match="unknown U-Net preset"):
        VideoUNet.from_preset("huge")


def test_svd_preset_size_matches_the_paper_without_allocating():
    counts = parameter_counts("svd")
    assert 1.45e9 < counts["total"] < 1.6e9  # paper: 1521M
    assert 0.62e9 < counts["temporal"] < 0.69e9  # paper: 656M temporal


@pytest.mark.parametrize("per_frame", [False, True])
def test_shared_text_context_matches_diffusers_copying_path(per_frame):
    """Cross-attention on the compact (B, L, D) context equals diffusers' per-frame/per-pixel copies, with grads."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from model.shared_context import uses_shared_context

    torch.manual_seed(3)
    unet = VideoUNet.from_preset("tiny")
    _randomise_temporal(unet)
    sample, c_noise, text, ids = _inputs()
    if per_frame:  # a walk: one context per frame
        text = text[:, None].repeat(1, FRAMES, 1, 1) + 0.1 * torch.randn(2, FRAMES, 77, 64)
    assert uses_shared_context(unet)
    shared = unet(sample, c_noise, text, ids).sample
    shared.square().mean().backward()
    shared_grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    unet.zero_grad()
    unet.set_attn_processor(AttnProcessor2_0())
    assert not uses_shared_context(unet)
    copied = unet(sample, c_noise, text, ids).sample
    copied.square().mean().backward()
    torch.testing.assert_close(shared, copied, rtol=1e-5, atol=1e-6)
    for name, parameter in unet.named_parameters():
        torch.testing.assert_close(shared_grads[name], parameter.grad, rtol=1e-4, atol=1e-7, msg=name)
