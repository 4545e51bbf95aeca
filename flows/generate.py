"""Flow `generate-video` and `lvd generate`: text -> video with a trained checkpoint (or the tiny preset).

Orchestration only: loading and sampling live in model.pipeline. The flow writes one MP4 and one GIF per
prompt and attaches a preview (the GIF inline) and the settings to the run as a markdown artifact.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.markdown import inline_image, settings_table

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def load_pipeline(checkpoint: str | None, dtype: str = "float32", cpu_offload: bool = False):
    """A saved TextToVideoPipeline directory (e.g. a train-stage export), or the random tiny preset."""
    import torch

    from model.pipeline import TextToVideoPipeline

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if checkpoint is None:
        pipe = TextToVideoPipeline.from_preset("tiny")
    else:
        path = Path(checkpoint)
        if not (path / "model_index.json").exists():
            raise ValueError(f"{checkpoint} is not a pipeline directory (no model_index.json); "
                             "pass a train-stage export or a save_pretrained() directory")
        pipe = TextToVideoPipeline.from_pretrained(path, dtype=getattr(torch, dtype))
    if cpu_offload:
        pipe.enable_model_cpu_offload()
    elif torch.cuda.is_available():
        pipe.to("cuda")
    return pipe


def parse_guidance(value: str | float | list) -> float | tuple[float, float]:
    """'7' -> 7.0 (constant CFG); '1.0,2.5' -> (1.0, 2.5) rising linearly over frames."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list | tuple):
        return (float(value[0]), float(value[1]))
    parts = [float(p) for p in str(value).split(",")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise ValueError(f"guidance must be 'w' or 'min,max', got {value!r}")


def generate_files(prompts: list[str], output_dir: str, checkpoint: str | None = None, *, num_frames: int = 14,
                   height: int | None = None, width: int | None = None, steps: int = 25,
                   guidance: str | float | list = "1.0,2.5", fps: int = 7, motion_bucket_id: int = 127,
                   seed: int = 0, dtype: str = "float32", cpu_offload: bool = False, decode_chunk_size: int = 8,
                   out_fps: float = 8.0, progress: bool = True) -> list[dict[str, Any]]:
    import torch

    from model.pipeline import save_video

    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    pipe = load_pipeline(checkpoint, dtype, cpu_offload)
    frames = pipe(prompts, num_frames=num_frames, height=height, width=width, num_inference_steps=steps,
                  guidance_scale=parse_guidance(guidance), fps=fps, motion_bucket_id=motion_bucket_id,
                  generator=torch.Generator().manual_seed(seed), decode_chunk_size=decode_chunk_size,
                  progress=progress).frames
    out = Path(output_dir)
    results = []
    for index, (prompt, video) in enumerate(zip(prompts, frames, strict=True)):
        stem = f"{index:03d}"
        results.append({
            "prompt": prompt,
            "mp4": str(save_video(video, out / f"{stem}.mp4", out_fps)),
            "gif": str(save_video(video, out / f"{stem}.gif", out_fps)),
            "frames": int(video.shape[0]), "height": int(video.shape[1]), "width": int(video.shape[2]),
        })
    return results


@task(name="generate", retries=1)
def generate_task(prompts: list[str], output_dir: str, checkpoint: str | None, settings: dict[str, Any]) -> list:
    return generate_files(prompts, output_dir, checkpoint, progress=False, **settings)


def preview_markdown(results: list[dict[str, Any]], settings: dict[str, Any], checkpoint: str | None) -> str:
    lines = ["# generate-video", "", f"checkpoint: `{checkpoint or 'tiny preset (random weights)'}`", "",
             *settings_table(settings)]
    for result in results:
        lines += ["", f"**{result['prompt']}** ({result['frames']} frames, {result['width']}x{result['height']}) "
                  f"-> `{result['mp4']}`", "", inline_image(result["gif"], "preview")]
    return "\n".join(lines) + "\n"


@flow(name="generate-video", log_prints=True)
def generate_video(
    prompts: list[str] | None = None,
    checkpoint: str | None = None,
    output_dir: str = "out/generate",
    num_frames: int = 14,
    height: int | None = None,
    width: int | None = None,
    steps: int = 25,
    guidance: str = "1.0,2.5",
    fps: int = 7,
    motion_bucket_id: int = 127,
    seed: int = 0,
    dtype: str = "float32",
    cpu_offload: bool = False,
) -> list[dict[str, Any]]:
    """Generate videos from prompts with a pipeline directory (default: the tiny preset).

    `guidance` is 'w' (constant CFG) or 'min,max' (rising over frames, SVD's default 1.0,2.5).
    """
    prompts = prompts or ["a cyclist riding down a city street"]
    settings = dict(num_frames=num_frames, height=height, width=width, steps=steps, guidance=guidance, fps=fps,
                    motion_bucket_id=motion_bucket_id, seed=seed, dtype=dtype, cpu_offload=cpu_offload)
    parse_guidance(guidance)  # fail fast
    output_dir = str(Path(output_dir).resolve())
    results = generate_task(prompts, output_dir, checkpoint, settings)
    create_markdown_artifact(preview_markdown(results, settings, checkpoint), key="generate-video-preview",
                             description="generated videos")
    get_run_logger().info("wrote %s", ", ".join(r["mp4"] for r in results))
    return results


def deployments() -> list:
    return [generate_video.to_deployment(name="local", description="Text-to-video with a checkpoint directory.")]


def _run(args: argparse.Namespace) -> int:
    output = Path(args.out)
    if output.suffix.lower() not in (".mp4", ".gif"):
        raise SystemExit(f"--out must end in .mp4 or .gif, got {args.out}")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as scratch:
        results = generate_files([args.prompt], scratch, args.checkpoint, num_frames=args.frames,
                                 height=args.height, width=args.width, steps=args.steps, guidance=args.guidance,
                                 fps=args.fps, motion_bucket_id=args.motion, seed=args.seed, dtype=args.dtype,
                                 cpu_offload=args.cpu_offload, decode_chunk_size=args.decode_chunk_size,
                                 out_fps=args.out_fps)
        Path(results[0][output.suffix.lower().lstrip(".")]).replace(output)
    print(json.dumps({"out": str(output), "prompt": args.prompt, "frames": results[0]["frames"]}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate a video from a prompt with a checkpoint")
    parser.add_argument("prompt")
    parser.add_argument("--checkpoint", default=None, help="pipeline directory (default: tiny random preset)")
    parser.add_argument("--out", default="generated.mp4", help="output .mp4 or .gif")
    parser.add_argument("--frames", type=int, default=14)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", default="1.0,2.5", help="'w' constant CFG or 'min,max' over frames")
    parser.add_argument("--fps", type=int, default=7, help="fps conditioning")
    parser.add_argument("--motion", type=int, default=127, help="motion bucket conditioning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--decode-chunk-size", type=int, default=8)
    parser.add_argument("--out-fps", type=float, default=8.0, help="frame rate of the written file")
    parser.set_defaults(func=_run)
