"""Optional finetune of the temporal VAE decoder on LVD-F clips (the encoder and the latent space stay fixed).

The paper does not publish its decoder finetune's loss; Video LDM (which SVD's temporal decoder comes from)
finetunes the decoder's temporal layers with the latent-diffusion autoencoder loss plus a temporal
discriminator built from 3D convolutions. The loss here, per step (docs/decoder-finetune.md has every
default and its source):

    reconstruction = L1(D(E(x)), x) + temporal_weight * L1 of frame-to-frame differences
                     + perceptual_weight * LPIPS (frame by frame)
    decoder loss   = reconstruction + sum over discriminators of  w_adaptive * (-mean D_k(x_hat))
    discriminators : hinge loss on real clips vs the (detached) reconstructions

with the discriminators (a 2D PatchGAN on frames; optionally a 3D one on clips) and their terms switched on
at step `disc_start`, taming/LDM style: each step updates the decoder, then the discriminators on the same
batch. The frame-difference L1 is what the temporal layers exist for (flicker between independently decoded
frames, which a per-frame loss does not see); L1 alone averages plausible details into blur, which LPIPS and
the discriminator penalise. By default only the temporal layers train (`trainable="temporal"`), so the
per-frame decoder stays SD's and the finetune learns how to mix frames; `trainable="decoder"` trains it all.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLTemporalDecoder

from dataformat import atomic_write, atomic_write_json
from dataformat.decoder_finetune import DecoderFinetuneLayout
from model.vae import is_temporal_decoder_parameter
from training.decoder_losses import (
    PatchDiscriminator,
    PatchDiscriminator3D,
    adaptive_weight,
    generator_loss,
    hinge_discriminator_loss,
    last_layer_gradient,
    load_lpips,
    perceptual_distance,
)
from training.decoder_settings import DecoderFinetuneSettings, check_decoder_geometry
from training.stages import Phase, StagePreset

DISCRIMINATOR_BETAS = (0.5, 0.9)  # taming / latent-diffusion autoencoders' Adam for the discriminator


def decoder_loss(decoded: torch.Tensor, frames: torch.Tensor, temporal_weight: float = 1.0) -> torch.Tensor:
    """Per-clip pixel loss (B,) for decoded and target clips (B, T, 3, H, W): L1 plus L1 of frame differences."""
    if decoded.shape != frames.shape or frames.ndim != 5:
        raise ValueError(f"decoded {tuple(decoded.shape)} and frames {tuple(frames.shape)} must be equal (B,T,3,H,W)")
    reconstruction = (decoded - frames).abs().flatten(1).mean(1)
    if frames.shape[1] < 2 or temporal_weight == 0:
        return reconstruction
    temporal = ((decoded.diff(dim=1) - frames.diff(dim=1)).abs()).flatten(1).mean(1)
    return reconstruction + temporal_weight * temporal


@dataclass(frozen=True)
class DecoderFinetuneConfig:
    """What the decoder finetune reads (clip geometry, steps, seed: from the stage) and how it trains."""

    steps: int
    height: int = 64
    width: int = 64
    num_frames: int = 6
    seed: int = 0
    settings: DecoderFinetuneSettings = field(default_factory=DecoderFinetuneSettings)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.num_frames < 1 or min(self.height, self.width) < 8:
            raise ValueError(f"decoder finetune: steps and frames must be positive and frames at least 8x8, got "
                             f"steps={self.steps}, {self.num_frames} frames of {self.height}x{self.width}")
        check_decoder_geometry(self.settings, self.height, self.width)


class DecoderFinetuner:
    """AdamW on the temporal decoder's chosen parameters, Adam on the discriminators; the encoder's latents
    are computed without gradients. `perceptual` passes a ready LPIPS network (else one is built from the
    settings)."""

    def __init__(self, vae: AutoencoderKLTemporalDecoder, config: DecoderFinetuneConfig,
                 device: torch.device | str = "cpu", perceptual: torch.nn.Module | None = None) -> None:
        if not isinstance(vae, AutoencoderKLTemporalDecoder):
            raise ValueError(f"the decoder finetune needs an AutoencoderKLTemporalDecoder, got {type(vae).__name__}")
        settings = config.settings
        self.vae, self.config, self.settings, self.device = vae.to(device), config, settings, torch.device(device)
        self.vae.requires_grad_(False)
        chosen = [p for n, p in self.vae.decoder.named_parameters()
                  if settings.trainable == "decoder" or is_temporal_decoder_parameter(n)]
        for parameter in chosen:
            parameter.requires_grad_(True)
        self.parameters = chosen
        self.last_layer = self.vae.decoder.time_conv_out.weight  # sgm's VideoDecoder.get_last_layer()
        self.optimizer = torch.optim.AdamW(chosen, lr=settings.learning_rate, weight_decay=0.0)
        self.perceptual = None
        if settings.perceptual_weight > 0:
            self.perceptual = (perceptual if perceptual is not None
                               else load_lpips(settings.lpips_net, settings.lpips_backbone, config.seed)).to(device)
        self.discriminators: dict[str, torch.nn.Module] = {}
        if settings.uses_discriminator:
            torch.manual_seed(config.seed)
            self.discriminators["frames"] = PatchDiscriminator(3, settings.disc_channels, settings.disc_layers)
            if settings.temporal_discriminator:
                self.discriminators["clips"] = PatchDiscriminator3D(3, settings.disc_channels, settings.disc_layers)
        self.discriminator_optimizer = None
        if self.discriminators:
            for discriminator in self.discriminators.values():
                discriminator.to(device).train()
            self.discriminator_optimizer = torch.optim.Adam(
                [p for d in self.discriminators.values() for p in d.parameters()],
                lr=settings.disc_learning_rate or settings.learning_rate, betas=DISCRIMINATOR_BETAS)

    def reconstruct(self, frames: torch.Tensor) -> torch.Tensor:
        """Clips (B, T, 3, H, W) in [-1, 1] through the frozen encoder (posterior mode) and the decoder."""
        batch, count = frames.shape[:2]
        flat = frames.flatten(0, 1).to(self.device, self.vae.dtype)
        with torch.no_grad():
            latents = self.vae.encode(flat).latent_dist.mode()
        decoded = self.vae.decode(latents, num_frames=count).sample.float()
        return decoded.reshape(batch, count, *decoded.shape[1:])

    def reconstruction_terms(self, decoded: torch.Tensor, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-clip (B,) L1, frame-difference L1 and LPIPS (the last only with a perceptual weight)."""
        terms = {"l1": decoder_loss(decoded, frames, 0.0)}
        if frames.shape[1] > 1:
            terms["temporal_l1"] = (decoded.diff(dim=1) - frames.diff(dim=1)).abs().flatten(1).mean(1)
        if self.perceptual is not None:
            terms["lpips"] = perceptual_distance(self.perceptual, decoded, frames)
        return terms

    def combine(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = {"l1": 1.0, "temporal_l1": self.settings.temporal_weight,
                   "lpips": self.settings.perceptual_weight}
        return sum(weights[name] * value for name, value in terms.items())

    def loss(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-clip reconstruction loss (B,) for clips (B, T, 3, H, W) in [-1, 1] (no GAN term)."""
        frames = frames.to(self.device).float()
        return self.combine(self.reconstruction_terms(self.reconstruct(frames), frames))

    @staticmethod
    def discriminator_input(name: str, clips: torch.Tensor) -> torch.Tensor:
        """Frames (B*T, 3, H, W) for the 2D discriminator, clips (B, 3, T, H, W) for the 3D one."""
        return clips.flatten(0, 1) if name == "frames" else clips.permute(0, 2, 1, 3, 4)

    def step(self, frames: torch.Tensor, step: int = 0) -> dict[str, float]:
        """One decoder update (then one discriminator update once `step` reaches disc_start); the step's terms."""
        frames = frames.to(self.device).float()
        adversarial = bool(self.discriminators) and step >= self.settings.disc_start
        self.vae.train()
        self.optimizer.zero_grad(set_to_none=True)
        decoded = self.reconstruct(frames)
        terms = {name: value.mean() for name, value in self.reconstruction_terms(decoded, frames).items()}
        reconstruction = self.combine(terms)
        total = reconstruction
        log = {name: value.item() for name, value in terms.items()}
        log["reconstruction"] = reconstruction.item()
        if adversarial:
            reconstruction_grad = last_layer_gradient(reconstruction, self.last_layer)  # once for every discriminator
            for name, discriminator in self.discriminators.items():
                discriminator.requires_grad_(False)
                fake = generator_loss(discriminator(self.discriminator_input(name, decoded)))
                weight = adaptive_weight(reconstruction_grad, last_layer_gradient(fake, self.last_layer),
                                         self.settings.disc_weight)
                total = total + weight * fake
                log[f"generator_{name}"], log[f"adaptive_weight_{name}"] = fake.item(), weight.item()
        if not math.isfinite(total.item()):
            raise FloatingPointError("non-finite decoder loss; check the data and learning rate")
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        self.vae.eval()
        log["loss"] = total.item()
        if adversarial:
            log.update(self._discriminator_step(frames, decoded.detach()))
        return log

    def _discriminator_step(self, frames: torch.Tensor, decoded: torch.Tensor) -> dict[str, float]:
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        log, total = {}, 0.0
        for name, discriminator in self.discriminators.items():
            discriminator.requires_grad_(True)
            real = discriminator(self.discriminator_input(name, frames))
            fake = discriminator(self.discriminator_input(name, decoded))
            loss = hinge_discriminator_loss(real, fake)
            total = total + loss
            log[f"discriminator_{name}"] = loss.item()
            log[f"logits_real_{name}"], log[f"logits_fake_{name}"] = real.mean().item(), fake.mean().item()
        total.backward()
        self.discriminator_optimizer.step()
        return log


def clip_batches(shards: list[str], config: DecoderFinetuneConfig, batch_size: int | None = None):
    """Batches of real clips (B, T, 3, H, W) from LVD-F shards, read the way the U-Net training reads them."""
    from dataformat import index_shards
    from training.data import TrainingStream

    batch_size = batch_size or config.settings.batch_size
    phase = Phase("decoder", config.height, config.width, config.num_frames, config.steps, batch_size,
                  config.settings.learning_rate, 0.0, 1.0)
    preset = StagePreset(stage=2, preset="decoder", phases=(phase,), text_drop_rate=0.0)
    for batch in TrainingStream(index_shards(shards), preset, config.seed, micro_batch_size=batch_size):
        yield batch["pixels"]


def finetune_decoder(pipeline_dir: str | Path, shards: list[str], config: DecoderFinetuneConfig,
                     device: torch.device | str = "cpu", perceptual: torch.nn.Module | None = None
                     ) -> dict[str, Any]:
    """Finetune `pipeline_dir/vae` (an AutoencoderKLTemporalDecoder) on the shards' clips and replace it in
    place (written to a temporary folder first, then swapped in). The report (`DecoderFinetuneLayout` of the
    pipeline's stage folder: summary, per-step metrics, a loss plot, and a probe clip, the first one drawn with
    seed + 1, reconstructed before and after) says what changed; returns the summary."""
    target = Path(pipeline_dir) / "vae"
    layout = DecoderFinetuneLayout(Path(pipeline_dir).parent)
    vae = AutoencoderKLTemporalDecoder.from_pretrained(target)
    torch.manual_seed(config.seed)
    finetuner = DecoderFinetuner(vae, config, device, perceptual)
    probe = next(iter(clip_batches(shards, DecoderFinetuneConfig(
        steps=1, height=config.height, width=config.width, num_frames=config.num_frames, seed=config.seed + 1,
        settings=config.settings), batch_size=1)))
    before, before_terms = _probe(finetuner, probe)
    metrics = [{"step": step, **finetuner.step(frames, step)}
               for step, frames in enumerate(clip_batches(shards, config))]
    after, after_terms = _probe(finetuner, probe)
    staging = Path(tempfile.mkdtemp(prefix=".vae-", dir=target.parent))
    finetuner.vae.save_pretrained(staging)
    old = target.with_name(".vae-old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old)

    atomic_write(layout.metrics, "".join(json.dumps(line) + "\n" for line in metrics))
    atomic_write(layout.reconstructions, reconstruction_image(probe[0], before[0], after[0]))
    plot_decoder_losses(metrics, layout.loss_plot)
    summary = {
        "steps": len(metrics), "first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"],
        "discriminator_steps": sum("discriminator_frames" in line for line in metrics),
        "probe": {f"{name}_{when}": value for when, values in (("before", before_terms), ("after", after_terms))
                     for name, value in values.items()},
        "settings": config.settings.to_dict(),
        "reconstructions": str(layout.reconstructions), "loss_plot": str(layout.loss_plot),
        "metrics": str(layout.metrics),
    }
    atomic_write_json(layout.summary, summary)
    return summary


@torch.no_grad()
def _probe(finetuner: DecoderFinetuner, clip: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The probe clip's reconstruction (1, T, 3, H, W) and its per-term losses."""
    finetuner.vae.eval()
    clip = clip.to(finetuner.device).float()
    decoded = finetuner.reconstruct(clip)
    terms = finetuner.reconstruction_terms(decoded, clip)
    return decoded.cpu(), {name: value.mean().item() for name, value in terms.items()}


def reconstruction_image(frames: torch.Tensor, before: torch.Tensor, after: torch.Tensor) -> bytes:
    """PNG of one clip (T, 3, H, W) in [-1, 1]: rows input / before the finetune / after it, frames left to right,
    each row labelled on its left."""
    from PIL import Image, ImageDraw

    rows = [("input", frames), ("before", before), ("after", after)]
    count, _, height, width = frames.shape
    label_width, gap = 64, 2
    canvas = Image.new("RGB", (label_width + count * (width + gap), len(rows) * (height + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (label, clip) in enumerate(rows):
        top = row * (height + gap)
        draw.text((4, top + height // 2 - 6), label, fill="black")
        pixels = ((clip.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for index, frame in enumerate(pixels):
            canvas.paste(Image.fromarray(np.ascontiguousarray(frame)), (label_width + index * (width + gap), top))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def plot_decoder_losses(metrics: list[dict[str, float]], path: Path) -> Path:
    """Each loss term per step (log scale where positive), the discriminators' on a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (decoder_axis, gan_axis) = plt.subplots(1, 2, figsize=(9, 3), dpi=100)
    steps = [line["step"] for line in metrics]
    for name in ("loss", "reconstruction", "l1", "temporal_l1", "lpips"):
        if name in metrics[0]:
            decoder_axis.plot(steps, [line[name] for line in metrics], lw=1, label=name)
    decoder_axis.set_xlabel("step")
    decoder_axis.set_title("decoder")
    decoder_axis.legend(fontsize=7)
    names = sorted({name for line in metrics for name in line if name.startswith(("discriminator_", "generator_"))})
    for name in names:
        points = [(line["step"], line[name]) for line in metrics if name in line]
        gan_axis.plot(*zip(*points, strict=True), lw=1, label=name)
    gan_axis.set_xlabel("step")
    gan_axis.set_title("GAN (hinge)" if names else "GAN (off)")
    if names:
        gan_axis.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return atomic_write(path, buffer.getvalue())
