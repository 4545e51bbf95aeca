"""`DecoderFinetuneSettings`: how the temporal VAE decoder finetune trains, as the `decoder` settings of a
training request (`lvd train ... --decoder-steps N --set decoder.disc_start=500`). Torch-free, so building a
request stays cheap; the losses themselves are in training/decoder_losses.py and docs/decoder-finetune.md
gives each default's source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.requests import Request, RequestError, setting

DECODER_TRAINABLE = ("temporal", "decoder")
LPIPS_NETS = ("vgg", "alex")


@dataclass(frozen=True)
class DecoderFinetuneSettings(Request):
    """The decoder finetune's losses and optimiser (defaults: docs/decoder-finetune.md)."""

    trainable: Literal["temporal", "decoder"] = setting(
        "temporal", help="temporal: only the layers SVD added to SD's decoder; decoder: the whole decoder")
    batch_size: int = setting(1, min=1, help="clips per step")
    num_frames: int | None = setting(None, min=1, help="frames per clip (default: the stage's last phase's); "
                                                       "fewer frames need less memory")
    learning_rate: float = setting(1e-4, min=1e-9, max=1.0, help="AdamW learning rate of the decoder")
    temporal_weight: float = setting(1.0, min=0.0, help="weight of the L1 on frame-to-frame differences")
    perceptual_weight: float = setting(1.0, min=0.0, help="weight of LPIPS (0: off); LDM's autoencoder loss "
                                                          "uses 1.0")
    lpips_net: Literal["vgg", "alex"] = setting("vgg", help="LPIPS backbone: vgg (sgm's choice) or alex")
    lpips_backbone: str | None = setting(
        None, path="file", help="torchvision ImageNet weights of the LPIPS backbone (vgg16-397923af.pth or "
                                "alexnet-owt-7be5be79.pth; .pth or .safetensors), never downloaded; the 'tiny' "
                                "preset without it: a random backbone")
    disc_weight: float = setting(0.5, min=0.0, help="scale of the adaptive GAN weight (0: no discriminator)")
    disc_start: int = setting(0, min=0, help="finetune step at which the discriminators start (both their "
                                             "training and their loss on the decoder)")
    disc_layers: int = setting(3, min=1, max=6, help="strided conv layers of the patch discriminator")
    disc_channels: int = setting(64, min=1, help="channels of the discriminator's first layer (doubling to 8x)")
    disc_learning_rate: float | None = setting(None, min=1e-9, max=1.0,
                                               help="Adam learning rate of the discriminators (default: "
                                                    "learning_rate)")
    temporal_discriminator: bool = setting(False, help="also train a 3D (Conv3d) patch discriminator on whole "
                                                       "clips (Video LDM)")

    @property
    def uses_discriminator(self) -> bool:
        return self.disc_weight > 0


def smallest_discriminator_side(layers: int) -> int:
    """The least height/width a patch discriminator with `layers` strided layers takes: each halves the side
    (kernel 4, stride 2, padding 1) and the last two convolutions (kernel 4, stride 1, padding 1) take one
    pixel each, so the logit map is side / 2**layers - 2 pixels wide."""
    return 2 ** layers * 3


def check_decoder_geometry(settings: DecoderFinetuneSettings, height: int, width: int) -> None:
    """A clear error before any work when the frames are too small for the discriminator."""
    side = smallest_discriminator_side(settings.disc_layers)
    if settings.uses_discriminator and min(height, width) < side:
        raise RequestError(f"decoder.disc_layers: {settings.disc_layers} layers need frames of at least "
                           f"{side}x{side} pixels, the decoder finetune reads {height}x{width}; use fewer layers")
