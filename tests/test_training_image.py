"""Image-to-video training on real curated clips, in-process (no Ray): conditioning from each sample's own data,
per-sample noise augmentation, guidance dropout, batch > 1, the stage III image-to-video noise preset, and the
inflation of a text-to-video checkpoint (conv_in 4 -> 8 channels, temporal decoder, image encoder)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dataformat import find_shards, index_shards
from model.conditioning import augment_frame, clip_image_embedding, conditioning_latent
from model.loading import image_to_video_from_text, load_initial_pipeline
from training.data import TrainingStream
from training.loop import group_steps
from training.motion import MotionBuckets
from training.stages import get_stage_preset
from training.trainer import StageTrainer, augmentation_for_positions


@pytest.fixture(scope="module")
def samples(curated_dir):
    return index_shards(find_shards(str(curated_dir)))


def _image_preset(steps: int = 2, batch: int = 2):
    stage3 = get_stage_preset(3, "tiny", "image").with_max_steps(steps)
    return replace(stage3, phases=(replace(stage3.phases[0], height=64, width=64, num_frames=4, batch_size=batch),))


def test_image_to_video_presets():
    stage3 = get_stage_preset(3, "svd", "image")
    assert (stage3.phases[0].p_mean, stage3.phases[0].p_std) == (1.0, 1.6)
    assert (get_stage_preset(3, "svd").phases[0].p_mean, get_stage_preset(3, "svd").phases[0].p_std) == (0.5, 1.4)
    assert stage3.conditioning == "image" and stage3.image_drop_rate == 0.1
    assert get_stage_preset(2, "tiny", "image").phases == get_stage_preset(2, "tiny").phases
    with pytest.raises(ValueError, match="needs clips"):
        get_stage_preset(1, "tiny", "image")
    with pytest.raises(ValueError, match="conditioning must be one of"):
        get_stage_preset(2, "tiny", "audio")


def test_noise_augmentation_is_log_normal_per_sample_and_dropout_is_joint():
    preset = _image_preset()
    strengths, noises, keep = augmentation_for_positions(torch.arange(4000), (1,), seed=3, preset=preset)
    logs = strengths.log().numpy()
    assert abs(logs.mean() + 3.0) < 0.05 and abs(logs.std() - 0.5) < 0.05
    assert abs((~keep).float().mean().item() - 0.1) < 0.02
    assert len(set(strengths.tolist())) > 3990, "one strength per sample, not per batch (float32 may collide)"
    again, _, keep_again = augmentation_for_positions(torch.tensor([7, 3999]), (1,), seed=3, preset=preset)
    assert again.tolist() == [strengths[7].item(), strengths[3999].item()], "drawn from (seed, position) only"
    assert keep_again.tolist() == [keep[7].item(), keep[3999].item()]


@pytest.fixture
def tiny_image_pipeline():
    """A fresh one per test: the trainer trains (and may move) the pipeline's U-Net in place."""
    return load_initial_pipeline("tiny", seed=0, conditioning="image")


def test_inflating_a_text_checkpoint_keeps_its_output_until_the_new_channels_train(tiny_image_pipeline):
    from diffusers import AutoencoderKLTemporalDecoder

    text = load_initial_pipeline("tiny", seed=0)
    image = tiny_image_pipeline
    assert image.unet.config.in_channels == 8 and isinstance(image.vae, AutoencoderKLTemporalDecoder)
    assert image.image_encoder.config.projection_dim == image.unet.config.cross_attention_dim
    torch.testing.assert_close(image.unet.conv_in.weight[:, :4], text.unet.conv_in.weight, rtol=0, atol=0)
    assert image.unet.conv_in.weight[:, 4:].abs().max() == 0
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 4, 4, 8, 8, generator=generator)
    context = torch.randn(1, 1, 64, generator=generator)
    ids = torch.tensor([[6.0, 127.0, 0.02]])
    with torch.no_grad():
        expected = text.unet(noisy, torch.tensor([0.3]), context, ids).sample
        condition = torch.randn(1, 4, 4, 8, 8, generator=generator)
        got = image.unet(torch.cat([noisy, condition], dim=2), torch.tensor([0.3]), context, ids).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs an image encoder"):
        image_to_video_from_text(text, None)


def test_conditioning_comes_from_each_samples_own_clip(samples, tiny_image_pipeline):
    """Two samples with different first frames, fps and motion get different conditioning, each equal to what
    the model's conditioning functions make of that sample's own first frame and strength."""
    preset = replace(_image_preset(), image_drop_rate=0.0, motion=MotionBuckets("linear"))
    stream = TrainingStream(samples, preset, seed=0, micro_batch_size=2)
    batch = next(b for b in stream if b["fps"][0] != b["fps"][1] and b["motion_bucket"][0] != b["motion_bucket"][1])
    trainer = StageTrainer(tiny_image_pipeline, preset)
    conditioning, ids = trainer.image_conditioning(batch)
    strengths, noise, _ = augmentation_for_positions(batch["positions"], tuple(batch["pixels"].shape[2:]), 0, preset)
    assert strengths[0] != strengths[1]
    torch.testing.assert_close(ids, torch.stack([batch["fps"] - 1, batch["motion_bucket"], strengths], 1).float())
    first = batch["pixels"][:, 0]
    assert not torch.equal(first[0], first[1])
    with torch.no_grad():
        for index in range(2):
            embedding = clip_image_embedding(trainer.image_encoder, trainer.feature_extractor, first[index:index + 1])
            latent = conditioning_latent(trainer.vae, augment_frame(first[index:index + 1], strengths[index],
                                                                    noise[index:index + 1]))
            torch.testing.assert_close(conditioning.embedding[index:index + 1], embedding, rtol=0, atol=1e-5)
            torch.testing.assert_close(conditioning.latent[index:index + 1], latent, rtol=0, atol=1e-5)
    assert (conditioning.embedding[0] - conditioning.embedding[1]).abs().max() > 1e-3
    assert (conditioning.latent[0] - conditioning.latent[1]).abs().max() > 1e-3

    dropping = StageTrainer(tiny_image_pipeline, replace(_image_preset(steps=6), image_drop_rate=0.5))
    stream = iter(TrainingStream(samples, dropping.preset, seed=0, micro_batch_size=2))
    batches = [next(stream) for _ in range(6)]
    dropped = [(c.embedding.flatten(1).abs().amax(1) == 0, c.latent.flatten(1).abs().amax(1) == 0)
               for c, _ in map(dropping.image_conditioning, batches)]
    embeddings_zero = torch.cat([e for e, _ in dropped])
    assert torch.equal(embeddings_zero, torch.cat([latent for _, latent in dropped])), "dropped together"
    assert 0 < embeddings_zero.sum() < len(embeddings_zero)


def test_image_mode_trains_with_batches_of_two_and_learns(samples, tiny_image_pipeline):
    preset = _image_preset(steps=3)
    trainer = StageTrainer(tiny_image_pipeline, preset)
    before = trainer.unet.conv_in.weight[:, 4:].clone()
    losses = [trainer.train_step(micro)["loss"] for micro in group_steps(
        TrainingStream(samples, preset, seed=0, micro_batch_size=2))]
    assert len(losses) == 3 and all(np.isfinite(losses))
    new_channels = trainer.unet.conv_in.weight[:, 4:]
    assert new_channels.abs().max() > 0 and not torch.equal(before, new_channels), "the conditioning channels train"


@pytest.mark.gpu
def test_image_mode_bf16_loss_is_finite_on_gpu(samples, tiny_image_pipeline):
    preset = _image_preset(steps=4, batch=2)
    trainer = StageTrainer(tiny_image_pipeline, preset, device="cuda")  # bf16 autocast on CUDA
    for micro in group_steps(TrainingStream(samples, preset, seed=0, micro_batch_size=2)):
        metrics = trainer.train_step(micro)
        assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]), metrics
