"""Image-to-video at SVD-XT size on a GPU: seconds and peak memory, ours vs diffusers, side by side in one run.

Default configuration: 25 frames at 576 x 1024, 25 steps, guidance 1.0 -> 3.0 over frames, bfloat16, decode
chunk 14; the SVD-XT U-Net (1.5B parameters, 8 input channels), SD 2.x-size temporal-decoder VAE and a
ViT-H CLIP vision encoder. Without `--checkpoint` the weights are random (same compute, no download);
`--checkpoint DIR` times a real SVD / SVD-XT folder instead. Both sides use the same weights: ours is
`ImageToVideoPipeline` (U-Net as `VideoUNet`), diffusers' is `StableVideoDiffusionPipeline` with its own
`UNetSpatioTemporalConditionModel`. Each side is warmed up once, then timed `--repeats` times (best kept),
with the CUDA peak memory of its timed runs.

Needs CUDA; on a machine without it the script says so and exits (status 0, so `make benchmarks` passes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if not __package__:  # run as a script: keep benchmarks/ from shadowing project packages
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402


def build(args):
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from model.image_to_video import ImageToVideoPipeline
    from model.pipeline import SVD_SCHEDULER_CONFIG
    from model.unet import VideoUNet

    dtype = getattr(torch, args.dtype)
    if args.checkpoint:
        ours = ImageToVideoPipeline.from_pretrained(args.checkpoint, dtype=dtype).to("cuda")
        theirs = StableVideoDiffusionPipeline.from_pretrained(args.checkpoint, dtype=dtype).to("cuda")
        return ours, theirs
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = VideoUNet.from_preset("svd", in_channels=8, num_frames=args.frames)
        config = {k: v for k, v in unet.config.items() if not k.startswith("_") and k != "spatial_resnet_eps"}
        diffusers_unet = UNetSpatioTemporalConditionModel(**config)
        diffusers_unet.load_state_dict(unet.state_dict())
        vae = AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * 4, layers_per_block=2,
                                           block_out_channels=(128, 256, 512, 512), latent_channels=4)
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
            image_size=224, projection_dim=1024, hidden_act="gelu"))
    processor = CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})
    modules = [m.eval().to(dtype) for m in (unet, diffusers_unet, vae, vision)]
    unet, diffusers_unet, vae, vision = modules
    ours = ImageToVideoPipeline(vae=vae, image_encoder=vision, unet=unet, feature_extractor=processor,
                                scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG))
    theirs = StableVideoDiffusionPipeline(vae=vae, image_encoder=vision, unet=diffusers_unet,
                                          feature_extractor=processor,
                                          scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG))
    return ours, theirs


def measure(function, repeats: int) -> tuple[float, float]:
    """(best seconds, peak GiB allocated) over `repeats` timed calls."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best, torch.cuda.max_memory_allocated() / 2**30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="SVD / SVD-XT folder (default: random weights)")
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--height", type=int, default=576)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--decode-chunk-size", type=int, default=14)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/sampling_gpu.py: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was "
              "measured. Run it on a machine with one.")
        return 0
    import numpy as np
    from PIL import Image

    ours, theirs = build(args)
    theirs.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), np.uint8))
    common = dict(height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
                  min_guidance_scale=1.0, max_guidance_scale=3.0, decode_chunk_size=args.decode_chunk_size)

    def run_ours(steps: int = args.steps) -> None:
        ours(image, generator=torch.Generator().manual_seed(0), progress=False, **dict(common,
                                                                                       num_inference_steps=steps))

    def run_theirs(steps: int = args.steps) -> None:
        theirs(image, generator=torch.Generator().manual_seed(0), output_type="np", **dict(common,
                                                                                           num_inference_steps=steps))

    run_ours(2)
    run_theirs(2)  # warm-up: kernels, allocator
    ours_s, ours_gib = measure(run_ours, args.repeats)
    theirs_s, theirs_gib = measure(run_theirs, args.repeats)
    params = sum(p.numel() for p in ours.unet.parameters()) / 1e9
    print(f"config: U-Net {params:.2f}B params, {args.frames} frames {args.height}x{args.width}, {args.steps} steps, "
          f"guidance 1.0->3.0, decode chunk {args.decode_chunk_size}, {args.dtype}, {torch.cuda.get_device_name()}, "
          f"weights: {args.checkpoint or 'random'}; best of {args.repeats}")
    print(f"ours ImageToVideoPipeline:              {ours_s:8.2f} s   peak {ours_gib:6.1f} GiB")
    print(f"diffusers StableVideoDiffusionPipeline: {theirs_s:8.2f} s   peak {theirs_gib:6.1f} GiB")
    print(f"speed ours vs diffusers: {theirs_s / ours_s:.2f}x  (target >= 1.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
