"""Flow `generate-video` and `lvd generate`: text -> video, image -> video, text -> image -> video.

Orchestration only: the modes, their defaults, loading and writing live in `generation.generate`. The flow
writes one MP4 and one GIF per video and attaches a preview (the GIF inline) and the settings to the run as
a markdown artifact; the command writes one video to `--out` (.mp4, .gif, or a folder of PNG frames).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.markdown import inline_image, settings_table
from generation.generate import generate_video_files, parse_guidance
from model.loading import DTYPES

__all__ = ["DTYPES", "generate_files", "generate_video", "parse_guidance"]


def generate_files(prompts: list[str] | None, output_dir: str, checkpoint: str | None = None,
                   **request: Any) -> list[dict[str, Any]]:
    """One MP4 and one GIF per video in `output_dir` (see `generation.generate.generate_videos`)."""
    return generate_video_files(output_dir, prompts, checkpoint, **request)


@task(name="generate", retries=1)
def generate_task(prompts: list[str], output_dir: str, checkpoint: str | None, settings: dict[str, Any]) -> list:
    return generate_files(prompts, output_dir, checkpoint, progress=False, **settings)


def preview_markdown(results: list[dict[str, Any]], checkpoint: str | None) -> str:
    settings = results[0]["settings"] if results else {}
    lines = ["# generate-video", "", f"checkpoint: `{checkpoint or 'tiny preset (random weights)'}`", "",
             *settings_table(settings)]
    for result in results:
        source = result["prompt"] or result["image"] or ""
        lines += ["", f"**{source}** ({result['frames']} frames, {result['width']}x{result['height']}) "
                  f"-> `{result['mp4']}`", "", inline_image(result["gif"], "preview")]
        if result.get("first_frame"):
            lines += ["", inline_image(result["first_frame"], "first frame")]
    return "\n".join(lines) + "\n"


@flow(name="generate-video", log_prints=True)
def generate_video(
    prompts: list[str] | None = None,
    checkpoint: str | None = None,
    output_dir: str = "out/generate",
    image: str | None = None,
    image_model: str | None = None,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    guidance: str | None = None,
    fps: int | None = None,
    motion_bucket_id: int | None = None,
    noise_aug: float | None = None,
    decode_chunk_size: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    cpu_offload: bool = False,
) -> list[dict[str, Any]]:
    """Generate videos with a pipeline folder (default: the tiny text-to-video preset).

    Text -> video from `prompts`; image -> video from `image` (a path or fsspec URL) with an SVD-layout
    checkpoint; text -> image -> video from one prompt and `image_model` (a diffusers text-to-image folder).
    Unset settings take the mode's defaults: SVD's for image-to-video (25 steps, guidance '1.0,3.0' over
    frames, fps 7, motion 127, noise aug 0.02, frames from the checkpoint), one constant guidance scale for
    text-to-video. `guidance` is 'w' or 'min,max'; `fps` is the video's frame rate (the model sees fps - 1).
    """
    if image is None and image_model is None:
        prompts = prompts or ["a cyclist riding down a city street"]
    if guidance is not None:
        parse_guidance(guidance)  # fail fast, before the task
    settings = dict(image=image, image_model=image_model, num_frames=num_frames, height=height, width=width,
                    steps=steps, guidance=guidance, fps=fps, motion_bucket_id=motion_bucket_id, noise_aug=noise_aug,
                    decode_chunk_size=decode_chunk_size, seed=seed, dtype=dtype, cpu_offload=cpu_offload)
    output_dir = str(Path(output_dir).resolve())
    results = generate_task(prompts or [], output_dir, checkpoint, settings)
    create_markdown_artifact(preview_markdown(results, checkpoint), key="generate-video-preview",
                             description="generated videos")
    get_run_logger().info("wrote %s", ", ".join(r["mp4"] for r in results))
    return results


def deployments() -> list:
    return [generate_video.to_deployment(name="local", description="Text/image-to-video with a checkpoint folder.")]


def _run(args: argparse.Namespace) -> int:
    from generation.generate import check_output, generate_videos, write_frames

    try:
        check_output(args.out)
        generated = generate_videos(
            [args.prompt] if args.prompt else [], args.checkpoint, image=args.image, image_model=args.image_model,
            num_frames=args.frames, height=args.height, width=args.width, steps=args.steps, guidance=args.guidance,
            fps=args.fps, motion_bucket_id=args.motion, noise_aug=args.noise_aug,
            decode_chunk_size=args.decode_chunk_size, image_steps=args.image_steps,
            image_guidance=args.image_guidance, seed=args.seed, dtype=args.dtype, cpu_offload=args.cpu_offload)
        written = write_frames(generated.videos[0], args.out, args.out_fps)
    except ValueError as error:
        print(f"lvd generate: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), "files": len(written), "prompt": args.prompt, "image": args.image,
                      "frames": int(generated.videos.shape[1])}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate a video from a prompt, an image, or a prompt via a text-to-image model",
        description="Text -> video (PROMPT), image -> video (--image with an SVD-layout --checkpoint), or "
                    "text -> image -> video (PROMPT --image-model SD_DIR --checkpoint SVD_DIR). Unset settings "
                    "take the mode's defaults (image-to-video: SVD's).")
    parser.add_argument("prompt", nargs="?", default=None)
    parser.add_argument("--image", default=None, help="conditioning image: a file Pillow opens or an fsspec URL")
    parser.add_argument("--image-model", default=None,
                        help="diffusers text-to-image folder (e.g. SD 2.1) that draws the first frame from PROMPT")
    parser.add_argument("--checkpoint", default=None, help="pipeline folder (default: tiny random text-to-video)")
    parser.add_argument("--out", default="generated.mp4", help="output .mp4, .gif, or a folder ending in '/' "
                        "(one lossless PNG per frame)")
    parser.add_argument("--frames", type=int, default=None, help="default: the checkpoint's U-Net config")
    parser.add_argument("--height", type=int, default=None, help="default: 576 for image-to-video")
    parser.add_argument("--width", type=int, default=None, help="default: 1024 for image-to-video")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 25)")
    parser.add_argument("--guidance", default=None, help="'w' constant or 'min,max' rising over frames "
                        "(default: 1.0,3.0 image-to-video; 7 text-to-video)")
    parser.add_argument("--fps", type=int, default=None, help="frame rate conditioning (default 7; model sees fps-1)")
    parser.add_argument("--motion", type=int, default=None, help="motion bucket id (default 127)")
    parser.add_argument("--noise-aug", type=float, default=None,
                        help="noise augmentation of the conditioning image (default 0.02; 0 text-to-video)")
    parser.add_argument("--decode-chunk-size", type=int, default=None,
                        help="frames per VAE decode call (default 14 image-to-video, 8 text-to-video)")
    parser.add_argument("--image-steps", type=int, default=None, help="text-to-image steps (default 50)")
    parser.add_argument("--image-guidance", type=float, default=None, help="text-to-image guidance (default 7.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--out-fps", type=float, default=8.0, help="frame rate of the written .mp4/.gif")
    parser.set_defaults(func=_run)
