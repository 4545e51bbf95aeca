"""Training speed, measured side by side in one run on real curated clips (CPU here, GPU when present).

  ours    StageTrainer.train_step: VAE + text encoding, per-sample EDM noise from (seed, position), the
          phase's trainable set, gradient clipping, AdamW with warmup, EMA (stage III settings)
  bare    the same model, batch and VAE/text encoding by hand: one EDM loss with batch-drawn noise,
          backward, AdamW step; nothing else
  loader  TrainingStream + DataLoader (decode MP4, stride sampling, resize/crop, captions) in samples/s,
          against the samples/s the training step consumes

Targets (issue 6): ours/bare <= 1.10x; loader >= 2x the step's consumption. Also printed: the share of the
step spent encoding latents with the VAE (what an `encode-latents` precompute pass could save at most).
On a GPU: `--preset svd --height 256 --width 384 --frames 14 --batch 1` gives stage II samples/s and peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

if not __package__:  # run as a script: keep benchmarks/ from shadowing project packages
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from dataformat import find_shards, index_shards  # noqa: E402
from model.conditioning import micro_conditioning  # noqa: E402
from model.edm import EDMLoss, LogNormalNoise, VPredictionPreconditioning  # noqa: E402
from model.loading import load_pipeline  # noqa: E402
from training.data import TrainingStream, training_loader  # noqa: E402
from training.loop import group_steps  # noqa: E402
from training.stages import Phase, get_stage_preset  # noqa: E402
from training.trainer import StageTrainer  # noqa: E402

BENCH_UNET = dict(  # bigger than `tiny` so per-step fixed costs do not dominate; same as benchmarks/sampling.py
    sample_size=32, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
    down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 2 + ("DownBlockSpatioTemporal",),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    num_attention_heads=(2, 4, 4), cross_attention_dim=128, addition_time_embed_dim=64,
    projection_class_embeddings_input_dim=192,
)


def curated_data(path: str | None) -> str:
    if path:
        return path
    from curation.dataset import run_sequential
    from curation.sample_data import VIDEO_DIR, build_sample_data

    root = Path(tempfile.mkdtemp(prefix="lvd-bench-train-"))
    build_sample_data(root / "sample")
    run_sequential(root / "sample" / VIDEO_DIR, root / "curated")
    return str(root / "curated")


def build_pipeline(preset: str, device: torch.device):
    pipeline = load_pipeline("tiny")
    if preset == "svd":
        from model.text import tiny_text_encoder
        from model.unet import VideoUNet

        pipeline.unet = VideoUNet.from_preset("svd")
        pipeline.text_encoder, pipeline.tokenizer = tiny_text_encoder(hidden_size=1024)
    elif preset == "bench":
        from model.text import tiny_text_encoder
        from model.unet import VideoUNet

        torch.manual_seed(0)
        pipeline.unet = VideoUNet(**BENCH_UNET, in_channels=4, num_frames=8)
        pipeline.text_encoder, pipeline.tokenizer = tiny_text_encoder(hidden_size=BENCH_UNET["cross_attention_dim"])
    return pipeline.to(device)


def bare_step(trainer: StageTrainer, optimizer, loss_fn: EDMLoss, batch: dict, generator) -> None:
    """The minimum: encode, one EDM loss, backward, AdamW."""
    latents, context = trainer.encode_batch(batch)
    batch_size, frames = latents.shape[:2]
    ids = micro_conditioning(batch["fps"], batch["motion_bucket"], 0.0, device=trainer.device)  # as the trainer
    image_only = torch.zeros(batch_size, frames, device=trainer.device)

    def network(x, c_noise):
        return trainer.unet(x, c_noise, encoder_hidden_states=context, added_time_ids=ids,
                            image_only_indicator=image_only).sample.float()

    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.autocast_dtype is not None):
        loss = loss_fn(network, latents, generator=generator).mean()
    loss.backward()
    optimizer.step()


def timed(function, repeats: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="curate-lvd output (default: curate the sample clips)")
    parser.add_argument("--preset", default="bench", choices=("tiny", "bench", "svd"))
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--loader-workers", type=int, default=1)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    samples = index_shards(find_shards(curated_data(args.data)))
    phase = Phase("bench", args.height, args.width, args.frames, 10_000, args.batch, 1e-4, -1.2, 1.2)
    preset = replace(get_stage_preset(3, "svd" if args.preset == "svd" else "tiny"), phases=(phase,),
                     gradient_checkpointing=args.preset == "svd")
    stream = TrainingStream(samples, preset, seed=0, micro_batch_size=args.batch)
    steps = [s for _, s in zip(range(args.repeats + 1), group_steps(stream), strict=False)]

    trainer = StageTrainer(build_pipeline(args.preset, device), preset, device=device, micro_batch_size=args.batch)
    bare_optimizer = torch.optim.AdamW(list(trainer.unet.parameters()), lr=1e-4)
    loss_fn = EDMLoss(VPredictionPreconditioning(), LogNormalNoise(phase.p_mean, phase.p_std))
    generator = torch.Generator().manual_seed(0)
    batch = steps[0][0]

    def ours() -> None:
        trainer.step = 0  # same batch every time: the step counter must match the data
        trainer.train_step([batch])

    # warm-up both, then interleave so drift on a noisy machine hits both equally
    ours()
    bare_step(trainer, bare_optimizer, loss_fn, batch, generator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ours_times, bare_times, encode_times = [], [], []
    for _ in range(args.repeats):
        ours_times += timed(ours, 1, device)
        bare_times += timed(lambda: bare_step(trainer, bare_optimizer, loss_fn, batch, generator), 1, device)
        encode_times += timed(lambda: trainer.encode_batch(batch), 1, device)
    step_s, bare_s, encode_s = (statistics.median(t) for t in (ours_times, bare_times, encode_times))

    loader = training_loader(TrainingStream(samples, preset, seed=1, micro_batch_size=args.batch),
                             num_workers=args.loader_workers)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    count, start = 0, time.perf_counter()
    for _ in range(args.repeats * 2):
        count += len(next(iterator)["captions"])
    loader_rate = count / (time.perf_counter() - start)
    step_rate = args.batch / step_s

    params = sum(p.numel() for p in trainer.unet.parameters())
    print(f"device {device}, U-Net {args.preset} ({params / 1e6:.1f}M params), batch {args.batch} x "
          f"{args.frames} frames at {args.height}x{args.width}, median of {args.repeats}")
    print(f"ours  {step_s:.3f} s/step   bare {bare_s:.3f} s/step   ours/bare {step_s / bare_s:.3f}x (target <= 1.10x)")
    print(f"loader {loader_rate:.1f} samples/s ({args.loader_workers} worker(s))   step consumes "
          f"{step_rate:.1f} samples/s   loader/step {loader_rate / step_rate:.2f}x (target >= 2x)")
    print(f"VAE + text encoding {encode_s:.3f} s = {100 * encode_s / step_s:.0f}% of a step "
          "(the most an encode-latents precompute could save)")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, "
              f"{args.batch / step_s:.2f} samples/s")


if __name__ == "__main__":
    main()
