"""Peak memory of sampling a video, estimated from the configs alone, so absurd sizes are refused before any
weights load (an allocator traceback after minutes, or a size just under RAM that thrashes, otherwise).

The estimate is analytic: it counts the tensors that are alive at the two peaks of a sampling call, in bytes.

* weights: every parameter in the sampling dtype (`parameters` x dtype bytes).
* U-Net pass: the U-Net runs on `B x T` frames (twice that with classifier-free guidance) at the latent size
  `h x w = H/f x W/f` (`f` the VAE's downscale). Alive are the skip activations the down path keeps for the up
  path (`conv_in`'s, then `layers_per_block + 1` per level with that level's channels at 1/4 the area per
  level), plus the working set of one block at the first level: a transformer's feed-forward holds the GEGLU
  projection (8 x c0), its gated half (4 x c0) and the block input/normed copies: `UNET_WORK = 16` x c0
  channels. Attention is taken as memory-efficient (SDPA), so no (h w)^2 term.
* VAE decode: `decode_chunk_size` frames go through the decoder together; its widest live set is at full
  resolution in the last up block: a ResNet's input, normed, activated and convolved copies plus the
  upsampler's output and the temporal decoder's time-mixing copies (measured: `VAE_WORK = 9` x the
  decoder's top channel count) per frame of the chunk. The decoded
  frames accumulate as 3-channel float32 and are copied up to three times at the end (concatenate, stack,
  clamp / scale to uint8), `OUTPUT_COPIES = 3`.

peak = weights + RUNTIME_OVERHEAD + max(U-Net pass + latents, VAE decode + decoded frames), with
RUNTIME_OVERHEAD = 256 MiB the measured fixed cost of a first large call (allocator arenas, oneDNN scratch).
tests/test_sampling_memory.py compares it with the measured peak of a real (tiny) pipeline at two sizes: it may
under-estimate by at most `ESTIMATE_FACTOR` and over-estimate by at most `OVERESTIMATE_FACTOR` (the fixed
overhead dominates a tiny call, and its measured share varies with the machine's load: 186-320 MB at 256 x 256).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

UNET_WORK = 16
VAE_WORK = 9
OUTPUT_COPIES = 3
RUNTIME_OVERHEAD = 256 * 2**20  # measured: allocator arenas and oneDNN scratch of a first large call
LATENT_COPIES = 8  # x, the preconditioned input, the denoised output, the Euler step's temporaries
ESTIMATE_FACTOR = 2.0  # the tested bound on under-estimation: measured / estimate <= ESTIMATE_FACTOR
OVERESTIMATE_FACTOR = 3.0  # and on over-estimation: measured / estimate >= 1 / OVERESTIMATE_FACTOR
MAX_SIDE = 16384  # pixels: above any model's training size by far; larger is refused whatever memory says
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class SamplingMemory:
    """The estimate's parts in bytes, so a refusal can say which one is large."""

    weights: int
    unet: int
    decode: int

    @property
    def peak(self) -> int:
        return self.weights + RUNTIME_OVERHEAD + max(self.unet, self.decode)


def scale_factor_of(vae_config: dict[str, Any]) -> int:
    """The VAE's downscale factor from its config (2 ** (levels - 1)), as `model.vae.scale_factor`."""
    return 2 ** (len(vae_config.get("block_out_channels", (0, 0, 0, 0))) - 1)


def estimate_sampling_memory(unet_config: dict[str, Any], vae_config: dict[str, Any], *, parameters: int,
                             height: int, width: int, num_frames: int, batch: int = 1, guided: bool = True,
                             decode_chunk_size: int = 14, dtype: str = "float32") -> SamplingMemory:
    """Bytes alive at the peaks of one sampling call (module docstring for the formula)."""
    size = DTYPE_BYTES[dtype]
    factor = scale_factor_of(vae_config)
    area = (height // factor) * (width // factor)
    channels = list(unet_config.get("block_out_channels", (320,)))
    per_level = int(unet_config.get("layers_per_block", 2) if not isinstance(unet_config.get("layers_per_block"),
                                                                          list | tuple)
                    else max(unet_config["layers_per_block"]))
    skips = channels[0] + sum((per_level + 1) * c / 4 ** level for level, c in enumerate(channels))
    unet_frames = batch * num_frames * (2 if guided else 1)
    latent_channels = int(unet_config.get("in_channels", 8))
    latents = LATENT_COPIES * unet_frames * latent_channels * area * 4
    unet = int(unet_frames * area * size * (skips + UNET_WORK * channels[0])) + latents

    pixels = height * width
    top = int(list(vae_config.get("block_out_channels", (128,)))[0])
    chunk = min(decode_chunk_size, num_frames)
    frames = batch * num_frames * 3 * pixels * 4
    decode = max(chunk * pixels * size * VAE_WORK * top + frames, OUTPUT_COPIES * frames)
    return SamplingMemory(weights=parameters * size, unet=unet, decode=int(decode))


def available_memory(device: str) -> int:
    """Bytes free where sampling runs: CUDA's free memory on a GPU, the OS's available memory on the CPU."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def check_sampling_size(height: int, width: int, factor: int, *, bound: bool = True) -> None:
    """ValueError (one line) for a size the pipeline would refuse late (not a multiple of the VAE's downscale) or,
    with `bound`, larger than any model samples (`MAX_SIDE`)."""
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor} (the VAE's downscale), got "
                         f"{height}x{width}")
    if bound and max(height, width) > MAX_SIDE:
        raise ValueError(f"height and width must be at most {MAX_SIDE} pixels, got {height}x{width}")


def check_sampling_memory(estimate: SamplingMemory, available: int, where: str) -> None:
    """ValueError (one line) naming the estimate and what is free when sampling could never fit."""
    if estimate.peak > available:
        gib = 2**30
        raise ValueError(
            f"sampling needs about {estimate.peak / gib:.1f} GiB (weights {estimate.weights / gib:.1f}, U-Net "
            f"{estimate.unet / gib:.1f}, VAE decode {estimate.decode / gib:.1f}); {available / gib:.1f} GiB is "
            f"available on the {where}: use a smaller --height/--width/--frames or --decode-chunk-size")
