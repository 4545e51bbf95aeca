"""`StageRunRequest`: one training-stage run, the one spelling shared by `run_stage`, the `train-stage` flow,
`lvd train` and the pipeline's DAG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common.requests import Request, RequestError, setting
from dataformat import DataError, acquire_output_lock, find_shards
from infra.local import check_ray_connection
from training.stages import StagePreset, get_stage_preset


def stage_dir(output_root: str | Path, stage: int, conditioning: str = "text") -> Path:
    """`stageN` (text-to-video) or `stageN-image` (image-to-video), so both can share an output root."""
    return Path(output_root).resolve() / (f"stage{stage}" if conditioning == "text" else f"stage{stage}-{conditioning}")


def default_init(stage: int, preset: str, output_root: str | Path) -> str:
    """Stage I starts from SD 2.x (`svd`) or the tiny preset; stage N from stage N-1's exported pipeline."""
    if stage == 1:
        return get_stage_preset(1, preset).init or preset
    previous = stage_dir(output_root, stage - 1) / "pipeline"
    if not (previous / "model_index.json").exists():
        raise FileNotFoundError(f"stage {stage} starts from stage {stage - 1}'s output, but {previous} does not "
                                f"exist: run stage {stage - 1} first (or pass init=<pipeline dir>)")
    return str(previous)


@dataclass(frozen=True)
class StageRunRequest(Request):
    """Train SVD stage `stage` (1 images, 2 low-res video, 3 high-res finetune) with Ray Train."""

    stage: int = setting(help="1, 2 or 3 (docs/recipe.md §4); stage N starts from OUTPUT_ROOT/stage{N-1}/pipeline "
                              "unless --init")
    preset: str = setting("tiny", help="`tiny` (CPU, minutes) or `svd` (the paper's sizes, GPUs)")
    data: str = setting("out/curate", path="dir",
                        help="a curate-lvd output directory (its shards/) or a folder of WebDataset .tar shards")
    output_root: str = setting("out/train", help="stage N writes OUTPUT_ROOT/stageN/ (pipeline/, tensorboard/, "
                                                 "checkpoints under ray/)", path="output")
    num_workers: int = setting(1, min=1, help="Ray Train workers (gloo on CPU, NCCL on GPU)")
    min_workers: int | None = setting(None, min=1, help="elastic: after losing nodes, go on (from the last "
                                                        "checkpoint) with as few as this many workers; the global "
                                                        "batch stays the same (default: exactly num_workers)")
    use_gpu: bool = setting(False, help="one GPU per worker")
    resume: bool = setting(True, negate="--restart", help="continue from the newest checkpoint, skip a finished stage "
                                                          "(CLI: --restart ignores checkpoints, starts over)")
    init: str | None = setting(None, path="input",
                               help="initialisation: a pipeline dir, an SD 2.x checkpoint path/hub id, or "
                                    "'tiny' (default: the preset's / the previous stage's pipeline)")
    max_steps: int | None = setting(None, min=1, help="cut the stage to this many optimizer steps (every phase "
                                                      "keeps at least one)")
    ray_address: str | None = setting(None, help='Ray cluster, e.g. "ray://head:10001"; default: a local Ray')
    seed: int = setting(0, help="seed of initialisation, data order and noise")
    micro_batch_size: int | None = setting(None, min=1, help="per-worker micro-batch (gradient accumulation makes "
                                                             "up the global batch); default: the whole batch")
    loader_workers: int = setting(0, min=0, help="DataLoader worker processes per Ray worker")
    max_failures: int = setting(2, min=0, help="Ray Train restarts of lost workers (from the last checkpoint)")
    strategy: Literal["ddp", "fsdp"] = setting("ddp", help="ddp: replicated weights; fsdp: FSDP2, weights, "
                                                           "gradients and optimizer state sharded")
    checkpoint_every: int | None = setting(None, min=1, help="optimizer steps between checkpoints (default: the "
                                                             "stage preset's)")
    conditioning: Literal["text", "image"] = setting(
        "text", help="text: text-to-video; image: image-to-video, stages 2-3 (finetunes --init, a diffusers SVD "
                     "folder, or the text-to-video export; writes OUTPUT_ROOT/stageN-image/)")
    image_encoder: str | None = setting(None, help="image mode from a text-to-video export: an SVD or CLIP vision "
                                                   "folder ('tiny' preset: random)", path="input")
    decoder_steps: int = setting(0, min=0, help="image mode: then finetune the export's temporal VAE decoder for "
                                                "this many steps")

    def validate(self) -> None:
        stage_preset = get_stage_preset(self.stage, self.preset, self.conditioning).with_max_steps(self.max_steps)
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise RequestError(f"min_workers: {self.min_workers} is more than num_workers {self.num_workers}")
        for workers in range(self.min_workers or self.num_workers, self.num_workers + 1):
            for phase in stage_preset.phases:
                if phase.batch_size % workers:
                    raise RequestError(f"{'num_workers' if workers == self.num_workers else 'min_workers'}: phase "
                                       f"{phase.name}'s global batch {phase.batch_size} is not divisible by "
                                       f"{workers} workers")
        if self.decoder_steps and self.conditioning != "image":
            raise RequestError("decoder_steps finetunes the temporal VAE decoder, which image-to-video exports "
                               "carry: use it with conditioning 'image'")

    @property
    def directory(self) -> Path:
        """Where this stage writes: OUTPUT_ROOT/stageN (or stageN-image)."""
        return stage_dir(self.output_root, self.stage, self.conditioning)

    def resolve(self) -> tuple[StagePreset, list[str], str]:
        """What reads the disk, before Ray starts, with messages that say what to do: the stage cut to
        `max_steps`, the shards under `data`, the initialisation (FileNotFoundError naming what is missing)."""
        stage_preset = get_stage_preset(self.stage, self.preset, self.conditioning).with_max_steps(self.max_steps)
        init, encoder = self.init, self.image_encoder
        if self.conditioning == "image" and init and init != "tiny" and not (Path(init) / "model_index.json").is_file():
            raise FileNotFoundError(f"init {init!r} is not a pipeline folder (no model_index.json): pass a diffusers "
                                    "SVD folder or a text-to-video stage export")
        if self.conditioning == "image" and encoder is None and self.preset != "tiny":
            from model.image_to_video import is_image_to_video_folder  # diffusers: only image requests import it

            if not (init and is_image_to_video_folder(init)):
                raise RequestError("image-to-video training from a text-to-video checkpoint needs an image "
                                   "encoder: pass image_encoder=<SVD folder or CLIPVisionModelWithProjection folder>, "
                                   "or init=<SVD folder>")
        if encoder not in (None, "tiny") and not Path(encoder).is_dir():
            raise FileNotFoundError(f"image_encoder {encoder!r} is not a folder (an SVD or CLIP vision folder)")
        try:
            shards = find_shards(self.data)
        except DataError as error:
            raise FileNotFoundError(str(error)) from error
        return stage_preset, shards, init or default_init(self.stage, self.preset, self.output_root)

    def check_inputs(self) -> dict[str, Any]:
        """The plan of the run, once `resolve` found everything it needs. Takes the output root's writer lock
        for this process first (`lvd train` in its own process, a served flow run in its own), so a second run
        into the same root is refused in one line before it deletes or overwrites anything."""
        acquire_output_lock(self.output_root)
        try:
            check_ray_connection(self.ray_address)
        except ConnectionError as error:
            raise RequestError(str(error)) from None
        stage_preset, shards, init = self.resolve()
        return {"shards": len(shards), "init": init, "steps": stage_preset.total_steps,
                "phases": [phase.name for phase in stage_preset.phases]}
