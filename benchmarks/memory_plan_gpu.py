"""The memory plan's predictions vs a GPU: peak memory of real SVD-size training steps, predicted and measured
side by side in one run.

For each configuration (trainable set, frames, resolution, micro-batch, checkpointing, optimizer) the script
prints the plan's prediction (training/memory_plan.py, computed on the CPU without weights) and then, on a CUDA
machine, builds the same stage with random weights at the real size (SVD's 1.5 B U-Net with 8 input channels,
the SD 2.x-size temporal-decoder VAE, a ViT-H CLIP vision encoder: same compute as the released weights),
runs two optimizer steps of `StageTrainer` on random pixels and reads `torch.cuda.max_memory_allocated()`.
A configuration that runs out of memory is reported as such (and the script goes on with the next).

    python benchmarks/memory_plan_gpu.py                    # the default configurations
    python benchmarks/memory_plan_gpu.py --only lora-14f-576x1024 sgm-all-14f-576x1024
    python benchmarks/memory_plan_gpu.py --predict-only     # no GPU: the predictions alone

Without CUDA (and without --predict-only) it prints the predictions and says the measurements need a GPU.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

if not __package__:  # run as a script: keep benchmarks/ from shadowing project packages
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402


@dataclass(frozen=True)
class Config:
    name: str
    trainable: str
    frames: int
    height: int = 576
    width: int = 1024
    micro_batch: int = 1
    checkpointing: bool = True
    optimizer: str = "adamw"
    ema: bool = True
    published: str = ""  # what people report for this setup on their GPUs


# The first five are setups with published figures (issue threads of the trainers, batch 1): SVD_Xtend trains with
# fp16 autocast, fp32 U-Net weights, no EMA, frozen VAE/CLIP in fp16; sgm with checkpointing and EMA.
CONFIGS = [
    Config("xtend-all-16f-320x512", "all", 16, 320, 512, checkpointing=False, ema=False,
           published="~63 GB (pixeli99/SVD_Xtend#4)"),
    Config("xtend-temporal-14f-320x448", "temporal", 14, 320, 448, checkpointing=False, ema=False,
           published="~23 GB, others 31-52 GB (pixeli99/SVD_Xtend#31)"),
    Config("sgm-all-14f-576x1024", "all", 14, published="~70 GB (Stability-AI/generative-models#249)"),
    Config("xt-all-25f-576x1024", "all", 25, published="> 80 GB (Stability-AI/generative-models#280)"),
    Config("xt-lora-25f-576x1024-no-ckpt", "lora", 25, checkpointing=False,
           published="> 80 GB (generative-models#280, a comment)"),
    Config("lora-14f-576x1024", "lora", 14),
    Config("temporal-14f-576x1024", "temporal", 14),
    Config("all-14f-576x1024-8bit", "all", 14, optimizer="adamw8bit"),
    Config("all-14f-576x1024-no-ckpt", "all", 14, checkpointing=False),
    Config("lora-25f-576x1024", "lora", 25),
    Config("temporal-25f-576x1024", "temporal", 25),
]


def setup_of(config: Config):
    from training.memory_plan import TrainingSetup

    return TrainingSetup(frames=config.frames, height=config.height, width=config.width,
                         micro_batch=config.micro_batch, accumulation=1, trainable=config.trainable, lora_rank=16,
                         checkpointing=config.checkpointing, bf16=True, optimizer=config.optimizer, ema=config.ema,
                         fsdp_workers=1)


def predict(config: Config) -> float:
    from training.memory_plan import GIB, architecture, estimate

    arch = architecture("svd", "image", None)
    return estimate(arch.unet, setup_of(config), arch.vae, arch.encoder, "image").peak / GIB


def _pipeline(frames: int):
    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from model.image_to_video import ImageToVideoPipeline
    from model.pipeline import SVD_SCHEDULER_CONFIG
    from model.unet import VideoUNet
    from training.memory_plan import CLIP_VIT_H_VISION, SVD_VAE

    with torch.device("cuda"):
        unet = VideoUNet.from_preset("svd", in_channels=8, num_frames=frames)
        vae = AutoencoderKLTemporalDecoder(**SVD_VAE)
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_H_VISION, hidden_act="gelu"))
    return ImageToVideoPipeline(vae=vae, image_encoder=vision, unet=unet,
                                feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}),
                                scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG))


def measure_on_gpu(config: Config) -> float:
    """Peak GiB of two optimizer steps of StageTrainer on the GPU (random weights, random pixels)."""
    from training.memory_plan import GIB
    from training.stages import get_stage_preset
    from training.trainer import StageTrainer

    stage = get_stage_preset(3, "svd", "image")
    phase = replace(stage.phases[0], height=config.height, width=config.width, num_frames=config.frames,
                    batch_size=config.micro_batch, trainable=config.trainable, warmup_steps=0, iterations=2)
    preset = replace(stage, phases=(phase,), gradient_checkpointing=config.checkpointing, optimizer=config.optimizer,
                     lora_rank=16, lora_alpha=16.0, ema_decay=0.9999 if config.ema else None)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer = None
    try:
        trainer = StageTrainer(_pipeline(config.frames), preset, device="cuda", micro_batch_size=config.micro_batch)
        generator = torch.Generator().manual_seed(0)
        for step in range(2):
            pixels = torch.rand(config.micro_batch, config.frames, 3, config.height, config.width,
                                generator=generator) * 2 - 1
            batch = {"pixels": pixels, "captions": [""] * config.micro_batch,
                     "fps": torch.full((config.micro_batch,), 7.0),
                     "motion_bucket": torch.full((config.micro_batch,), 127.0),
                     "positions": torch.arange(config.micro_batch) + step * config.micro_batch, "step": step}
            trainer.train_step([batch])
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / GIB
    finally:
        del trainer
        gc.collect()
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=[c.name for c in CONFIGS], help="run these configurations")
    parser.add_argument("--predict-only", action="store_true", help="print the predictions, measure nothing")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    configs = [c for c in CONFIGS if not args.only or c.name in args.only]
    measuring = torch.cuda.is_available() and not args.predict_only
    device = torch.cuda.get_device_name() if measuring else "no GPU: predictions only"
    print(f"memory plan vs {device}; peak GiB per worker (torch.cuda.max_memory_allocated)", flush=True)
    print("| configuration | published | predicted | measured | measured / predicted | plan seconds (CPU) |")
    print("|---|---|---|---|---|---|")
    for config in configs:
        start = time.perf_counter()
        predicted = predict(config)
        seconds = time.perf_counter() - start
        measured_text, ratio = "-", "-"
        if measuring:
            try:
                measured = measure_on_gpu(config)
                measured_text, ratio = f"{measured:.1f}", f"{measured / predicted:.2f}"
            except torch.cuda.OutOfMemoryError:
                total = torch.cuda.get_device_properties(0).total_memory / 2**30
                measured_text, ratio = f"out of memory (> {total:.0f})", "-"
        print(f"| {config.name} | {config.published or '-'} | {predicted:.1f} | {measured_text} | {ratio} | "
              f"{seconds:.0f} |", flush=True)
    if not torch.cuda.is_available() and not args.predict_only:
        print("measurements need a CUDA GPU; run this script on one to fill the measured column")
    return 0


if __name__ == "__main__":
    sys.exit(main())
