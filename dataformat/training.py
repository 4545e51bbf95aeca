"""Where a training stage writes (`lvd train`, the train-stage flow), and what one of its checkpoints holds.

    OUTPUT_ROOT/stageN/           stage N, text-to-video (`stageN-image/`: the image-to-video finetune)
      pipeline/                   the exported diffusers pipeline: the stage's result, the next stage's start
      tensorboard/                TensorBoard scalars and sample videos
      samples/step-NNNNNN.gif     sample videos
      metrics.jsonl               one JSON line per logged step
      progress.json               the last step and the total (the flow's progress artifact follows it)
      loss.png                    the loss curve
      motion_buckets.png          the motion buckets the stage trained on
      lineage.json                what the stage started from and ran with (its parent stage's lineage inside)
      bad_samples.json            the data check before Ray: samples left out (shard, key, reason) and the totals
      skipped_samples/*.json      samples that failed to decode in training, one file per reading process
      data_failure.json           why the stage stopped for bad data (too many bad samples), one line
      done.json                   written last: the finished stage's summary; a rerun skips the stage
      ray/train/checkpoint_*/     Ray Train's storage: the checkpoints (`CheckpointLayout`)

A checkpoint directory: unet.safetensors, ema.safetensors (when the stage keeps an EMA), optimizer.pt, rng.json,
state.json (step, data position, lineage) and files.json (every file's size, written last: a checkpoint torn by a
kill mid-copy lacks it or a file of full size); the final checkpoint also carries pipeline/ and metrics.jsonl.
"""

from __future__ import annotations

from pathlib import Path

RAY_RUN_NAME = "train"  # Ray Train's run name: checkpoints go to ray/<RAY_RUN_NAME>/checkpoint_*


def ray_snapshot(storage: str | Path) -> Path:
    """Ray Train's record of its checkpoints under a storage path (a stage's `ray/`)."""
    return Path(storage) / RAY_RUN_NAME / "checkpoint_manager_snapshot.json"


def stage_name(stage: int, conditioning: str = "text") -> str:
    """`stageN` (text-to-video) or `stageN-image` (image-to-video), so both can share an output root."""
    return f"stage{stage}" if conditioning == "text" else f"stage{stage}-{conditioning}"


class StageLayout:
    """Every path of one training stage under `OUTPUT_ROOT/stageN/`."""

    # The final checkpoint is copied to `.export-XXXX/` before its pipeline moves into place; a run killed in
    # between leaves that copy, which the next run of the stage removes.
    EXPORT_STAGING_PREFIX = ".export-"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def of(cls, output_root: str | Path, stage: int, conditioning: str = "text") -> StageLayout:
        return cls(Path(output_root).resolve() / stage_name(stage, conditioning))

    @property
    def pipeline(self) -> Path:
        return self.root / "pipeline"

    def export_leftovers(self) -> list[Path]:
        """Export copies that killed runs left in the stage directory."""
        return sorted(self.root.glob(self.EXPORT_STAGING_PREFIX + "*"))

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def sample(self, step: int) -> Path:
        return self.samples / f"step-{step:06d}.gif"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def progress(self) -> Path:
        return self.root / "progress.json"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def motion_bucket_plot(self) -> Path:
        """The histogram of the motion buckets the stage trained on."""
        return self.root / "motion_buckets.png"

    @property
    def lineage(self) -> Path:
        return self.root / "lineage.json"

    @property
    def done(self) -> Path:
        return self.root / "done.json"

    @property
    def bad_samples(self) -> Path:
        """The pre-Ray data check: the samples it left out and the totals."""
        return self.root / "bad_samples.json"

    @property
    def skipped_samples(self) -> Path:
        """Samples skipped during training (undecodable), one file per reading process (rank, pid)."""
        return self.root / "skipped_samples"

    @property
    def data_failure(self) -> Path:
        """Written by the worker that found too many bad samples; restarted workers and the driver read it."""
        return self.root / "data_failure.json"

    @property
    def ray(self) -> Path:
        """Ray Train's storage path (its run `RAY_RUN_NAME` below it holds the checkpoints)."""
        return self.root / "ray"



class CheckpointLayout:
    """The files of one training checkpoint directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def all_in(cls, stage_ray_dir: str | Path) -> list[CheckpointLayout]:
        """Every checkpoint directory Ray Train keeps under a stage's `ray/` (complete or not)."""
        return [cls(path) for path in sorted((Path(stage_ray_dir) / RAY_RUN_NAME).glob("checkpoint_*"))]

    @property
    def unet(self) -> Path:
        return self.root / "unet.safetensors"

    @property
    def ema(self) -> Path:
        return self.root / "ema.safetensors"

    @property
    def optimizer(self) -> Path:
        return self.root / "optimizer.pt"

    @property
    def rng(self) -> Path:
        return self.root / "rng.json"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def file_manifest(self) -> Path:
        return self.root / "files.json"

    @property
    def pipeline(self) -> Path:
        return self.root / "pipeline"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"
