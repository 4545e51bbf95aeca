"""Training samples from curate-lvd's WebDataset shards, deterministic and sharded by Ray and loader worker.

The shards are indexed once by `dataformat.index_shards` (tar headers only), so any sample can be read by
seeking. The sample stream is a fixed sequence of *global positions*: position g reads sample
`permutation(seed, epoch)[g mod N]` with epoch = g // N, and every random choice for it (frame stride,
start frame, caption, text dropout, and in the trainer its noise level and noise) is drawn from an RNG
seeded by (seed, g). Ray worker r of W takes the positions of each optimizer step that are = r mod W, and
dataloader worker w takes every w-th micro-batch. So the batches do not depend on how many workers
read them (2 workers = 1 worker with the doubled batch), and resuming at step s reads exactly what an
uninterrupted run would have read from step s on.

Per sample (docs/recipe.md §1, §4): T frames at a stride (the resulting fps is the fps conditioning), resized to
cover the phase resolution and centre-cropped, motion bucket from the sample's own motion at that stride through
the preset's named mapping (`training/motion.py`; `fixed` 127 ignores it), caption drawn from the
captioners' mix (CoCa 0.5, video 0.25, LLM summary 0.25 among those present), text dropped 15% for CFG.
Image phases read image samples (jpg/png + txt) or one frame of a clip.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np
import torch

from common.video import decode_frames_at, resize_cover_crop
from dataformat import Column, DataError, IndexedSample, training_caption
from training.motion import sample_motion
from training.stages import Phase, StagePreset


def count_frames(meta: dict[str, Any], data: bytes) -> int:
    if meta.get(Column.END_FRAME) is not None and meta.get(Column.START_FRAME) is not None:
        return int(meta[Column.END_FRAME]) - int(meta[Column.START_FRAME])
    import av

    with av.open(io.BytesIO(data)) as container:
        return sum(1 for _ in container.decode(video=0))


class SampleReader:
    """Turns one indexed sample plus its RNG into a training example for a phase."""

    def __init__(self, preset: StagePreset) -> None:
        self.preset = preset

    def read(self, sample: IndexedSample, phase: Phase, rng: np.random.Generator) -> dict[str, Any]:
        meta, text = sample.meta(), sample.text()
        source_fps = float(meta.get(Column.FPS) or 25.0)
        if sample.is_image and (phase.image_only or not sample.is_video):
            extension = sample.image_extension
            image = cv2.imdecode(np.frombuffer(sample.members[extension].read(), np.uint8), cv2.IMREAD_COLOR)
            if image is None:
                raise DataError(f"sample {sample.key}: undecodable {extension}")
            frames, fps = [cv2.cvtColor(image, cv2.COLOR_BGR2RGB)], source_fps
            motion = None
        elif self.preset.conditioning == "multiview":
            return self.read_orbit(sample, meta, phase)
        else:
            data = sample.members[sample.video_extension].read()
            available = count_frames(meta, data)
            indices, stride = self.frame_indices(available, phase.num_frames, rng)
            frames, fps = decode_frames_at(data, indices, threaded=True), source_fps / stride
            if len(frames) != len(indices):
                raise DataError(f"clip has fewer frames than its manifest says (wanted up to frame {max(indices)})")
            motion = sample_motion(frames) if self.preset.motion.measures else None
        pixels = resize_cover_crop(np.stack(frames), phase.height, phase.width)
        caption = training_caption(meta, text, rng, self.preset.caption_mix)
        if rng.random() < self.preset.text_drop_rate:
            caption = ""
        return {
            "pixels": torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0),  # (T, 3, H, W)
            "caption": caption,
            "fps": float(round(fps)),
            "motion_bucket": float(self.preset.motion.bucket(motion)),
            "motion": motion,
            "key": sample.key,
        }

    def read_orbit(self, sample: IndexedSample, meta: dict[str, Any], phase: Phase) -> dict[str, Any]:
        """Multi-view: T views evenly spaced around the orbit from view 0 (the conditioning image); the elevation
        reaches the U-Net as the preset's `elevation_condition` says (model/multiview.py: `elevation`, the fourth
        added-time id, or on the motion bucket) and `camera` holds each view's elevation and azimuth relative to
        view 0."""
        from model.multiview import camera_micro_conditioning, relative_azimuths

        if meta.get(Column.ELEVATION) is None or not meta.get(Column.AZIMUTHS) or not sample.is_video:
            raise DataError(f"sample {sample.key} is not an orbit (no cameras in its KEY.json): multi-view training "
                            "reads `lvd orbits` output")
        azimuths = list(meta[Column.AZIMUTHS])
        if len(azimuths) < phase.num_frames:
            raise DataError(f"orbit {sample.key} has {len(azimuths)} views, phase {phase.name} needs "
                            f"{phase.num_frames}: render orbits with --views >= {phase.num_frames}")
        indices = [index * len(azimuths) // phase.num_frames for index in range(phase.num_frames)]
        frames = decode_frames_at(sample.members[sample.video_extension].read(), indices, threaded=True)
        if len(frames) != len(indices):
            raise DataError(f"orbit {sample.key} has fewer frames than its {len(azimuths)} cameras")
        pixels = resize_cover_crop(np.stack(frames), phase.height, phase.width)
        elevation = float(meta[Column.ELEVATION])
        micro = camera_micro_conditioning(elevation, self.preset.elevation_condition)
        camera = [[elevation, azimuth] for azimuth in relative_azimuths([azimuths[i] for i in indices])]
        return {
            "pixels": torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0),
            "caption": "", "fps": float(micro["fps"]), "motion_bucket": float(micro["motion_bucket_id"]),
            "elevation": elevation, "camera": torch.tensor(camera, dtype=torch.float32), "key": sample.key,
        }

    def frame_indices(self, available: int, num_frames: int, rng: np.random.Generator) -> tuple[list[int], int]:
        """T frame indices at a stride drawn from the preset's strides that fit the clip (frame-wise if none)."""
        if available < 1:
            raise DataError("clip has no frames")
        if num_frames == 1:
            return [int(rng.integers(available))], 1
        fitting = [s for s in self.preset.frame_strides if (num_frames - 1) * s + 1 <= available]
        if not fitting:
            # A clip shorter than T frames: repeat its last frame rather than drop it (rare after clipping).
            return [min(i, available - 1) for i in range(num_frames)], 1
        stride = int(fitting[rng.integers(len(fitting))])
        start = int(rng.integers(available - (num_frames - 1) * stride))
        return [start + i * stride for i in range(num_frames)], stride


def sample_rng(seed: int, position: int) -> np.random.Generator:
    """The RNG for everything random about global position `position` (data and noise alike)."""
    return np.random.default_rng([seed, position])


@dataclass(frozen=True)
class MicroBatchPlan:
    step: int
    phase: Phase
    positions: tuple[int, ...]


def plan_micro_batches(preset: StagePreset, rank: int, world_size: int, micro_batch_size: int,
                       start_step: int = 0) -> Iterator[MicroBatchPlan]:
    """This rank's micro-batches from `start_step` on: global positions, step and phase of each."""
    position = 0
    for phase in preset.phases:
        if phase.batch_size % world_size:
            raise ValueError(f"phase {phase.name}: batch {phase.batch_size} not divisible by {world_size} workers")
        share = phase.batch_size // world_size
        micro = min(micro_batch_size, share)
        if share % micro:
            raise ValueError(f"phase {phase.name}: per-worker batch {share} not divisible by micro-batch {micro}")
        step_base = sum(p.iterations for p in preset.phases[: preset.phases.index(phase)])
        for within in range(phase.iterations):
            step = step_base + within
            first = position + within * phase.batch_size
            if step >= start_step:
                mine = [first + rank + world_size * j for j in range(share)]
                for start in range(0, share, micro):
                    yield MicroBatchPlan(step, phase, tuple(mine[start : start + micro]))
        position += phase.iterations * phase.batch_size


class TrainingStream(torch.utils.data.IterableDataset):
    """Collated micro-batches for one Ray worker; dataloader worker w yields micro-batches w, w+W, ..."""

    def __init__(self, samples: list[IndexedSample], preset: StagePreset, seed: int, rank: int = 0,
                 world_size: int = 1, micro_batch_size: int = 1, start_step: int = 0) -> None:
        if not samples:
            raise DataError("no training samples")
        self.samples, self.preset, self.seed = samples, preset, seed
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size, self.start_step = micro_batch_size, start_step
        self.reader = SampleReader(preset)
        needs_video = any(not p.image_only for p in preset.phases)
        if needs_video and not any(s.is_video for s in samples):
            raise DataError("video phases need clips (mp4) in the shards, found only images")

    def sample_at(self, position: int) -> IndexedSample:
        count = len(self.samples)
        epoch, offset = divmod(position, count)
        order = np.random.default_rng([self.seed, 1_000_003, epoch]).permutation(count)
        return self.samples[order[offset]]

    def example(self, position: int, phase: Phase) -> dict[str, Any]:
        return self.reader.read(self.sample_at(position), phase, sample_rng(self.seed, position))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plans = plan_micro_batches(self.preset, self.rank, self.world_size, self.micro_batch_size, self.start_step)
        for index, plan in enumerate(plans):
            if index % workers != worker:
                continue
            examples = [self.example(position, plan.phase) for position in plan.positions]
            yield {
                "pixels": torch.stack([e["pixels"] for e in examples]),
                "captions": [e["caption"] for e in examples],
                "fps": torch.tensor([e["fps"] for e in examples]),
                "motion_bucket": torch.tensor([e["motion_bucket"] for e in examples]),
                "positions": torch.tensor(plan.positions),
                "step": plan.step,
                "image_only": plan.phase.image_only,
                "keys": [e["key"] for e in examples],
                **({"camera": torch.stack([e["camera"] for e in examples])} if "camera" in examples[0] else {}),
                **({"elevation": torch.tensor([e["elevation"] for e in examples])} if "elevation" in examples[0]
                   else {}),
            }


def training_loader(stream: TrainingStream, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over pre-collated micro-batches (order preserved across loader workers).

    Workers start from a fork server: forking a process that already runs Ray, Prefect or CUDA threads
    can leave a child with a held lock that dies on start."""
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, prefetch_factor=4 if num_workers else None,
                                       multiprocessing_context="forkserver" if num_workers else None)


def reference_motions(samples: list[IndexedSample], preset: StagePreset, seed: int, count: int) -> tuple[float, ...]:
    """The motions of the stream's first `count` positions (at most one epoch) in its first video phase, read
    exactly as training reads them (same clips, strides and start frames), sorted: the reference of the
    `percentile` motion mapping."""
    phase = next((p for p in preset.phases if not p.image_only), None)
    if phase is None:
        raise DataError("motion buckets from measured motion need a video phase")
    measuring = replace(preset, motion=replace(preset.motion, mapping="linear"))  # measure; buckets unused here
    stream = TrainingStream(samples, measuring, seed)
    motions = [stream.example(position, phase)["motion"] for position in range(min(count, len(samples)))]
    measured = sorted(m for m in motions if m is not None and np.isfinite(m))
    if not measured:
        raise DataError("no sample has a measurable motion (clips of at least two frames)")
    return tuple(measured)
