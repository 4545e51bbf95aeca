"""Optional finetune of the temporal VAE decoder on LVD-F clips (the encoder and the latent space stay fixed).

The paper does not publish the loss of its decoder finetune; the project's choice is

    loss = mean |D(E(x)) - x|  +  temporal_weight * mean |(D(E(x))_t - D(E(x))_{t-1}) - (x_t - x_{t-1})|

per clip, with temporal_weight 1.0: an L1 reconstruction term (the pixel term of the latent-diffusion
autoencoder loss) plus the same L1 on frame-to-frame differences, which is what the temporal layers exist to
fix (flicker between independently decoded frames) and which a per-frame loss does not see. No LPIPS or GAN
term: both need pretrained networks or a discriminator schedule, and the finetune starts from SD's decoder
quality (the temporal layers start as the identity). By default only the temporal layers train
(`trainable="temporal"`), so the per-frame decoder stays SD's and the finetune can only learn how to mix
frames; `trainable="decoder"` trains the whole decoder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLTemporalDecoder

from model.vae import is_temporal_decoder_parameter
from training.stages import Phase, StagePreset

DECODER_TRAINABLE = ("temporal", "decoder")


def decoder_loss(decoded: torch.Tensor, frames: torch.Tensor, temporal_weight: float = 1.0) -> torch.Tensor:
    """Per-clip loss (B,) for decoded and target clips (B, T, 3, H, W): L1 plus L1 of frame differences."""
    if decoded.shape != frames.shape or frames.ndim != 5:
        raise ValueError(f"decoded {tuple(decoded.shape)} and frames {tuple(frames.shape)} must be equal (B,T,3,H,W)")
    reconstruction = (decoded - frames).abs().flatten(1).mean(1)
    if frames.shape[1] < 2 or temporal_weight == 0:
        return reconstruction
    temporal = ((decoded.diff(dim=1) - frames.diff(dim=1)).abs()).flatten(1).mean(1)
    return reconstruction + temporal_weight * temporal


@dataclass(frozen=True)
class DecoderFinetuneConfig:
    """How the decoder finetune reads clips and optimises."""

    steps: int
    height: int = 64
    width: int = 64
    num_frames: int = 6
    batch_size: int = 2
    learning_rate: float = 1e-4  # [open] AdamW, constant
    temporal_weight: float = 1.0
    trainable: str = "temporal"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trainable not in DECODER_TRAINABLE:
            raise ValueError(f"decoder trainable must be one of {DECODER_TRAINABLE}, got {self.trainable!r}")
        if self.steps < 1 or self.batch_size < 1 or self.num_frames < 1 or self.learning_rate <= 0:
            raise ValueError("decoder finetune steps, batch size, frames and learning rate must be positive")


class DecoderFinetuner:
    """AdamW on the temporal decoder's chosen parameters; the encoder's latents are computed without gradients."""

    def __init__(self, vae: AutoencoderKLTemporalDecoder, config: DecoderFinetuneConfig,
                 device: torch.device | str = "cpu") -> None:
        if not isinstance(vae, AutoencoderKLTemporalDecoder):
            raise ValueError(f"the decoder finetune needs an AutoencoderKLTemporalDecoder, got {type(vae).__name__}")
        self.vae, self.config, self.device = vae.to(device), config, torch.device(device)
        self.vae.requires_grad_(False)
        chosen = [p for n, p in self.vae.decoder.named_parameters()
                  if config.trainable == "decoder" or is_temporal_decoder_parameter(n)]
        for parameter in chosen:
            parameter.requires_grad_(True)
        self.parameters = chosen
        self.optimizer = torch.optim.AdamW(chosen, lr=config.learning_rate, weight_decay=0.0)

    def loss(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-clip loss for clips (B, T, 3, H, W) in [-1, 1]."""
        batch, count = frames.shape[:2]
        flat = frames.flatten(0, 1).to(self.device, self.vae.dtype)
        with torch.no_grad():
            latents = self.vae.encode(flat).latent_dist.mode()
        decoded = self.vae.decode(latents, num_frames=count).sample.float()
        return decoder_loss(decoded.reshape(batch, count, *decoded.shape[1:]), frames.to(self.device).float(),
                            self.config.temporal_weight)

    def step(self, frames: torch.Tensor) -> float:
        self.vae.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(frames).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        if not math.isfinite(loss.item()):
            raise FloatingPointError("non-finite decoder loss; check the data and learning rate")
        self.optimizer.step()
        self.vae.eval()
        return loss.item()


def clip_batches(shards: list[str], config: DecoderFinetuneConfig):
    """Batches of real clips (B, T, 3, H, W) from LVD-F shards, read the way the U-Net training reads them."""
    from dataformat import index_shards
    from training.data import TrainingStream

    phase = Phase("decoder", config.height, config.width, config.num_frames, config.steps, config.batch_size,
                  config.learning_rate, 0.0, 1.0)
    preset = StagePreset(stage=2, preset="decoder", phases=(phase,), text_drop_rate=0.0)
    for batch in TrainingStream(index_shards(shards), preset, config.seed, micro_batch_size=config.batch_size):
        yield batch["pixels"]


def finetune_decoder(pipeline_dir: str | Path, shards: list[str], config: DecoderFinetuneConfig,
                     device: torch.device | str = "cpu") -> dict[str, Any]:
    """Finetune `pipeline_dir/vae` (an AutoencoderKLTemporalDecoder) on the shards' clips and replace it in
    place (written to a temporary folder first, then swapped in); returns the losses."""
    target = Path(pipeline_dir) / "vae"
    vae = AutoencoderKLTemporalDecoder.from_pretrained(target)
    torch.manual_seed(config.seed)
    finetuner = DecoderFinetuner(vae, config, device)
    losses = [finetuner.step(frames) for frames in clip_batches(shards, config)]
    staging = Path(tempfile.mkdtemp(prefix=".vae-", dir=target.parent))
    finetuner.vae.save_pretrained(staging)
    old = target.with_name(".vae-old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old)
    summary = {"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
               "trainable": config.trainable, "temporal_weight": config.temporal_weight}
    (Path(pipeline_dir) / "decoder_finetune.json").write_text(json.dumps({**summary, "losses": losses}, indent=1))
    return summary
