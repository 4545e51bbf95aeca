"""Optional upscaling of generated frames: Real-ESRGAN's RRDBNet from a weights file, or Lanczos (OpenCV).

Backend `realesrgan`: the RRDBNet generator of ESRGAN (Wang et al. 2018) as Real-ESRGAN trains it
(Wang et al. 2021): conv_first, `num_block` Residual-in-Residual Dense Blocks (3 dense blocks of 5 convs,
growth `num_grow_ch`, residuals scaled by 0.2), conv_body, two nearest-neighbour x2 upsampling convs,
conv_hr, conv_last. Its x2 model pixel-unshuffles the input by 2 first (x1 by 4), so the body always
upsamples by 4. Parameter names follow Real-ESRGAN's released `.pth` files (`params_ema` or `params`
inside), so e.g. RealESRGAN_x4plus.pth or RealESRGAN_x2plus.pth load as they are; `.safetensors` too.
Sizes are read from the weights, so nothing has to be configured by hand.

Backend `lanczos`: cv2.resize with INTER_LANCZOS4, for when no weights are at hand. Off by default.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

BACKENDS = ("lanczos", "realesrgan")


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier output; the result is scaled by 0.2
    and added back (ESRGAN's residual scaling keeps very deep generators trainable)."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual in Residual Dense Block: three dense blocks and an outer residual, also scaled by 0.2."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN / Real-ESRGAN generator; input and output RGB in [0, 1], output `scale` times larger."""

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, scale: int = 4, num_feat: int = 64,
                 num_block: int = 23, num_grow_ch: int = 32) -> None:
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError(f"RRDBNet scale must be 1, 2 or 4, got {scale}")
        self.scale = scale
        unshuffled_in = num_in_ch * {4: 1, 2: 4, 1: 16}[scale]
        self.conv_first = nn.Conv2d(unshuffled_in, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale < 4:
            factor = 4 // self.scale
            if x.shape[-2] % factor or x.shape[-1] % factor:
                raise ValueError(f"a x{self.scale} RRDBNet needs sizes divisible by {factor}, got {tuple(x.shape)}")
            x = F.pixel_unshuffle(x, factor)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a Real-ESRGAN `.pth` (unwrapping `params_ema` / `params`) or a `.safetensors` file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"upscaler weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("params_ema", "params"):
        if isinstance(state, dict) and key in state:
            state = state[key]
    if not isinstance(state, dict) or "conv_first.weight" not in state:
        raise ValueError(f"{path} is not an RRDBNet state dict (no conv_first.weight)")
    return state


def rrdbnet_from_state_dict(state: dict[str, torch.Tensor]) -> RRDBNet:
    """Build an RRDBNet whose sizes match the weights (blocks, widths, x1/x2/x4 from conv_first's input)."""
    first = state["conv_first.weight"]
    num_feat, unshuffled_in = first.shape[:2]
    num_out_ch = state["conv_last.weight"].shape[0]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.", k))}
    num_grow_ch = state["body.0.rdb1.conv1.weight"].shape[0]
    scale = {1: 4, 4: 2, 16: 1}.get(unshuffled_in // num_out_ch) if unshuffled_in % num_out_ch == 0 else None
    if scale is None:
        raise ValueError(f"cannot infer the scale from conv_first's {unshuffled_in} input channels")
    model = RRDBNet(num_out_ch, num_out_ch, scale, num_feat, len(blocks), num_grow_ch)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_rrdbnet(path: str | Path) -> RRDBNet:
    return rrdbnet_from_state_dict(read_state_dict(path))


@torch.no_grad()
def upscale_frames(frames: np.ndarray, scale: int = 2, backend: str = "lanczos", weights: str | Path | None = None,
                   batch_size: int = 4, device: str | torch.device = "cpu") -> np.ndarray:
    """uint8 (T, H, W, 3) -> uint8 (T, scale*H, scale*W, 3).

    `realesrgan` runs the network at its own factor and, if `scale` differs, Lanczos-resizes its output
    to `scale` (as Real-ESRGAN's `--outscale` does)."""
    import cv2

    if backend not in BACKENDS:
        raise ValueError(f"upscale backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"upscale factor must be a positive int, got {scale!r}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1] * scale, frames.shape[2] * scale
    if backend == "lanczos":
        return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_LANCZOS4) for f in frames])
    if weights is None:
        raise ValueError("the realesrgan upscaler needs a weights file (e.g. RealESRGAN_x4plus.pth)")
    model = load_rrdbnet(weights).to(device)
    out = []
    for start in range(0, len(frames), batch_size):
        batch = torch.from_numpy(frames[start : start + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255
        result = model(batch).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        out.extend(result)
    if out[0].shape[:2] != (height, width):
        out = [cv2.resize(f, (width, height), interpolation=cv2.INTER_LANCZOS4) for f in out]
    return np.stack(out)
