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

from common.requests import RequestError, flat_parameters
from flows.cli import add_request_command
from flows.markdown import inline_image, settings_table
from generation.generate import (
    GenerateFileRequest,
    GenerateRequest,
    generate_video_files,
    parse_guidance,
)
from model.loading import DTYPES

__all__ = ["DTYPES", "generate_video", "parse_guidance"]


@task(name="generate", retries=1)
def generate_task(request: GenerateRequest) -> list:
    return generate_video_files(request, progress=False)


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
@flat_parameters(GenerateRequest)
def generate_video(request: GenerateRequest) -> list[dict[str, Any]]:
    """Generate videos with a pipeline folder (default: the tiny text-to-video preset).

    Text -> video from `prompts`; image -> video from `image` (a path or fsspec URL) with an SVD-layout
    checkpoint; text -> image -> video from one prompt and `image_model` (a diffusers text-to-image folder).
    Unset settings take the mode's defaults: SVD's for image-to-video (25 steps, guidance '1.0,3.0' over
    frames, fps 7, motion 127, noise aug 0.02, frames from the checkpoint), one constant guidance scale for
    text-to-video. `guidance` is 'w' or 'min,max'; `fps` is the video's frame rate (the model sees fps - 1).
    """
    if request.image is None and request.image_model is None and not request.prompts:
        request = request.with_overrides(prompts=["a cyclist riding down a city street"])
    request = request.with_overrides(output_dir=str(Path(request.output_dir).resolve()))
    results = generate_task(request)
    create_markdown_artifact(preview_markdown(results, request.checkpoint), key="generate-video-preview",
                             description="generated videos")
    get_run_logger().info("wrote %s", ", ".join(r["mp4"] for r in results))
    return results


def deployments() -> list:
    return [generate_video.to_deployment(name="local", description="Text/image-to-video with a checkpoint folder.")]


def _run(request: GenerateFileRequest) -> int:
    from generation.generate import generate_videos, write_frames

    try:
        generated = generate_videos(request)
        for warning in generated.warnings:
            print(f"lvd generate: warning: {warning}", file=sys.stderr)
        written = write_frames(generated.videos[0], request.out, request.out_fps)
    except ValueError as error:  # a bad input found while generating (an unreadable image, a wrong checkpoint)
        raise RequestError(str(error)) from error
    prompt = request.prompts[0] if request.prompts else None
    print(json.dumps({"out": str(request.out), "files": len(written), "prompt": prompt, "image": request.image,
                      "frames": int(generated.videos.shape[1])}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_request_command(
        subparsers, "generate", GenerateFileRequest, _run,
        help="generate a video from a prompt, an image, or a prompt via a text-to-image model",
        description="Text -> video (PROMPT), image -> video (--image with an SVD-layout --checkpoint), or "
                    "text -> image -> video (PROMPT --image-model SD_DIR --checkpoint SVD_DIR). Unset settings "
                    "take the mode's defaults (image-to-video: SVD's).")
    parser.add_argument("prompts", nargs="?", type=lambda text: [text], default=argparse.SUPPRESS, metavar="PROMPT",
                        help="text -> video prompt (or the first frame's prompt with --image-model)")
