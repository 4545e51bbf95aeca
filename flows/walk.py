"""Flow `generate-walk` and `lvd walk`: prompt/seed interpolation walks, audio-timed walks, image morphs.

Orchestration only: generation.render loads the pipeline (model.loading) and renders the walk
(interpolation, schedules, windows/crossfades and resume in generation.walk, the audio envelope and muxing in
generation.audio, upscaling in generation.upscale). Segments are cached under a work
directory (plan.json + segment-NNN.npz), so a killed run (or a Prefect task retry) continues where it
stopped. The flow attaches a preview (the walk as an inline GIF) and the settings as a markdown artifact.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from common.requests import RequestError, flat_parameters
from flows.cli import add_request_command
from flows.markdown import inline_image, settings_table
from generation.render import WalkRequest, render_walk_files


@task(name="render-walk", retries=1)
def render_walk_task(request: WalkRequest) -> dict[str, Any]:
    """One task for the whole walk: a retry resumes from the segment files the failed attempt wrote."""
    return render_walk_files(request, progress=False)


def preview_markdown(result: dict[str, Any], settings: dict[str, Any]) -> str:
    lines = ["# generate-walk", "", f"`{result['mp4']}`: {result['frames']} frames, "
             f"{result['width']}x{result['height']}, segments {result['segment_frames']} "
             f"(rendered {result['generated_segments']}, reused {result['reused_segments']})", "",
             inline_image(result["gif"], "walk preview"), "", *settings_table(settings)]
    return "\n".join(lines) + "\n"


@flow(name="generate-walk", log_prints=True)
@flat_parameters(WalkRequest)
def generate_walk(request: WalkRequest) -> dict[str, Any]:
    """A walk between prompts (or a morph between images) as one MP4, optionally timed to and muxed with
    audio and upscaled; a preview GIF is attached as an artifact. Default: a two-prompt walk, tiny preset."""
    if not request.prompts and not request.images:
        request = request.with_overrides(prompts=["a cyclist riding down a city street", "a rabbit in a green meadow"])
    request = request.with_overrides(out=str(Path(request.out).resolve()))
    request.check_inputs()  # fail fast, before a worker loads a model
    result = render_walk_task(request)
    settings = {key: value for key, value in request.to_dict().items() if key not in ("prompts", "out")}
    create_markdown_artifact(preview_markdown(result, settings), key="generate-walk-preview",
                             description="interpolation walk preview")
    get_run_logger().info("wrote %s (%d frames)", result["mp4"], result["frames"])
    return result


def deployments() -> list:
    return [generate_walk.to_deployment(name="local", description="Prompt/seed walks, audio-timed walks, "
                                                                  "image morphs on the video model.")]


def _run(request: WalkRequest) -> int:
    try:
        result = render_walk_files(request)
    except ValueError as error:  # a bad input found while rendering (e.g. an unreadable image or audio)
        raise RequestError(str(error)) from error
    print(json.dumps(result))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    add_request_command(subparsers, "walk", WalkRequest, _run,
                        help="interpolation walk between prompts/seeds or a morph between images")
