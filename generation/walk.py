"""Interpolation walks on the video model: prompt/seed walks, audio-timed walks and morphs between images.

The stable-diffusion-videos idea (slerp between the seeds' noise, lerp between the prompts' text embeddings)
done with a video model, so frames come out of one joint denoising per window instead of one image each:

* A walk is a list of waypoints (prompt + seed, optionally an image) and a frame count per segment (the
  stretch between two waypoints). Frame j of segment s sits at t in [0, 1): its initial noise is
  slerp(noise(seed_s), noise(seed_s+1), t) and its text context lerp(E(prompt_s), E(prompt_s+1), t),
  passed to the U-Net per frame. The last segment also includes t = 1, so the last waypoint is shown.
* How fast t moves is a schedule: uniform steps, or steps proportional to an audio envelope
  (generation.audio), normalised so every segment still runs from t = 0 to t = 1.
* Seams: frames are generated in windows of `window` frames (the model's clip length) that overlap by
  `overlap` frames, and each segment also regenerates the last `overlap` frames of the previous one
  ("lead-in"). Because a frame's noise and context depend only on its place on the walk, the two
  renderings of an overlapping frame differ only by their temporal neighbours; a linear crossfade over
  the overlap removes that residue. We chose overlap + crossfade over conditioning a segment on the
  previous segment's last frame because our model is text-to-video (no image-conditioning input), and
  because it keeps every segment a pure function of the plan: segments can be generated, cached and
  resumed independently and in any order.
* Morph: waypoints with images. The images are VAE-encoded; frame latents are slerp(z_s, z_s+1, t),
  re-noised to `morph_sigma` with the walk's noise and denoised with the EDM Euler sampler from there
  (img2img), so small sigmas keep the images and large ones let the model reinterpret them.
* Resume: each segment is written atomically to `segment-NNN.npz` with a key (sha256 of every setting
  and input that can change its pixels); a rerun skips segments whose key matches and regenerates the
  rest. `plan.json` records the plan for people.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.video import resize_cover_crop
from dataformat import atomic_write
from model.vae import encode_frames, scale_factor


@dataclass(frozen=True)
class Waypoint:
    """One stop of a walk: a prompt and a noise seed, and for morphs an image file."""

    prompt: str
    seed: int
    image: str | None = None


@dataclass
class WalkSettings:
    """Everything that shapes the pixels of a walk (all of it goes into the resume key)."""

    height: int = 320
    width: int = 576
    steps: int = 25
    # Constant CFG: SVD's frame-rising (min, max) guidance restarts in every window, so a walk would pulse.
    guidance: float | tuple[float, float] = 7.0
    fps_id: int = 7  # the frame rate the model is conditioned on (it sees fps_id - 1), not the output rate
    motion_bucket_id: int = 127
    window: int = 14  # frames per model call (the model's clip length)
    overlap: int = 2  # frames shared by neighbouring windows and segments, crossfaded
    morph_sigma: float = 1.0  # re-noising level for image waypoints (img2img)
    decode_chunk_size: int = 8
    model_id: str = "tiny"  # checkpoint identity (path or preset), so another model invalidates the cache

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"window must be an int >= 2 frames, got {self.window!r}")
        if not isinstance(self.overlap, int) or not 0 <= self.overlap < self.window:
            raise ValueError(f"overlap must be in [0, window={self.window}), got {self.overlap!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.morph_sigma <= 0:
            raise ValueError(f"morph_sigma must be positive, got {self.morph_sigma}")


@dataclass
class SegmentPlan:
    """Frames a segment renders: `lead_in` frames of the previous segment, then its own.

    `pairs[i]` are the two waypoints frame i interpolates between and `t[i]` where it sits."""

    index: int
    pairs: np.ndarray  # (N, 2) int waypoint indices
    t: np.ndarray  # (N,) float64
    lead_in: int
    key: str = ""

    @property
    def own_frames(self) -> int:
        return len(self.t) - self.lead_in


@dataclass
class WalkResult:
    frames: np.ndarray  # uint8 (T, H, W, 3), the whole walk
    generated: list[int] = field(default_factory=list)  # segments rendered by this call
    reused: list[int] = field(default_factory=list)  # segments found on disk with a matching key
    plan_path: Path | None = None


def slerp(t: torch.Tensor | float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation between two noise tensors, one result per t: (len(t), *v0.shape).

    Gaussian noise lives near a sphere of radius sqrt(numel); lerp would shrink its norm mid-way (the
    model then sees too little noise and produces washed-out frames), slerp keeps it. Nearly parallel
    inputs fall back to lerp, where the sin ratio is numerically unstable."""
    if v0.shape != v1.shape:
        raise ValueError(f"slerp endpoints differ in shape: {tuple(v0.shape)} vs {tuple(v1.shape)}")
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    a, b = v0.double().flatten(), v1.double().flatten()
    dot = (a @ b) / (a.norm() * b.norm()).clamp_min(1e-12)
    weights_shape = (-1, *([1] * v0.ndim))
    if dot.abs() > dot_threshold:
        out = lerp(t, v0.double(), v1.double())
    else:
        theta = torch.arccos(dot.clamp(-1, 1))
        w0 = (torch.sin((1 - t) * theta) / torch.sin(theta)).reshape(weights_shape)
        w1 = (torch.sin(t * theta) / torch.sin(theta)).reshape(weights_shape)
        out = w0 * v0.double() + w1 * v1.double()
    return out.to(v0.dtype)


def lerp(t: torch.Tensor | float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Linear interpolation, one result per t: (len(t), *v0.shape). Text embeddings are not Gaussian
    noise, so the straight line between them is the natural path (as stable-diffusion-videos does)."""
    t = torch.as_tensor(t, dtype=v0.dtype).reshape(-1, *([1] * v0.ndim))
    return v0 + t * (v1 - v0)


def segment_schedule(num_frames: int, include_end: bool, speeds: np.ndarray | None = None) -> np.ndarray:
    """Where each frame of one segment sits on t in [0, 1].

    `speeds[j]` (>= 0, one per frame) is how far t moves from frame j to frame j+1, up to a common factor
    chosen so the segment spans exactly [0, 1) (or [0, 1] with `include_end`). None = uniform steps."""
    if not isinstance(num_frames, int | np.integer) or num_frames < 1:
        raise ValueError(f"a segment needs at least one frame, got {num_frames!r}")
    steps = num_frames - 1 if include_end else num_frames
    if speeds is None:
        speeds = np.ones(num_frames)
    speeds = np.asarray(speeds, dtype=np.float64)
    if speeds.shape != (num_frames,) or not np.isfinite(speeds).all() or (speeds < 0).any():
        raise ValueError(f"speeds must be {num_frames} finite values >= 0, got shape {speeds.shape}")
    if steps == 0:
        return np.zeros(1)
    moves = speeds[:steps]
    if moves.sum() <= 0:
        moves = np.ones(steps)
    return np.concatenate([[0.0], np.cumsum(moves)[:-1] if not include_end else np.cumsum(moves)]) / moves.sum()


def plan_walk(
    waypoints: Sequence[Waypoint], segment_frames: Sequence[int], overlap: int, speeds: np.ndarray | None = None
) -> list[SegmentPlan]:
    """Split the walk into segments with their frame positions and lead-in frames.

    `speeds`: one value per output frame of the whole walk (e.g. an audio envelope), or None."""
    check_walk_inputs(waypoints, segment_frames)
    total = int(sum(segment_frames))
    if speeds is not None and len(speeds) != total:
        raise ValueError(f"speeds has {len(speeds)} values for a walk of {total} frames")
    plans, start = [], 0
    last = len(segment_frames) - 1
    for index, count in enumerate(segment_frames):
        local = None if speeds is None else np.asarray(speeds[start : start + count])
        t = segment_schedule(int(count), include_end=index == last, speeds=local)
        pairs = np.tile([index, index + 1], (len(t), 1))
        lead_in = 0
        if index > 0:
            previous = plans[-1]
            lead_in = min(overlap, previous.own_frames)
            if lead_in:
                t = np.concatenate([previous.t[len(previous.t) - lead_in :], t])
                pairs = np.concatenate([previous.pairs[len(previous.pairs) - lead_in :], pairs])
        plans.append(SegmentPlan(index=index, pairs=pairs, t=t, lead_in=lead_in))
        start += count
    return plans


def check_walk_inputs(waypoints: Sequence[Waypoint], segment_frames: Sequence[int]) -> None:
    """Clear errors for the mistakes people make when listing prompts, seeds, images and lengths."""
    if len(waypoints) < 2:
        raise ValueError(f"a walk needs at least 2 waypoints (prompts/seeds/images), got {len(waypoints)}")
    if len(segment_frames) != len(waypoints) - 1:
        raise ValueError(f"{len(waypoints)} waypoints make {len(waypoints) - 1} segments, but "
                         f"{len(segment_frames)} segment lengths were given")
    for index, count in enumerate(segment_frames):
        if not isinstance(count, int | np.integer) or count < 1:
            raise ValueError(f"segment {index} length must be a positive number of frames, got {count!r}")
    for index, waypoint in enumerate(waypoints):
        if not isinstance(waypoint.prompt, str):
            raise ValueError(f"waypoint {index}: prompt must be a string, got {waypoint.prompt!r}")
        if waypoint.image is None and not waypoint.prompt.strip():
            raise ValueError(f"waypoint {index}: empty prompt (a text walk needs a prompt at every waypoint)")
        if not isinstance(waypoint.seed, int | np.integer):
            raise ValueError(f"waypoint {index}: seed must be an int, got {waypoint.seed!r}")
        if waypoint.image is not None and not Path(waypoint.image).is_file():
            raise ValueError(f"waypoint {index}: image file not found: {waypoint.image}")
    kinds = {waypoint.image is None for waypoint in waypoints}
    if len(kinds) > 1:
        raise ValueError("either every waypoint has an image (morph) or none has (text walk)")


def load_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image file as displayed (`common.images.read_image`) as (3, height, width) in [-1, 1]: resized to
    cover, then centre-cropped."""
    from common.images import read_image

    image = resize_cover_crop(np.asarray(read_image(path)), height, width)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def segment_key(plan: SegmentPlan, waypoints: Sequence[Waypoint], settings: WalkSettings) -> str:
    """sha256 of everything that determines this segment's pixels (not batch size or offload)."""
    used = sorted({int(i) for i in plan.pairs.flatten()})
    stops = [dict(asdict(waypoints[i]), image=_file_digest(waypoints[i].image) if waypoints[i].image else None)
             for i in used]
    payload = json.dumps({"settings": asdict(settings), "waypoints": dict(zip(map(str, used), stops, strict=True)),
                          "pairs": plan.pairs.tolist(), "t": [round(float(v), 12) for v in plan.t],
                          "lead_in": plan.lead_in}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class WalkRenderer:
    """Renders frames at walk positions with a TextToVideoPipeline: per-frame noise and context, windows."""

    def __init__(self, pipe, waypoints: Sequence[Waypoint], settings: WalkSettings, batch_size: int = 1,
                 progress: bool = False) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of windows, got {batch_size!r}")
        factor = scale_factor(pipe.vae)
        if settings.height % factor or settings.width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {settings.height}x{settings.width}")
        self.pipe, self.waypoints, self.settings = pipe, list(waypoints), settings
        self.batch_size, self.progress = batch_size, progress
        self.latent_shape = (pipe.unet.config.in_channels, settings.height // factor, settings.width // factor)
        self._embeddings: dict[str, torch.Tensor] = {}
        self._noise: dict[int, torch.Tensor] = {}
        self._image_latents: dict[str, torch.Tensor] = {}

    def embedding(self, prompt: str) -> torch.Tensor:
        if prompt not in self._embeddings:
            self._embeddings[prompt] = self.pipe.encode_prompt([prompt])[1].float().cpu()
        return self._embeddings[prompt]

    def noise(self, seed: int) -> torch.Tensor:
        """One latent frame of N(0, 1) noise per seed: the same seed gives the same noise on every machine."""
        if seed not in self._noise:
            generator = torch.Generator().manual_seed(int(seed))
            self._noise[seed] = torch.randn(self.latent_shape, generator=generator, dtype=torch.float32)
        return self._noise[seed]

    def image_latent(self, path: str) -> torch.Tensor:
        if path not in self._image_latents:
            image = load_image(path, self.settings.height, self.settings.width)[None, None]
            latent = encode_frames(self.pipe.vae, image.to(self.pipe.vae.dtype))
            self._image_latents[path] = latent[0, 0].float().cpu()
        return self._image_latents[path]

    def frame_inputs(self, pairs: np.ndarray, t: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Per-frame (noise, text embedding, clean image latent or None) for walk positions."""
        noises, embeds, images = [], [], []
        for (a, b), position in zip(pairs, t, strict=True):
            start, end = self.waypoints[a], self.waypoints[b]
            noises.append(slerp(position, self.noise(start.seed), self.noise(end.seed))[0])
            embeds.append(lerp(position, self.embedding(start.prompt), self.embedding(end.prompt))[0])
            if start.image is not None:
                images.append(slerp(position, self.image_latent(start.image), self.image_latent(end.image))[0])
        return torch.stack(noises), torch.stack(embeds), (torch.stack(images) if images else None)

    def render(self, pairs: np.ndarray, t: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) for N walk positions: overlapping windows, batched, crossfaded."""
        noise, embeds, images = self.frame_inputs(pairs, t)
        count = len(t)
        window = min(self.settings.window, count)
        starts = window_starts(count, window, self.settings.overlap)
        rendered: list[np.ndarray] = []
        for first in range(0, len(starts), self.batch_size):
            batch = starts[first : first + self.batch_size]

            def take(x: torch.Tensor, batch: list[int] = batch) -> torch.Tensor:
                return torch.stack([x[s : s + window] for s in batch])

            kwargs = {}
            if images is not None:
                kwargs = dict(init_latents=take(images), init_sigma=self.settings.morph_sigma)
            out = self.pipe(
                prompt_embeds=take(embeds), num_frames=window, height=self.settings.height,
                width=self.settings.width, num_inference_steps=self.settings.steps,
                guidance_scale=self.settings.guidance, fps=self.settings.fps_id,
                motion_bucket_id=self.settings.motion_bucket_id, latents=take(noise),
                decode_chunk_size=self.settings.decode_chunk_size, progress=self.progress, **kwargs,
            ).frames
            rendered.extend(out)
        return crossfade_windows(rendered, starts, count)


def window_starts(count: int, window: int, overlap: int) -> list[int]:
    """First frames of windows covering `count` frames, neighbours sharing at least `overlap` frames; the
    last window is pulled back to end exactly at `count` (it then shares more)."""
    if window >= count:
        return [0]
    stride = window - overlap
    starts = list(range(0, count - window, stride))
    return starts + [count - window]


def crossfade(previous: np.ndarray, following: np.ndarray) -> np.ndarray:
    """Blend two renderings of the same frames, weight moving linearly from `previous` to `following`."""
    if previous.shape != following.shape:
        raise ValueError(f"crossfade needs equal shapes, got {previous.shape} and {following.shape}")
    alpha = (np.arange(1, len(previous) + 1) / (len(previous) + 1)).reshape(-1, 1, 1, 1)
    return ((1 - alpha) * previous + alpha * following).round().astype(np.uint8)


def crossfade_windows(windows: Sequence[np.ndarray], starts: Sequence[int], count: int) -> np.ndarray:
    out = np.zeros((count, *windows[0].shape[1:]), dtype=np.uint8)
    end = 0
    for frames, start in zip(windows, starts, strict=True):
        shared = end - start
        if shared > 0:
            out[start:end] = crossfade(out[start:end], frames[:shared])
        out[max(start, end) : start + len(frames)] = frames[max(shared, 0) :]
        end = start + len(frames)
    return out


def assemble(segments: Sequence[np.ndarray], lead_ins: Sequence[int]) -> np.ndarray:
    """Join segment renderings: each segment's lead-in frames crossfade with the previous segment's tail."""
    video = [segments[0]]
    for frames, lead_in in zip(segments[1:], lead_ins[1:], strict=True):
        if lead_in:
            tail = video[-1]
            video[-1] = np.concatenate([tail[: len(tail) - lead_in], crossfade(tail[len(tail) - lead_in :],
                                                                                frames[:lead_in])])
        video.append(frames[lead_in:])
    return np.concatenate(video)


def load_segment(path: Path, key: str) -> np.ndarray | None:
    """The frames of a finished segment, or None if missing, unreadable or made with other settings."""
    try:
        with np.load(path) as data:
            return data["frames"] if str(data["key"]) == key else None
    except (OSError, ValueError, KeyError, EOFError):
        return None


def run_walk(
    pipe,
    waypoints: Sequence[Waypoint],
    segment_frames: Sequence[int],
    work_dir: str | Path,
    settings: WalkSettings,
    speeds: np.ndarray | None = None,
    batch_size: int = 1,
    progress: bool = False,
    on_segment: Callable[[int, str], None] | None = None,
) -> WalkResult:
    """Render (or resume) a walk into `work_dir` (plan.json + segment-NNN.npz) and return all its frames.

    Segments already on disk with a matching key are reused; others are rendered and written atomically
    one by one, so killing the run loses at most the segment in progress."""
    waypoints = [w if isinstance(w, Waypoint) else Waypoint(*w) for w in waypoints]
    segment_frames = [int(c) if isinstance(c, np.integer) else c for c in segment_frames]
    plans = plan_walk(waypoints, segment_frames, settings.overlap, speeds)
    for plan in plans:
        plan.key = segment_key(plan, waypoints, settings)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    plan_doc = {
        "settings": asdict(settings), "waypoints": [asdict(w) for w in waypoints],
        "segment_frames": list(segment_frames), "total_frames": int(sum(segment_frames)),
        "segments": [{"index": p.index, "file": f"segment-{p.index:03d}.npz", "key": p.key, "lead_in": p.lead_in,
                      "own_frames": p.own_frames, "t": [round(float(v), 6) for v in p.t]} for p in plans],
    }
    plan_path = work / "plan.json"
    atomic_write(plan_path, lambda handle: handle.write(json.dumps(plan_doc, indent=1, default=str).encode()))
    renderer = WalkRenderer(pipe, waypoints, settings, batch_size=batch_size, progress=progress)
    result = WalkResult(frames=np.zeros(0, np.uint8), plan_path=plan_path)
    segments = []
    for plan in plans:
        path = work / f"segment-{plan.index:03d}.npz"
        frames = load_segment(path, plan.key)
        if frames is None:
            frames = renderer.render(plan.pairs, plan.t)
            atomic_write(path, lambda handle, f=frames, k=plan.key: np.savez(handle, frames=f, key=k))
            result.generated.append(plan.index)
        else:
            result.reused.append(plan.index)
        if on_segment is not None:
            on_segment(plan.index, "rendered" if result.generated[-1:] == [plan.index] else "reused")
        segments.append(frames)
    result.frames = assemble(segments, [p.lead_in for p in plans])
    return result
