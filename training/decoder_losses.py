"""The losses of the temporal decoder finetune beyond L1: LPIPS, patch discriminators, hinge loss, adaptive weight.

They follow the autoencoder loss of latent diffusion as sgm writes it (`GeneralLPIPSWithDiscriminator` in
sgm/modules/autoencoding/losses/discriminator_loss.py; taming-transformers' `LPIPSWithDiscriminator` before it):

    reconstruction  = L1 + perceptual_weight * LPIPS            (per frame)
    generator loss  = -mean D(x_hat)                             (hinge GAN, generator side)
    adaptive weight = disc_weight * clamp(|grad_L reconstruction| / (|grad_L generator| + 1e-4), 0, 1e4)
    discriminator   = (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) / 2

where L is the decoder's last layer (`time_conv_out`, the Conv3d that sgm's `VideoDecoder.get_last_layer`
returns). `PatchDiscriminator` is taming's/sgm's `NLayerDiscriminator` (pix2pix PatchGAN, BatchNorm, the
same N(0, 0.02) initialisation); `PatchDiscriminator3D` is the same network with Conv3d, the temporal
discriminator Video LDM adds for its video decoder (which publishes no architecture: ours keeps the frame
count, kernel 3 in time, and halves only the frame size).

LPIPS is the `lpips` package's network with its calibrated linear layers (shipped in the package); its
ImageNet backbone comes from a local torchvision weights file, never from a download.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MAX_ADAPTIVE_WEIGHT = 1e4  # sgm's clamp
GRADIENT_EPSILON = 1e-4  # sgm's denominator guard


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """sgm's `hinge_d_loss`: real logits pushed above +1, fake below -1, the two halves averaged."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The decoder's side of the hinge GAN (sgm: `g_loss = -torch.mean(logits_fake)`)."""
    return -logits_fake.mean()


def last_layer_gradient(loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """d loss / d last_layer, keeping the graph for the step's backward pass."""
    return torch.autograd.grad(loss, last_layer, retain_graph=True)[0]


def adaptive_weight(reconstruction_grad: torch.Tensor, generator_grad: torch.Tensor, disc_weight: float
                    ) -> torch.Tensor:
    """sgm's `calculate_adaptive_weight` from the two losses' gradients at the decoder's last layer: the GAN
    term is scaled so that its gradient there is `disc_weight` times the reconstruction's, whatever the two
    losses' scales; detached (a weight, not something to optimise)."""
    ratio = reconstruction_grad.norm() / (generator_grad.norm() + GRADIENT_EPSILON)
    return ratio.clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach() * disc_weight


def init_discriminator_weights(module: nn.Module) -> None:
    """taming's/sgm's `weights_init`: convolutions N(0, 0.02), BatchNorm scales N(1, 0.02) and zero shift."""
    if isinstance(module, nn.Conv2d | nn.Conv3d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm3d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.constant_(module.bias, 0.0)


def _patch_layers(channels: int, width: int, layers: int, conv: type[nn.Module], norm: type[nn.Module],
                  kernel: int | tuple[int, ...], stride: int | tuple[int, ...], padding: int | tuple[int, ...]
                  ) -> list[nn.Module]:
    """pix2pix's PatchGAN: `layers` strided convolutions (channels doubling up to 8x `width`), one more at
    stride 1, and a 1-channel logit map; BatchNorm after all but the first, so those convolutions have no bias."""
    sequence: list[nn.Module] = [conv(channels, width, kernel, stride, padding), nn.LeakyReLU(0.2, True)]
    multiplier = 1
    for index in range(1, layers + 1):
        previous, multiplier = multiplier, min(2 ** index, 8)
        step = stride if index < layers else 1
        sequence += [conv(width * previous, width * multiplier, kernel, step, padding, bias=False),
                     norm(width * multiplier), nn.LeakyReLU(0.2, True)]
    sequence.append(conv(width * multiplier, 1, kernel, 1, padding))
    return sequence


class PatchDiscriminator(nn.Module):
    """sgm's `NLayerDiscriminator` (use_actnorm=False): per-patch logits (B, 1, h, w) of frames (B, 3, H, W)."""

    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        self.main = nn.Sequential(*_patch_layers(channels, width, layers, nn.Conv2d, nn.BatchNorm2d, 4, 2, 1))
        self.apply(init_discriminator_weights)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.main(frames)


class PatchDiscriminator3D(nn.Module):
    """The PatchGAN with Conv3d over clips (B, 3, T, H, W) -> logits (B, 1, T, h, w): kernels of 3 frames by
    4x4 pixels, strides of 1 frame by 2 pixels, so every logit judges a spatio-temporal patch (flicker, motion
    that jumps) and short clips keep all their frames."""

    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        self.main = nn.Sequential(*_patch_layers(channels, width, layers, nn.Conv3d, nn.BatchNorm3d, (3, 4, 4),
                                                 (1, 2, 2), 1))
        self.apply(init_discriminator_weights)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.main(clips)


# ------------------------------------------------------------------------------------------------------ LPIPS


def read_backbone(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The convolution weights of a torchvision VGG16/AlexNet file (.pth as torchvision ships them, or
    .safetensors), keyed as in `model.features` ('0.weight', ...); the classifier is ignored."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"decoder.lpips_backbone = {str(path)!r} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise ValueError(f"decoder.lpips_backbone {str(path)!r} is not a torch weights file ({error})") from error
    if not isinstance(state, dict):
        raise ValueError(f"decoder.lpips_backbone {str(path)!r} holds a {type(state).__name__}, not a state dict")
    features = {key.removeprefix("features."): value for key, value in state.items()
                if key.startswith("features.") or key.split(".")[0].isdigit()}
    if not features:
        raise ValueError(f"decoder.lpips_backbone {str(path)!r} has no `features.N.weight` tensors: not a "
                         "torchvision VGG16 / AlexNet state dict")
    return features


def load_lpips(net: str = "vgg", backbone: str | os.PathLike | None = None, seed: int = 0) -> nn.Module:
    """`lpips.LPIPS` (v0.1, calibrated linear layers from the package) with its backbone from `backbone`, a
    local torchvision weights file; None gives a random backbone (seeded), for the `tiny` preset and tests.
    Frozen and in eval mode. Built on the meta device first, so torchvision's classifier (0.5 GB for VGG16,
    unused by LPIPS) is never allocated and nothing is downloaded."""
    import lpips

    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")  # lpips passes `pretrained`
        model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    linear_file = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    linear = torch.load(linear_file, map_location="cpu", weights_only=True)
    if backbone is None:
        features = _random_backbone(model.net, seed)
    else:
        features = read_backbone(backbone)
    scaling = lpips.ScalingLayer().state_dict()
    state = {}
    for key in model.state_dict():
        part, _, rest = key.partition(".")
        if part == "scaling_layer":
            state[key] = scaling[rest]
        elif part == "net":  # net.slice<k>.<index>.<weight|bias>: slices keep torchvision's feature indices
            feature_key = rest.partition(".")[2]
            if feature_key not in features:
                raise ValueError(f"decoder.lpips_backbone has no weight `features.{feature_key}`: not a torchvision "
                                 f"{net} file (decoder.lpips_net = {net!r})")
            state[key] = features[feature_key]
        else:  # lin<k>.model.1.weight, also reachable as lins.<k>.model.1.weight
            state[key] = linear[key.replace("lins.", "lin", 1)]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        first = str(error).split("\n")[1].strip() if "\n" in str(error) else str(error)
        raise ValueError(f"decoder.lpips_backbone does not fit LPIPS's {net} backbone: {first}") from error
    return model.requires_grad_(False).eval()


def _random_backbone(net: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random convolution weights (PyTorch's default initialisation) in the backbone's layout."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        features = {}
        for slice_module in net.children():
            for index, layer in slice_module.named_children():
                if isinstance(layer, nn.Conv2d):
                    real = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                     layer.padding)
                    features[f"{index}.weight"], features[f"{index}.bias"] = real.weight.data, real.bias.data
        return features
    finally:
        torch.random.set_rng_state(generator_state)


def perceptual_distance(lpips_model: nn.Module, decoded: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Per-clip mean LPIPS (B,) of clips (B, T, 3, H, W) in [-1, 1], frame by frame (as sgm does for dims > 2)."""
    batch = frames.shape[0]
    distance = lpips_model(decoded.flatten(0, 1), frames.flatten(0, 1))  # (B*T, 1, 1, 1)
    return distance.reshape(batch, -1).mean(1)
