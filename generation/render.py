"""A walk from request to files: waypoints checked, audio timing, the walk rendered (resumable), upscaled,
written as MP4 (muxed with the audio when given) plus a preview GIF.

The flow `generate-walk` and `lvd walk` load the pipeline and call `render_walk`; everything that decides
pixels or files is here and in generation.walk / generation.audio / generation.upscale.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from common.requests import Request, RequestError, setting
from common.video import save_video
from generation.audio import audio_envelope as envelope_of
from generation.audio import envelope_speeds, mux_audio
from model.loading import DTYPES

if TYPE_CHECKING:
    from generation.walk import Waypoint

# generation.walk and generation.upscale (torch, diffusers: ~10 s of imports on a small machine) are imported where
# a walk's inputs are checked or rendered, so that a request with a bad setting fails at once.

UPSCALERS = ("lanczos", "realesrgan")


@dataclass(frozen=True)
class WalkRequest(Request):
    """One walk between prompts/seeds (or a morph between images): the one spelling shared by the
    `generate-walk` flow, `lvd walk` and `render_walk`."""

    prompts: list[str] | None = setting(None, help="one prompt per waypoint")
    seeds: list[int] | None = setting(None, help="one noise seed per waypoint (default 0, 1, ...)")
    frames: tuple[int, ...] = setting((24,), min=1, help="frames per segment (one for all, or one per segment)")
    images: list[str] | None = setting(None, help="morph: one image file per waypoint")
    out: str = setting("out/walk/walk.mp4", path="output", help="output .mp4")
    work_dir: str | None = setting(None, path="output", help="segment cache for resume (default: <out>.walk/)")
    checkpoint: str | None = setting(None, path="input", help="pipeline directory (default: tiny random preset)")
    height: int | None = setting(None, min=8, help="frame height (default: the model's)")
    width: int | None = setting(None, min=8, help="frame width (default: the model's)")
    steps: int = setting(25, min=1, help="sampling steps")
    guidance: str = setting("7", help="constant CFG 'w' (a 'min,max' ramp restarts every window)")
    fps: float = setting(8.0, help="output frame rate (and the audio clock)")
    fps_id: int = setting(7, min=1, help="the model's fps conditioning (it sees fps_id - 1)")
    motion_bucket_id: int = setting(127, min=0, flag="--motion", help="motion bucket conditioning")
    window: int | None = setting(None, min=1, help="frames per model call (default: the model's)")
    overlap: int = setting(2, min=0, help="frames crossfaded between windows/segments")
    morph_sigma: float = setting(1.0, min=0, help="re-noising level for image morphs")
    dtype: str = setting("float32", help=f"weights dtype ({', '.join(DTYPES)})")
    cpu_offload: bool = setting(False, help="keep weights on the CPU between uses")
    decode_chunk_size: int = setting(8, min=1, help="frames per VAE decode call")
    batch_size: int = setting(1, min=1, help="windows per model call")
    audio: str | None = setting(None, path="input", help="audio (or video with audio) that times the walk; muxed in")
    audio_offset: float = setting(0.0, min=0, help="seconds into the audio to start")
    audio_envelope: Literal["onset", "rms"] = setting("onset", help="loudness measure that sets the speed")
    audio_floor: float = setting(0.1, min=0, help="speed in silence, relative to peaks")
    upscale: Literal["lanczos", "realesrgan"] | None = setting(None, help="upscaler (off by default)")
    upscale_factor: int = setting(2, min=1, help="upscaling factor")
    upscale_weights: str | None = setting(None, help="Real-ESRGAN RRDBNet .pth/.safetensors")

    def validate(self) -> None:
        from generation.generate import parse_guidance

        if self.dtype not in DTYPES:
            raise RequestError(f"setting dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        try:
            parse_guidance(self.guidance)
            check_render_options(self.out, self.fps, self.upscale, None)
        except ValueError as error:
            raise RequestError(str(error)) from None

    def check_inputs(self) -> None:
        """The audio file, the images, the waypoint lists and the sizes against memory (one model call's estimate
        as `lvd generate` checks it, and the walk's frames), before any model is loaded."""
        from generation.generate import SamplingCall, check_sampling_request
        from generation.walk import check_walk_inputs

        try:
            check_render_options(self.out, self.fps, self.upscale, self.audio)
            waypoints, segment_frames = walk_waypoints(self.prompts, self.seeds, self.segment_frames, self.images)
            check_walk_inputs(waypoints, segment_frames)
            height, width = check_sampling_request(SamplingCall(
                self.checkpoint, height=self.height, width=self.width, num_frames=self.window,
                decode_chunk_size=self.decode_chunk_size, batch=self.batch_size, dtype=self.dtype,
                cpu_offload=self.cpu_offload))
            check_walk_frames_memory(int(sum(segment_frames)), height, width,
                                     self.upscale_factor if self.upscale else 1)
        except ValueError as error:
            raise RequestError(str(error)) from None

    @property
    def segment_frames(self) -> int | list[int]:
        return self.frames[0] if len(self.frames) == 1 else list(self.frames)

    @property
    def model_id(self) -> str:
        """Names the weights in the segment cache key."""
        return f"{self.checkpoint or 'tiny'}:{self.dtype}"


def render_walk_files(request: WalkRequest, *, progress: bool = True, pipe=None) -> dict[str, Any]:
    """Render a walk to `request.out` (.mp4) and a preview GIF next to it; the options and waypoints are checked
    before the pipeline is loaded (through model.loading, unless `pipe` is given)."""
    request.check_inputs()
    if pipe is None:
        from model.loading import load_pipeline

        pipe = load_pipeline(request.checkpoint, dtype=request.dtype, device="auto", cpu_offload=request.cpu_offload)
    return render_walk(pipe, request, progress=progress)


WALK_FRAME_COPIES = 2  # the rendered segments and the assembled walk (each frame uint8 RGB)


def check_walk_frames_memory(total_frames: int, height: int, width: int, upscale_factor: int = 1,
                             available: int | None = None) -> None:
    """ValueError (one line) when the walk's frames cannot be held in the CPU's free memory: the walk keeps every
    frame (its segments and the assembled video, plus the upscaled copy), `total_frames x H x W x 3` bytes each."""
    from model.memory import available_memory

    frame = height * width * 3
    needed = total_frames * frame * (WALK_FRAME_COPIES + (WALK_FRAME_COPIES * upscale_factor**2
                                                          if upscale_factor > 1 else 0))
    free = available_memory("cpu") if available is None else available
    if needed > free:
        gib = 2**30
        upscaled = f", upscaled x{upscale_factor}" if upscale_factor > 1 else ""
        raise ValueError(f"the walk holds about {needed / gib:.1f} GiB of frames ({total_frames} frames at "
                         f"{height}x{width}{upscaled}); {free / gib:.1f} GiB is available on the CPU: use fewer "
                         "--frames or a smaller --height/--width")


def check_render_options(out: str | Path, fps: float, upscale: str | None, audio: str | None) -> None:
    """The output options, checked before any model is loaded."""
    if Path(out).suffix.lower() != ".mp4":
        raise ValueError(f"walk output must be an .mp4 file, got {out}")
    if not isinstance(fps, int | float) or not fps > 0:
        raise ValueError(f"fps (output frame rate) must be positive, got {fps!r}")
    if upscale is not None and upscale not in UPSCALERS:
        raise ValueError(f"upscale must be one of {UPSCALERS} or None, got {upscale!r}")
    if audio is not None and not Path(audio).is_file():
        raise ValueError(f"audio file not found: {audio}")


def walk_waypoints(prompts: list[str] | None, seeds: list[int] | None, frames: int | list[int],
                   images: list[str] | None) -> tuple[list[Waypoint], list[int]]:
    """Waypoints and per-segment frame counts: `prompts` with `seeds` (a text walk), or `images` with
    `seeds` and optional `prompts` (a morph); `frames` is one length for every segment or one per segment."""
    from generation.walk import Waypoint

    if images:
        prompts = list(prompts) if prompts else [""] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images: give one prompt per image or none")
    elif not prompts:
        raise ValueError("a walk needs prompts (text walk) or images (morph)")
    count = len(prompts)
    seeds = list(range(count)) if seeds is None else list(seeds)
    if len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds for {count} waypoints: give one seed per prompt/image")
    segment_frames = [frames] * (count - 1) if isinstance(frames, int) else list(frames)
    stops = images or [None] * count
    waypoints = [Waypoint(prompt, int(seed), image) for prompt, seed, image in zip(prompts, seeds, stops, strict=True)]
    return waypoints, segment_frames


def render_walk(pipe, request: WalkRequest, *, progress: bool = True) -> dict[str, Any]:
    """Render the walk `request` describes with `pipe` to `request.out` (.mp4) and a preview GIF in the work
    directory; returns what was written and which segments were rendered or reused. `request.model_id` names the
    weights in the segment cache key (a different checkpoint or dtype never reuses segments). `fps`: output frame
    rate (also the clock the audio envelope is read with); `fps_id`: the frame rate the model is conditioned on (it
    sees fps_id - 1, SVD's convention)."""
    from generation.generate import parse_guidance
    from generation.upscale import upscale_frames
    from generation.walk import WalkSettings, check_walk_inputs, run_walk

    out_path, fps, audio, upscale = Path(request.out), request.fps, request.audio, request.upscale
    check_render_options(out_path, fps, upscale, audio)
    waypoints, segment_frames = walk_waypoints(request.prompts, request.seeds, request.segment_frames,
                                               request.images)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    settings = WalkSettings(
        height=request.height or pipe.unet.config.sample_size * factor,
        width=request.width or pipe.unet.config.sample_size * factor, steps=request.steps,
        guidance=parse_guidance(request.guidance), fps_id=request.fps_id, motion_bucket_id=request.motion_bucket_id,
        window=request.window or pipe.unet.config.num_frames, overlap=request.overlap,
        morph_sigma=request.morph_sigma, decode_chunk_size=request.decode_chunk_size, model_id=request.model_id,
    )
    check_walk_inputs(waypoints, segment_frames)  # before the audio is decoded
    speeds = None
    if audio is not None:
        envelope = envelope_of(audio, fps, int(sum(segment_frames)), request.audio_offset, request.audio_envelope)
        speeds = envelope_speeds(envelope, request.audio_floor)
    work = Path(request.work_dir) if request.work_dir else out_path.with_suffix(".walk")
    result = run_walk(pipe, waypoints, segment_frames, work, settings, speeds=speeds, batch_size=request.batch_size,
                      progress=progress)
    video = result.frames
    if upscale is not None:
        video = upscale_frames(video, request.upscale_factor, upscale, request.upscale_weights)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if audio is None:
        save_video(video, out_path, fps)
    else:
        with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch:
            silent = save_video(video, Path(scratch) / "silent.mp4", fps)
            mux_audio(silent, audio, out_path, offset=request.audio_offset)
    gif = save_video(result.frames, work / "preview.gif", fps)
    return {
        "mp4": str(out_path), "gif": str(gif), "plan": str(result.plan_path), "frames": int(video.shape[0]),
        "height": int(video.shape[1]), "width": int(video.shape[2]), "segment_frames": segment_frames,
        "generated_segments": result.generated, "reused_segments": result.reused, "audio": audio,
        "upscale": upscale, "mean_abs_frame_diff": float(np.abs(np.diff(video.astype(np.int16), axis=0)).mean())
        if len(video) > 1 else 0.0,
    }
