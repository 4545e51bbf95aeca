"""Generation from a checkpoint: text -> video, image -> video, and text -> image -> video.

`lvd generate` and the `generate-video` flow call `generate_video_files`; everything they need (loading the
pipelines, reading the conditioning image, the per-mode defaults, writing MP4 / GIF / PNG frames) is here.

Modes, chosen by the arguments:
* text -> video: a prompt and a text-to-video checkpoint (or none: the tiny random preset). One constant
  guidance scale by default (`model.pipeline.DEFAULT_TEXT_GUIDANCE`).
* image -> video: `image` (a file Pillow opens or an fsspec URL) and an SVD-layout checkpoint. SVD's defaults
  (`model.image_to_video.sampling_defaults`: frames from the checkpoint's U-Net config, and for 14- and 25-frame
  U-Nets, SVD and SVD-XT, sgm's steps and guidance: 25 steps 1.0 -> 2.5, 30 steps 1.5 -> 3.0).
* text -> image -> video: a prompt, `image_model` (a local diffusers text-to-image folder, e.g. SD 2.1) and an
  SVD-layout checkpoint: the text-to-image pipeline draws the first frame at the video's size, then SVD
  animates it. Both stages get a fresh CPU generator seeded with `seed`, so the video equals what SVD makes
  of that first frame on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.requests import Request, RequestError, setting
from dataformat.generation import write_generation_record
from model.loading import DTYPES, load_pipeline, place_pipeline

TEXT_TO_VIDEO_DEFAULTS: dict[str, Any] = dict(steps=25, fps=7, motion_bucket_id=127, noise_aug=0.0,
                                              decode_chunk_size=8)
IMAGE_MODEL_DEFAULTS: dict[str, Any] = dict(image_steps=50, image_guidance=7.5)  # diffusers' SD defaults
OUTPUT_SUFFIXES = (".mp4", ".gif")


def parse_guidance(value: str | float | list | tuple) -> float | tuple[float, float]:
    """'7' -> 7.0 (constant); '1.0,3.0' -> (1.0, 3.0), rising linearly from the first frame to the last."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise ValueError(f"guidance must be 'w' or 'min,max', got {value!r}")
        return (float(value[0]), float(value[1]))
    try:
        parts = [float(p) for p in str(value).split(",")]
    except ValueError:
        raise ValueError(f"guidance must be 'w' or 'min,max' (numbers), got {value!r}") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise ValueError(f"guidance must be 'w' or 'min,max', got {value!r}")


@dataclass(frozen=True)
class GenerateRequest(Request):
    """One generation request: the one spelling shared by the `generate-video` flow, `lvd generate` (which adds
    `--out`, see `GenerateFileRequest`) and `generate_videos`. The mode follows from the fields (module
    docstring); a None setting takes that mode's default, so the defaults are named in the help only."""

    prompts: list[str] | None = setting(None, cli=False, help="text -> video: one video per prompt; with "
                                                              "image_model: the first frame's prompt (CLI: PROMPT)")
    checkpoint: str | None = setting(None, path="input", help="pipeline folder (default: tiny random text-to-video)")
    output_dir: str = setting("out/generate", cli=False, path="output", help="the flow writes NNN.mp4 and NNN.gif here")
    image: str | None = setting(None, path="input", help="conditioning image: a file Pillow opens or an fsspec URL")
    image_model: str | None = setting(None, help="diffusers text-to-image folder (e.g. SD 2.1) that draws the "
                                                 "first frame from the prompt", path="input")
    num_frames: int | None = setting(None, min=1, flag="--frames", help="default: the checkpoint's U-Net config")
    views: int | None = setting(None, min=1, help="multi-view: an orbit of this many views around the object in "
                                                  "--image (a `--conditioning multiview` checkpoint); frames = views")
    elevation: float | None = setting(None, min=-89.0, max=89.0, help="multi-view: camera elevation in degrees "
                                                                       "(default 10, the `lvd orbits` default)")
    height: int | None = setting(None, min=1, help="default: 576 for image-to-video")
    width: int | None = setting(None, min=1, help="default: 1024 for image-to-video")
    steps: int | None = setting(None, min=1, help="sampling steps (default 25; SVD-XT, a 25-frame U-Net: 30)")
    guidance: str | None = setting(None, help="'w' constant or 'min,max' rising over frames (default: image-to-"
                                              "video 1.0,2.5 for SVD, 1.5,3.0 for SVD-XT, else 1.0,3.0; 7 "
                                              "text-to-video)")
    fps: int | None = setting(None, min=1, help="frame rate conditioning (default 7; model sees fps-1)")
    motion_bucket_id: int | None = setting(None, min=0, flag="--motion", help="motion bucket id (default 127)")
    noise_aug: float | None = setting(None, min=0, help="noise augmentation of the conditioning image "
                                                        "(default 0.02; 0 text-to-video)")
    decode_chunk_size: int | None = setting(None, min=1, help="frames per VAE decode call (default 14 "
                                                              "image-to-video, 8 text-to-video)")
    image_steps: int | None = setting(None, min=1, help="text-to-image steps (default 50)")
    image_guidance: float | None = setting(None, help="text-to-image guidance (default 7.5)")
    seed: int = setting(0, min=0, max=2**63 - 1, help="seed of the noise (and of the text-to-image stage)")
    dtype: str = setting("float32", help=f"weights dtype ({', '.join(DTYPES)})")
    cpu_offload: bool = setting(False, help="keep weights on the CPU between uses")
    out_fps: float = setting(8.0, min=0.001, help="frame rate of the written .mp4/.gif")

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise RequestError(f"setting dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.image is not None and self.image_model is not None:
            raise RequestError("pass either image (animate it) or image_model (draw the first frame from the prompt)")
        if (self.views is not None or self.elevation is not None) and self.image is None:
            raise RequestError("views/elevation are multi-view settings: give the object's image with image")
        if self.views is not None and self.num_frames is not None and self.views != self.num_frames:
            raise RequestError(f"multi-view: frames are the views; num_frames {self.num_frames} != views {self.views}")
        if self.guidance is not None:
            try:
                parse_guidance(self.guidance)
            except ValueError as error:
                raise RequestError(str(error)) from None

    def check_inputs(self) -> None:
        """The checkpoint folder is checked (one line naming the file), and the requested size against the memory
        sampling it would take (`model.memory`), before any model loads."""
        from model.folder_check import check_pipeline_source

        check_pipeline_source(self.checkpoint)
        try:
            check_request_memory(self)
        except ValueError as error:
            raise RequestError(str(error)) from None


@dataclass(frozen=True)
class GenerateFileRequest(GenerateRequest):
    """`lvd generate`: one video written to `out`."""

    out: str = setting("generated.mp4", help="output .mp4, .gif, or a folder ending in '/' (one lossless PNG "
                                             "per frame)", path="output")

    def validate(self) -> None:
        super().validate()
        try:
            check_output(self.out)
        except ValueError as error:
            raise RequestError(str(error)) from None

    def check_inputs(self) -> None:
        """The checkpoint folder, and that the output can be written (a probe file beside it), before any model
        loads."""
        super().check_inputs()
        check_writable_output(self.out)


@dataclass(frozen=True)
class SamplingCall:
    """One sampling call as `lvd generate` and `lvd walk` make it: what its memory and sizes depend on. None sizes
    take the mode's defaults (see `check_sampling_request`)."""

    checkpoint: str | None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    decode_chunk_size: int | None = None
    batch: int = 1
    dtype: str = "float32"
    cpu_offload: bool = False
    image_mode: bool = False


def check_request_memory(request: GenerateRequest, available: int | None = None) -> None:
    """`check_sampling_request` for one `lvd generate` request: its sizes, mode, prompts and dtype."""
    image_mode = request.image is not None or request.image_model is not None
    call = SamplingCall(request.checkpoint, height=request.height, width=request.width,
                        num_frames=request.views or request.num_frames, decode_chunk_size=request.decode_chunk_size,
                        batch=1 if image_mode else max(1, len(request.prompts or [])), dtype=request.dtype,
                        cpu_offload=request.cpu_offload, image_mode=image_mode)
    check_sampling_request(call, available=available)


def check_sampling_request(call: SamplingCall, available: int | None = None) -> tuple[int, int]:
    """ValueError (one line) when height/width are not multiples of the VAE's downscale, exceed
    `model.memory.MAX_SIDE`, or one sampling call at these sizes (`num_frames` frames, `batch` videos) would need
    more memory than is free where it runs (the estimate of `model.memory`, from the folder's configs and safetensors
    headers: no weights are read). A None size takes the mode's default (image mode 576x1024, else the U-Net's
    sample size; frames: the U-Net's). Folders only; the tiny preset gets the size checks with its downscale of 8.
    Shared by `lvd generate` and `lvd walk`, so both refuse the same way before loading anything. Returns the
    height and width sampled (the tiny preset's: as given, at least 8)."""
    import json

    from model.memory import (
        available_memory,
        check_sampling_memory,
        check_sampling_size,
        estimate_sampling_memory,
        scale_factor_of,
    )

    folder = Path(call.checkpoint) if call.checkpoint is not None else None
    height, width = call.height, call.width
    if folder is None or not (folder / "model_index.json").is_file():
        if height is not None or width is not None:
            check_sampling_size(height or 8, width or 8, 8)
        return height or 8, width or 8
    from model.folder_check import check_pipeline_folder

    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    factor = scale_factor_of(vae)
    fallback = (576, 1024) if call.image_mode else (int(unet.get("sample_size") or 8) * factor,) * 2
    height, width = height or fallback[0], width or fallback[1]
    check_sampling_size(height, width, factor, bound=False)  # the memory estimate first: it says what is needed
    frames = call.num_frames or int(unet.get("num_frames") or 14)
    chunk = call.decode_chunk_size or (14 if call.image_mode else TEXT_TO_VIDEO_DEFAULTS["decode_chunk_size"])
    estimate = estimate_sampling_memory(unet, vae, parameters=check_pipeline_folder(folder).total_parameters,
                                        height=height, width=width, num_frames=frames, batch=call.batch,
                                        decode_chunk_size=chunk, dtype=call.dtype)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and call.cpu_offload:  # the weights wait on the CPU; one component at a time on the GPU
        estimate = dataclasses.replace(estimate, weights=estimate.weights // 2)
    where = "GPU" if device == "cuda" else "CPU"
    check_sampling_memory(estimate, available_memory(device) if available is None else available, where)
    check_sampling_size(height, width, factor)
    return height, width


def check_writable_output(out: str | Path) -> None:
    """Raise a one-line RequestError unless a file can be created where `out` goes (its folder, made if missing)."""
    import tempfile

    text = str(out)
    folder = Path(text) if text.endswith(("/", "\\")) or Path(text).is_dir() else Path(text).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lvd-write-probe-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise RequestError(f"out {text}: cannot write in {folder} ({reason})") from None


def load_image(source: str | Path):
    """The conditioning image as displayed, 8-bit RGB (`common.images.read_image`: a local file or any fsspec URL;
    EXIF orientation, 16-bit and alpha handled). A bad source is a ValueError whose one-line message names it."""
    from common.images import read_image

    return read_image(source)


def image_digest(source: str | Path) -> str:
    """SHA-256 of the conditioning image's pixels as displayed (with its size): the same picture gives the same
    digest wherever it is stored and in whatever file format."""
    image = load_image(source)
    return hashlib.sha256(f"{image.width}x{image.height}:".encode() + image.tobytes()).hexdigest()


def write_frames(frames: np.ndarray, out: str | Path, fps: float) -> list[Path]:
    """Write one video's uint8 frames (T, H, W, 3). `out` ending in '/' (or an existing directory): one
    lossless PNG per frame, `frame_00000.png`, ... (names sort in frame order); `.mp4` / `.gif`: one file."""
    from PIL import Image

    text = str(out)
    if text.endswith(("/", "\\")) or Path(text).is_dir():
        directory = Path(text)
        directory.mkdir(parents=True, exist_ok=True)
        width = max(5, len(str(len(frames) - 1)))
        paths = [directory / f"frame_{index:0{width}d}.png" for index in range(len(frames))]
        for frame, path in zip(frames, paths, strict=True):
            Image.fromarray(frame).save(path, format="PNG")
        return paths
    if Path(text).suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {text}: must end in .mp4, .gif or '/' (a folder of PNG frames)")
    from common.video import save_video

    return [save_video(frames, text, fps)]


def check_output(out: str | Path) -> None:
    text = str(out)
    if not (text.endswith(("/", "\\")) or Path(text).is_dir() or Path(text).suffix.lower() in OUTPUT_SUFFIXES):
        raise ValueError(f"output {text}: must end in .mp4, .gif or '/' (a folder of PNG frames)")


def load_image_model(path: str | Path, dtype: str = "float32", cpu_offload: bool = False):
    """A local diffusers text-to-image folder (SD 1.x / 2.x / XL layout) for the first frame."""
    import torch
    from diffusers import DiffusionPipeline

    if not (Path(path) / "model_index.json").is_file():
        raise ValueError(f"image model {path}: not a diffusers pipeline directory (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(path, dtype=getattr(torch, dtype))
    if not hasattr(pipe, "tokenizer") or not hasattr(pipe, "text_encoder"):
        raise ValueError(f"image model {path}: {type(pipe).__name__} is not a text-to-image pipeline")
    pipe.set_progress_bar_config(disable=True)
    return place_pipeline(pipe, "auto", cpu_offload)


def draw_first_frame(image_model, prompt: str, height: int, width: int, seed: int, steps: int,
                     guidance: float):
    """The text-to-image stage: one image at the video's size from a fresh CPU generator seeded `seed`."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    return image_model(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                       generator=generator, output_type="pil").images[0]


@dataclass
class GeneratedVideos:
    """What one request produced: `videos` uint8 (B, T, H, W, 3), a label per video (its prompt, if any), the
    settings actually used (defaults filled in) and the drawn first frame in text -> image -> video mode."""

    videos: np.ndarray
    labels: list[str | None]
    settings: dict[str, Any]
    first_frame: Any = None
    warnings: list[str] = field(default_factory=list)  # one line each (e.g. a multi-view input not on white)


def generate_videos(request: GenerateRequest, *, progress: bool = True) -> GeneratedVideos:
    """Run `request` in the mode its fields choose; None settings take that mode's defaults. `views` (and
    `elevation`) with `image`: multi-view, an orbit of `views` frames (generation/multiview.py)."""
    import torch

    prompts = list(request.prompts or [])
    image, image_model, checkpoint, seed = request.image, request.image_model, request.checkpoint, request.seed
    dtype, cpu_offload, views, elevation = request.dtype, request.cpu_offload, request.views, request.elevation
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("prompts must be non-empty strings")
    if image is not None and image_model is not None:
        raise ValueError("pass either image (animate it) or image_model (draw the first frame from the prompt)")
    if image_model is not None and len(prompts) != 1:
        raise ValueError(f"text -> image -> video takes exactly one prompt, got {len(prompts)}")
    if image is None and image_model is None and not prompts:
        raise ValueError("nothing to generate from: give a prompt, an image, or a prompt and an image model")
    image_mode = image is not None or image_model is not None
    conditioning = load_image(image) if image is not None else None  # a bad image fails before any model loads
    pipe = load_pipeline(checkpoint, dtype=dtype, device="auto", cpu_offload=cpu_offload)
    from model.image_to_video import ImageToVideoPipeline, sampling_defaults
    from model.pipeline import DEFAULT_TEXT_GUIDANCE

    if image_mode != isinstance(pipe, ImageToVideoPipeline):
        kind = "an image-to-video (SVD layout)" if image_mode else "a text-to-video"
        raise ValueError(f"checkpoint {checkpoint or '(tiny preset)'}: {kind} checkpoint is needed for this request")
    if image_mode:
        svd = sampling_defaults(pipe.unet.config.num_frames)
        defaults = dict(height=svd["height"], width=svd["width"], steps=svd["num_inference_steps"],
                        guidance=(svd["min_guidance_scale"], svd["max_guidance_scale"]), fps=svd["fps"],
                        motion_bucket_id=svd["motion_bucket_id"], noise_aug=svd["noise_aug_strength"],
                        decode_chunk_size=svd["decode_chunk_size"])
    else:
        defaults = dict(height=None, width=None, guidance=DEFAULT_TEXT_GUIDANCE, **TEXT_TO_VIDEO_DEFAULTS)
    given = dict(height=request.height, width=request.width, steps=request.steps, guidance=request.guidance,
                 fps=request.fps, motion_bucket_id=request.motion_bucket_id, noise_aug=request.noise_aug,
                 decode_chunk_size=request.decode_chunk_size)
    settings: dict[str, Any] = {key: defaults[key] if value is None else value for key, value in given.items()}
    settings.update(num_frames=request.num_frames or pipe.unet.config.num_frames, seed=seed,
                    guidance=parse_guidance(settings["guidance"]))
    warnings: list[str] = []
    camera: dict[str, Any] = {}
    if image_mode and (views is not None or elevation is not None):
        from generation.multiview import DEFAULT_ELEVATION, white_background_warning
        from model.multiview import multiview_arguments

        elevation = DEFAULT_ELEVATION if elevation is None else float(elevation)
        orbit = multiview_arguments(pipe, views or settings["num_frames"], elevation)
        camera = {key: orbit.pop(key) for key in ("camera", "elevation") if key in orbit}  # what the U-Net takes
        settings.update(views=orbit["num_frames"], elevation=elevation, **orbit)
        warning = white_background_warning(conditioning, str(image))
        warnings += [warning] if warning else []

    first_frame = None
    if image_model is not None:
        settings.update(image_model=str(image_model),
                        image_steps=_pick(request.image_steps, IMAGE_MODEL_DEFAULTS["image_steps"]),
                        image_guidance=_pick(request.image_guidance, IMAGE_MODEL_DEFAULTS["image_guidance"]))
        drawer = load_image_model(image_model, dtype, cpu_offload)
        first_frame = conditioning = draw_first_frame(drawer, prompts[0], settings["height"], settings["width"],
                                                      seed, settings["image_steps"], settings["image_guidance"])
        del drawer

    generator = torch.Generator("cpu").manual_seed(seed)
    scales = settings["guidance"]
    common = dict(num_frames=settings["num_frames"], height=settings["height"], width=settings["width"],
                  num_inference_steps=settings["steps"], fps=settings["fps"],
                  motion_bucket_id=settings["motion_bucket_id"], noise_aug_strength=settings["noise_aug"],
                  decode_chunk_size=settings["decode_chunk_size"], generator=generator, progress=progress)
    if image_mode:
        low, high = scales if isinstance(scales, tuple) else (scales, scales)
        videos = pipe(conditioning, min_guidance_scale=low, max_guidance_scale=high, **camera, **common).frames
        labels: list[str | None] = [prompts[0] if prompts else None]
    else:
        videos = pipe(prompts, guidance_scale=scales, **common).frames
        labels = list(prompts)
    return GeneratedVideos(videos=videos, labels=labels, settings=settings, first_frame=first_frame, warnings=warnings)


def generate_video_files(request: GenerateRequest, *, progress: bool = True,
                         outputs: tuple[str, ...] = (".mp4", ".gif")) -> list[dict[str, Any]]:
    """`generate_videos`, then each video written into `request.output_dir` as `NNN<suffix>` per suffix in
    `outputs` ('/' = a folder `NNN/` of PNG frames, at `request.out_fps`) with `NNN.json`, its generation record
    (`dataformat.generation`: prompt, image, seed, checkpoint, settings); returns one record per video (paths,
    size, settings)."""
    for suffix in outputs:
        if suffix != "/":
            check_output(f"NNN{suffix}")
    generated = generate_videos(request, progress=progress)
    out, out_fps, checkpoint = Path(request.output_dir), request.out_fps, request.checkpoint
    out.mkdir(parents=True, exist_ok=True)
    image_sha256 = None if request.image is None else image_digest(request.image)
    first_frame_path = None
    if generated.first_frame is not None:
        first_frame_path = out / "000-first-frame.png"
        generated.first_frame.save(first_frame_path)
    records = []
    for index, (label, video) in enumerate(zip(generated.labels, generated.videos, strict=True)):
        record: dict[str, Any] = {
            "prompt": label, "image": request.image, "frames": int(video.shape[0]),
            "height": int(video.shape[1]), "width": int(video.shape[2]), "settings": generated.settings,
            "warnings": generated.warnings,
        }
        if first_frame_path is not None:
            record["first_frame"] = str(first_frame_path)
        for suffix in outputs:
            if suffix == "/":
                record["png"] = str(write_frames(video, f"{out / f'{index:03d}'}/", out_fps)[0].parent)
            else:
                record[suffix.lstrip(".")] = str(write_frames(video, out / f"{index:03d}{suffix}", out_fps)[0])
        write_generation_record(out / f"{index:03d}", {  # what made it, for comparisons across runs
            "prompt": label, "image": request.image, "image_sha256": image_sha256,
            "seed": generated.settings["seed"], "checkpoint": None if checkpoint is None else str(checkpoint),
            "settings": generated.settings})
        records.append(record)
    return records


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value
