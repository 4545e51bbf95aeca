"""Flow `generate-walk` and `lvd walk`: prompt/seed interpolation walks, audio-timed walks, image morphs.

Orchestration only: the pipeline comes from model.loading, the walk is rendered by generation.render
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

from flows.markdown import inline_image, settings_table
from generation.generate import parse_guidance
from generation.render import UPSCALERS, check_render_options, render_walk, walk_waypoints
from model.loading import DTYPES, load_pipeline


def walk_files(
    prompts: list[str] | None,
    out: str,
    *,
    seeds: list[int] | None = None,
    frames: int | list[int] = 24,
    images: list[str] | None = None,
    work_dir: str | None = None,
    checkpoint: str | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int = 25,
    guidance: str | float | list = "7",
    fps: float = 8.0,
    fps_id: int = 7,
    motion_bucket_id: int = 127,
    window: int | None = None,
    overlap: int = 2,
    morph_sigma: float = 1.0,
    dtype: str = "float32",
    cpu_offload: bool = False,
    decode_chunk_size: int = 8,
    batch_size: int = 1,
    audio: str | None = None,
    audio_offset: float = 0.0,
    audio_envelope: str = "onset",
    audio_floor: float = 0.1,
    upscale: str | None = None,
    upscale_factor: int = 2,
    upscale_weights: str | None = None,
    progress: bool = True,
    pipe=None,
) -> dict[str, Any]:
    """Render a walk to `out` (.mp4) and a preview GIF next to it (generation.render.render_walk); the
    options and waypoints are checked before the pipeline is loaded."""
    check_render_options(out, fps, upscale, audio)
    walk_waypoints(prompts, seeds, frames, images)
    guidance_value = parse_guidance(guidance)
    pipe = pipe if pipe is not None else load_pipeline(checkpoint, dtype=dtype, device="auto", cpu_offload=cpu_offload)
    return render_walk(pipe, prompts, out, model_id=f"{checkpoint or 'tiny'}:{dtype}", seeds=seeds, frames=frames,
                       images=images, work_dir=work_dir, height=height, width=width, steps=steps,
                       guidance=guidance_value, fps=fps, fps_id=fps_id, motion_bucket_id=motion_bucket_id,
                       window=window, overlap=overlap, morph_sigma=morph_sigma, decode_chunk_size=decode_chunk_size,
                       batch_size=batch_size, audio=audio, audio_offset=audio_offset, audio_envelope=audio_envelope,
                       audio_floor=audio_floor, upscale=upscale, upscale_factor=upscale_factor,
                       upscale_weights=upscale_weights, progress=progress)


@task(name="render-walk", retries=1)
def render_walk_task(prompts: list[str] | None, out: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One task for the whole walk: a retry resumes from the segment files the failed attempt wrote."""
    return walk_files(prompts, out, progress=False, **settings)


def preview_markdown(result: dict[str, Any], settings: dict[str, Any]) -> str:
    lines = ["# generate-walk", "", f"`{result['mp4']}`: {result['frames']} frames, "
             f"{result['width']}x{result['height']}, segments {result['segment_frames']} "
             f"(rendered {result['generated_segments']}, reused {result['reused_segments']})", "",
             inline_image(result["gif"], "walk preview"), "", *settings_table(settings)]
    return "\n".join(lines) + "\n"


@flow(name="generate-walk", log_prints=True)
def generate_walk(
    prompts: list[str] | None = None,
    seeds: list[int] | None = None,
    frames: list[int] | None = None,
    images: list[str] | None = None,
    out: str = "out/walk/walk.mp4",
    work_dir: str | None = None,
    checkpoint: str | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int = 25,
    guidance: str = "7",
    fps: float = 8.0,
    window: int | None = None,
    overlap: int = 2,
    morph_sigma: float = 1.0,
    dtype: str = "float32",
    cpu_offload: bool = False,
    decode_chunk_size: int = 8,
    batch_size: int = 1,
    audio: str | None = None,
    audio_offset: float = 0.0,
    upscale: str | None = None,
    upscale_factor: int = 2,
    upscale_weights: str | None = None,
) -> dict[str, Any]:
    """A walk between prompts (or a morph between images) as one MP4, optionally timed to and muxed with
    audio and upscaled; a preview GIF is attached as an artifact. Default: a two-prompt walk, tiny preset."""
    if not prompts and not images:
        prompts = ["a cyclist riding down a city street", "a rabbit in a green meadow"]
    settings = dict(seeds=seeds, frames=frames or 24, images=images, work_dir=work_dir, checkpoint=checkpoint,
                    height=height, width=width, steps=steps, guidance=guidance, fps=fps, window=window,
                    overlap=overlap, morph_sigma=morph_sigma, dtype=dtype, cpu_offload=cpu_offload,
                    decode_chunk_size=decode_chunk_size, batch_size=batch_size, audio=audio,
                    audio_offset=audio_offset, upscale=upscale, upscale_factor=upscale_factor,
                    upscale_weights=upscale_weights)
    parse_guidance(guidance)  # fail fast, before a worker loads a model
    out = str(Path(out).resolve())
    result = render_walk_task(prompts, out, settings)
    create_markdown_artifact(preview_markdown(result, settings), key="generate-walk-preview",
                             description="interpolation walk preview")
    get_run_logger().info("wrote %s (%d frames)", result["mp4"], result["frames"])
    return result


def deployments() -> list:
    return [generate_walk.to_deployment(name="local", description="Prompt/seed walks, audio-timed walks, "
                                                                  "image morphs on the video model.")]


def _run(args: argparse.Namespace) -> int:
    frames = args.frames[0] if len(args.frames) == 1 else args.frames
    try:
        result = walk_files(args.prompts, args.out, seeds=args.seeds, frames=frames, images=args.images,
                            work_dir=args.work_dir, checkpoint=args.checkpoint, height=args.height, width=args.width,
                            steps=args.steps, guidance=args.guidance, fps=args.fps, fps_id=args.fps_id,
                            motion_bucket_id=args.motion, window=args.window, overlap=args.overlap,
                            morph_sigma=args.morph_sigma, dtype=args.dtype, cpu_offload=args.cpu_offload,
                            decode_chunk_size=args.decode_chunk_size, batch_size=args.batch_size, audio=args.audio,
                            audio_offset=args.audio_offset, audio_envelope=args.audio_envelope,
                            audio_floor=args.audio_floor, upscale=args.upscale, upscale_factor=args.upscale_factor,
                            upscale_weights=args.upscale_weights)
    except ValueError as error:
        raise SystemExit(f"lvd walk: {error}") from error
    print(json.dumps(result))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("walk", help="interpolation walk between prompts/seeds or a morph between images")
    parser.add_argument("--prompts", nargs="+", default=None, help="one prompt per waypoint")
    parser.add_argument("--images", nargs="+", default=None, help="morph: one image file per waypoint")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="one noise seed per waypoint (0,1,...)")
    parser.add_argument("--frames", nargs="+", type=int, default=[24], help="frames per segment (one or one each)")
    parser.add_argument("--out", default="walk.mp4", help="output .mp4")
    parser.add_argument("--work-dir", default=None, help="segment cache for resume (default: <out>.walk/)")
    parser.add_argument("--checkpoint", default=None, help="pipeline directory (default: tiny random preset)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", default="7", help="constant CFG 'w' (a 'min,max' ramp restarts every window)")
    parser.add_argument("--fps", type=float, default=8.0, help="output frame rate (and the audio clock)")
    parser.add_argument("--fps-id", type=int, default=7, help="the model's fps conditioning")
    parser.add_argument("--motion", type=int, default=127, help="motion bucket conditioning")
    parser.add_argument("--window", type=int, default=None, help="frames per model call (default: model's)")
    parser.add_argument("--overlap", type=int, default=2, help="frames crossfaded between windows/segments")
    parser.add_argument("--morph-sigma", type=float, default=1.0, help="re-noising level for image morphs")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--decode-chunk-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1, help="windows per model call")
    parser.add_argument("--audio", default=None, help="audio (or video with audio) that times the walk; muxed in")
    parser.add_argument("--audio-offset", type=float, default=0.0, help="seconds into the audio to start")
    parser.add_argument("--audio-envelope", default="onset", choices=["onset", "rms"])
    parser.add_argument("--audio-floor", type=float, default=0.1, help="speed in silence, relative to peaks")
    parser.add_argument("--upscale", default=None, choices=list(UPSCALERS), help="off by default")
    parser.add_argument("--upscale-factor", type=int, default=2)
    parser.add_argument("--upscale-weights", default=None, help="Real-ESRGAN RRDBNet .pth/.safetensors")
    parser.set_defaults(func=_run)
