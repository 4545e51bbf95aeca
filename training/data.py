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

Bad samples (video2dataset-style: skipped and counted, never fatal one by one): `check_training_data` runs before
Ray starts and leaves out unreadable, empty or truncated shards, samples without a video (or image) and `KEY.json`
rows whose fields have the wrong types; it scans each shard once per run, and its index of the samples kept is what
the Ray workers read. A sample that passes that check but fails to decode in training (a `.mp4`
that is not a video: tar headers cannot tell) is replaced by the next sample of the same epoch's order, read with
the position's own RNG, so the stream stays reproducible; it is counted by key. Above `max_bad_fraction` of the
data set bad (both kinds together), the stage stops with one line naming shards and keys (`BadTrainingData`),
without a Ray Train restart or a Prefect retry: bad input fails the same way every time.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import av
import cv2
import numpy as np
import torch

from common.requests import RequestError
from common.video import decode_frames_at, resize_cover_crop
from dataformat import (
    Column,
    DataError,
    IndexedSample,
    SampleKey,
    atomic_write_json,
    row_type_error,
    scan_shard,
    training_caption,
)
from training.motion import sample_motion
from training.stages import Phase, StagePreset


class BadTrainingData(DataError, RequestError):
    """More bad training samples than `max_bad_fraction` allows: the input's fault, so one line (exit 2 on the
    CLI) and never retried by Ray Train or Prefect."""


# What a sample that fails to decode raises (PyAV's InvalidDataError is a ValueError, like DataError).
DECODE_ERRORS = (ValueError, EOFError, cv2.error, av.FFmpegError)


def shard_of(sample: IndexedSample) -> str:
    return next(iter(sample.members.values())).shard


@dataclass(frozen=True)
class BadSample:
    """One sample left out: its shard, its key (None: the whole shard, its samples unknown) and why. `count` is
    how many samples it stands for (an unreadable shard: the mean of the readable shards, at least 1)."""

    shard: str
    key: str | None
    reason: str
    count: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"shard": self.shard, "key": self.key, "reason": self.reason, "count": self.count}

    def name(self) -> str:
        return f"{self.shard}:{self.key}" if self.key is not None else self.shard


@dataclass(frozen=True)
class DataCheck:
    """The pre-Ray check: usable samples in shard order, the bad ones, and the total both make up."""

    samples: list[IndexedSample]
    bad: list[BadSample]
    max_bad_fraction: float

    @property
    def bad_count(self) -> int:
        return sum(b.count for b in self.bad)

    @property
    def total(self) -> int:
        return len(self.samples) + self.bad_count

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "bad": self.bad_count, "max_bad_fraction": self.max_bad_fraction,
                "samples": [b.to_dict() for b in self.bad]}


def too_many_bad(bad: list[BadSample], total: int, max_bad_fraction: float, when: str) -> BadTrainingData:
    """The one-line error: the count, the fraction, the first few shards/keys with their reasons."""
    count = sum(b.count for b in bad)
    named = "; ".join(f"{b.name()} ({b.reason})" for b in bad[:3])
    more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
    return BadTrainingData(f"{count} of {total} training samples are bad {when} ({count / max(total, 1):.1%} > "
                           f"max_bad_fraction {max_bad_fraction:g}): {named}{more}")


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def _sample_problem(sample: IndexedSample, video_only: bool) -> str | None:
    if not (sample.is_video or sample.is_image):
        return "no video or image member"
    if video_only and not sample.is_video:
        return "no video member (every phase of the stage trains on video)"
    member = sample.members.get(SampleKey.META)
    if member is None:
        return None
    try:
        row = json.loads(member.read())
    except (ValueError, OSError) as error:
        return f"KEY.json is not JSON ({_one_line(error)})"
    return row_type_error(row)


def check_training_data(shards: Iterable[str], video_only: bool, max_bad_fraction: float) -> DataCheck:
    """Index every shard and check every sample before Ray starts (tar headers and the small `KEY.json`s, no
    decoding); raises `BadTrainingData` when more than `max_bad_fraction` of the samples are bad."""
    scans = [scan_shard(shard) for shard in shards]
    readable = [len(scan.samples) + sum(1 for key, _ in scan.problems if key) for scan in scans
                if not any(key is None for key, _ in scan.problems)]
    per_shard = max(1, round(sum(readable) / len(readable))) if readable else 1
    samples: list[IndexedSample] = []
    bad: list[BadSample] = []
    for scan in scans:
        bad += [BadSample(scan.shard, key, reason, 1 if key else per_shard) for key, reason in scan.problems]
        for sample in scan.samples:
            problem = _sample_problem(sample, video_only)
            if problem is None:
                samples.append(sample)
            else:
                bad.append(BadSample(scan.shard, sample.key, problem))
    check = DataCheck(samples, bad, max_bad_fraction)
    if check.bad_count > max_bad_fraction * check.total or (check.total and not samples):
        raise too_many_bad(bad, check.total, max_bad_fraction, "before training")
    return check


@dataclass(frozen=True)
class SkipPolicy:
    """How a stream treats samples that fail to decode: counted against `max_bad_fraction` of `total` together
    with the `known_bad` the pre-Ray check left out; `stage_dir` (a StageLayout root) gets the record."""

    max_bad_fraction: float = 0.0
    known_bad: int = 0
    total: int = 0
    stage_dir: str | None = None
    known: list[BadSample] = field(default_factory=list)


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
                 world_size: int = 1, micro_batch_size: int = 1, start_step: int = 0,
                 skip_policy: SkipPolicy | None = None) -> None:
        if not samples:
            raise DataError("no training samples")
        self.samples, self.preset, self.seed = samples, preset, seed
        self.skip_policy = skip_policy or SkipPolicy(total=len(samples))
        self.skipped: dict[tuple[str, str], BadSample] = {}  # this process's: loader workers keep their own
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
        """The example of `position`; a sample that fails to decode is skipped and counted, and the next sample
        of the epoch's order stands in, read with the position's own RNG (deterministic: the same bad sample
        fails the same way on every worker and every resume)."""
        count = len(self.samples)
        epoch, offset = divmod(position, count)
        order = np.random.default_rng([self.seed, 1_000_003, epoch]).permutation(count)
        for attempt in range(count):
            sample = self.samples[order[(offset + attempt) % count]]
            if (shard_of(sample), sample.key) in self.skipped:
                continue
            try:
                return self.reader.read(sample, phase, sample_rng(self.seed, position))
            except DECODE_ERRORS as error:
                reason = _one_line(error)
            self.skip(sample, reason)  # outside the except: its one-line error carries no decoder traceback
        policy = self.skip_policy
        raise self.data_failure(too_many_bad([*self.skipped.values(), *policy.known], policy.total or count,
                                             policy.max_bad_fraction, "in training"))

    def skip(self, sample: IndexedSample, reason: str) -> None:
        """Count a sample that failed in training (recorded under the stage directory); past `max_bad_fraction`
        write the stage's data failure and stop with one line."""
        from dataformat import StageLayout

        policy = self.skip_policy
        bad = BadSample(shard_of(sample), sample.key, reason)
        self.skipped[(bad.shard, bad.key)] = bad
        layout = StageLayout(policy.stage_dir) if policy.stage_dir else None
        if layout is not None:
            info = torch.utils.data.get_worker_info()
            name = f"rank{self.rank}-loader{info.id if info else 0}-pid{os.getpid()}.json"
            atomic_write_json(layout.skipped_samples / name, [b.to_dict() for b in self.skipped.values()])
        found = [*self.skipped.values(), *policy.known]  # the news first
        if policy.known_bad + len(self.skipped) > policy.max_bad_fraction * policy.total:
            raise self.data_failure(too_many_bad(found, policy.total, policy.max_bad_fraction, "in training"))

    def data_failure(self, error: BadTrainingData) -> BadTrainingData:
        """Record the stage's data failure (its one line, under the stage directory) for the driver, which raises
        it once the workers have stopped; returns `error` to raise here."""
        if self.skip_policy.stage_dir:
            from dataformat import StageLayout

            atomic_write_json(StageLayout(self.skip_policy.stage_dir).data_failure, {"error": str(error)})
        return error

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


def check_stage_data(preset: StagePreset, shards: list[str], max_bad_fraction: float, *,
                     keep: bool = True) -> DataCheck:
    """The pre-Ray data check of the stage's shards (`check_training_data`); too many bad samples raise
    `BadTrainingData` naming them before any directory is touched or any worker starts.

    A stage run meets the check up to three times in one process (`lvd train`'s request check, the flow's
    validate task, `run_stage`); the shards are scanned once: the result is kept for the same shards (path, size,
    mtime, inode) and settings, and `keep=False` (run_stage, which carries it to the workers) takes it out, so
    no index of a finished run stays in memory."""
    video_only = preset.conditioning == "multiview" or all(not phase.image_only for phase in preset.phases)
    key = (video_only, max_bad_fraction, tuple(_fingerprint(shard) for shard in shards))
    with _CHECKED_LOCK:
        check = _CHECKED.pop(key, None)
    if check is None:
        check = check_training_data(shards, video_only, max_bad_fraction)
    if keep:
        with _CHECKED_LOCK:
            _CHECKED.clear()  # one entry: the latest check
            _CHECKED[key] = check
    return check


_CHECKED: dict[tuple, DataCheck] = {}
_CHECKED_LOCK = threading.Lock()


def _fingerprint(shard: str) -> tuple:
    """What tells a shard changed since it was checked (a rewrite changes its inode, size or mtime)."""
    try:
        stat = os.stat(shard)
    except OSError:
        return (shard,)
    return shard, stat.st_ino, stat.st_size, stat.st_mtime_ns
