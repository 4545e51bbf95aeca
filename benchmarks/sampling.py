"""Sampling speed, measured side by side in one run on one tiny-but-not-trivial configuration (CPU here).

  ours      TextToVideoPipeline: text encode, Euler/Karras sampling with frame-wise CFG, chunked VAE decode
  bare      the same work by hand: steps x one batched U-Net forward (cond + uncond) + the same VAE decode
  diffusers StableVideoDiffusionPipeline with a U-Net of the same size (8 input channels: it concatenates the
            image latent), same steps, frames, CFG range and temporal-decoder VAE

Targets (issue 5): overhead of ours over bare <= 5 %; ours >= 1.0x diffusers' speed.
On a GPU: `--preset svd --frames 25 --height 576 --width 1024 --steps 25 --dtype bfloat16` (needs ~40 GB).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if not __package__:  # run as a script: keep benchmarks/ from shadowing project packages
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

from model.edm import VPredictionPreconditioning, initial_noise_scale, karras_sigmas  # noqa: E402
from model.pipeline import SVD_SCHEDULER_CONFIG, TextToVideoPipeline  # noqa: E402
from model.sampling import linear_guidance_scales  # noqa: E402
from model.text import tiny_text_encoder  # noqa: E402
from model.unet import VideoUNet  # noqa: E402
from model.vae import decode_latents  # noqa: E402

BENCH_UNET = dict(
    sample_size=32, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
    down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 2 + ("DownBlockSpatioTemporal",),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    num_attention_heads=(2, 4, 4), cross_attention_dim=128, addition_time_embed_dim=64,
    projection_class_embeddings_input_dim=192,
)


def temporal_vae() -> AutoencoderKLTemporalDecoder:
    torch.manual_seed(0)
    return AutoencoderKLTemporalDecoder(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4,
                                        down_block_types=("DownEncoderBlock2D",) * 4).eval()


def build(args) -> tuple[TextToVideoPipeline, StableVideoDiffusionPipeline]:
    if args.preset == "svd":
        ours_unet, svd_unet = VideoUNet.from_preset("svd"), VideoUNet.from_preset("svd", in_channels=8)
        cross = 1024
    else:
        torch.manual_seed(0)
        ours_unet = VideoUNet(**BENCH_UNET, in_channels=4, num_frames=args.frames)
        svd_unet = VideoUNet(**BENCH_UNET, in_channels=8, num_frames=args.frames)
        cross = BENCH_UNET["cross_attention_dim"]
    text_encoder, tokenizer = tiny_text_encoder(hidden_size=cross)
    scheduler = EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)
    ours = TextToVideoPipeline(unet=ours_unet, vae=temporal_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                               scheduler=scheduler)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=64, intermediate_size=128,
                                                            num_hidden_layers=2, num_attention_heads=2,
                                                            image_size=224, patch_size=32, projection_dim=cross))
    svd = StableVideoDiffusionPipeline(vae=temporal_vae(), image_encoder=vision.eval(), unet=svd_unet,
                                       scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG),
                                       feature_extractor=CLIPImageProcessor(crop_size=224, size=224))
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return ours.to(device, dtype), svd.to(device, dtype)


@torch.no_grad()
def bare(pipe: TextToVideoPipeline, args) -> None:
    """The irreducible work: steps x U-Net(cond+uncond batch) + Euler updates + the VAE decode."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    context = pipe.encode_prompt(["a cyclist on a street"]).to(device, dtype)
    ids = torch.tensor([[7.0, 127.0, 0.0]] * 2, device=device, dtype=dtype)
    h, w = args.height // 8, args.width // 8
    x = torch.randn(1, args.frames, 4, h, w, device=device) * initial_noise_scale(700.0)
    sigmas = karras_sigmas(args.steps).to(device)
    pre = VPredictionPreconditioning()
    scales = linear_guidance_scales(args.frames, 1.0, 2.5).to(device).reshape(1, -1, 1, 1, 1)
    for i in range(args.steps):
        sigma = sigmas[i]
        x_in = torch.cat([x, x]) * pre.c_in(sigma)
        out = pipe.unet(x_in.to(dtype), pre.c_noise(sigma).expand(2).to(dtype), context, ids).sample.float()
        denoised = pre.c_skip(sigma) * torch.cat([x, x]) + pre.c_out(sigma) * out
        uncond, cond = denoised.chunk(2)
        denoised = uncond + scales * (cond - uncond)
        x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
    decode_latents(pipe.vae, x.to(pipe.vae.dtype), chunk_size=args.decode_chunk_size)


def timed(function, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench", choices=["bench", "svd"])
    parser.add_argument("--frames", type=int, default=14)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--decode-chunk-size", type=int, default=7)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ours, svd = build(args)
    image = Image.fromarray(np.full((args.height, args.width, 3), 127, np.uint8))
    common = dict(num_frames=args.frames, height=args.height, width=args.width, num_inference_steps=args.steps,
                  decode_chunk_size=args.decode_chunk_size)

    def run_ours():
        ours("a cyclist on a street", guidance_scale=(1.0, 2.5), progress=False, output_type="np", **common)

    def run_svd():
        svd(image, min_guidance_scale=1.0, max_guidance_scale=2.5, output_type="np", **common)

    for function in (run_ours, run_svd):  # warm-up
        function()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t_ours = timed(run_ours, args.repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    t_bare = timed(lambda: bare(ours, args), args.repeats)
    t_svd = timed(run_svd, args.repeats)
    params = sum(p.numel() for p in ours.unet.parameters()) / 1e6
    print(f"config: {args.preset} U-Net {params:.1f}M params, {args.frames} frames {args.height}x{args.width}, "
          f"{args.steps} steps, CFG 1.0->2.5, {args.dtype}, device {ours.device}; best of {args.repeats}")
    print(f"ours (TextToVideoPipeline):            {t_ours:8.2f} s")
    print(f"bare (steps x U-Net + VAE decode):      {t_bare:8.2f} s")
    print(f"diffusers StableVideoDiffusionPipeline: {t_svd:8.2f} s")
    print(f"overhead ours / bare: {100 * (t_ours / t_bare - 1):+.1f} %  (target <= 5 %)")
    print(f"speed ours vs diffusers: {t_svd / t_ours:.2f}x  (target >= 1.0x)")
    if torch.cuda.is_available():
        print(f"peak GPU memory (ours): {peak:.1f} GiB")


if __name__ == "__main__":
    main()
