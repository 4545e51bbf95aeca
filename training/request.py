"""`StageRunRequest`: one training-stage run, the one spelling shared by `run_stage`, the `train-stage` flow,
`lvd train` and the pipeline's DAG."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from common.requests import Request, RequestError, setting
from dataformat import DataError, StageLayout, find_shards
from infra.local import check_ray_connection
from infra.output_lock import acquire_output_lock
from training.decoder_settings import DecoderFinetuneSettings, check_decoder_geometry
from training.motion import LINEAR_SCALE, RELEASED_SVD_BUCKET, MotionBuckets
from training.stages import DEFAULT_IMAGE_TO_VIDEO_NOISE, StagePreset, get_stage_preset, with_video_frames


def default_init(stage: int, preset: str, output_root: str | Path) -> str:
    """Stage I starts from SD 2.x (`svd`) or the tiny preset; stage N from stage N-1's exported pipeline."""
    if stage == 1:
        return get_stage_preset(1, preset).init or preset
    previous = StageLayout.of(output_root, stage - 1).pipeline
    if not (previous / "model_index.json").exists():
        raise FileNotFoundError(f"stage {stage} starts from stage {stage - 1}'s output, but {previous} does not "
                                f"exist: run stage {stage - 1} first (or pass init=<pipeline dir>)")
    return str(previous)


@dataclass(frozen=True)
class StageRunRequest(Request):
    """Train SVD stage `stage` (1 images, 2 low-res video, 3 high-res finetune) with Ray Train."""

    stage: int = setting(help="1, 2 or 3 (docs/recipe.md §4); stage N starts from OUTPUT_ROOT/stage{N-1}/pipeline "
                              "unless --init")
    preset: str = setting("tiny", help="`tiny` (CPU, minutes), `svd` (the paper's sizes, GPUs) or `svd-xt` (svd with "
                                       "stage III on 25 frames)")
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
    conditioning: Literal["text", "image", "multiview"] = setting(
        "text", help="text: text-to-video; image: image-to-video, stages 2-3 (finetunes --init, a diffusers SVD "
                     "folder, or the text-to-video export; writes OUTPUT_ROOT/stageN-image/); multiview: stage 3 "
                     "on `lvd orbits` data, view 0 conditions the orbit (writes OUTPUT_ROOT/stage3-multiview/)")
    camera_embedding: bool = setting(False, help="multiview: add SV3D-style per-frame camera embeddings (new "
                                                 "layers: the export then loads with this project only)")
    elevation_condition: Literal["paper", "motion-bucket"] = setting(
        "paper", help="multiview: how the orbit's elevation reaches the U-Net. paper: SVD-MV's fourth vector "
                      "condition (App. D.6; add_embedding 768 -> 1024 inputs, new ones zero; diffusers' U-Net class "
                      "loads the export, its StableVideoDiffusionPipeline cannot run it, lvd generate does); "
                      "motion-bucket: on the motion bucket id (no new layers, stock diffusers runs the export)")
    image_encoder: str | None = setting(None, help="image mode from a text-to-video export: an SVD or CLIP vision "
                                                   "folder ('tiny' preset: random)", path="input")
    decoder_steps: int = setting(0, min=0, help="image mode: then finetune the export's temporal VAE decoder for "
                                                "this many steps")
    num_frames: int | None = setting(None, min=2, flag="--frames", help="frames of every video phase (default: the "
                                                                        "preset's; image-to-video stage III: the "
                                                                        "init U-Net's, 14 SVD / 25 SVD-XT)")
    image_noise: Literal["576x1024", "320x576"] = setting(
        DEFAULT_IMAGE_TO_VIDEO_NOISE, help="image-to-video stage III training noise, the paper's (App. D.4): "
                                           "576x1024 = (P_mean, P_std) (1.0, 1.6), its high-res finetune; 320x576 = "
                                           "(0.7, 1.6), its base-resolution one (SVD_Xtend's)")
    export: Literal["ema", "raw"] = setting("ema", help="exported weights: ema (sgm's warm-up EMA, where the stage "
                                                        "keeps one: stage III) or raw (the trained weights)")
    motion_buckets: Literal["fixed", "linear", "percentile"] | None = setting(
        None, help="sample motion (measured at its stride) -> motion bucket: fixed (motion_bucket for all), linear "
                   "(motion_scale -> 255) or percentile (rank in the training set); default: fixed for "
                   "image-to-video (keeps released SVD's 127), linear for text-to-video")
    motion_bucket: int = setting(RELEASED_SVD_BUCKET, min=0, max=255, help="the bucket of the fixed mapping")
    motion_scale: float = setting(LINEAR_SCALE, min=1e-6, help="linear mapping: the motion (px per frame pair at a "
                                                               "16 px short side) that maps to bucket 255")
    motion_reference_samples: int = setting(512, min=1, help="percentile mapping: training samples measured "
                                                             "before the run as its reference")
    target_latents: Literal["sample", "mode"] | None = setting(
        None, help="the diffusion targets: sample (a VAE posterior draw, as sgm trains) or mode (its mean); default: "
                   "the preset's (sample; tiny: mode)")

    trainable: Literal["all", "temporal", "lora", "time_embedding"] | None = setting(
        None, help="what trains in every phase (default: each phase's own set): all, temporal (the layers SVD "
                   "added to the image U-Net), lora (adapters on the attention projections), time_embedding")
    lora_rank: int = setting(16, min=1, max=1024, help="trainable lora: adapter rank")
    lora_alpha: float = setting(16.0, min=1e-6, help="trainable lora: adapter scale is lora_alpha / lora_rank")
    precision: Literal["auto", "bf16", "fp32"] = setting("auto", help="autocast: auto = bf16 on CUDA, float32 on "
                                                                      "a CPU; bf16 anywhere; fp32 off")
    optimizer: Literal["adamw", "adamw8bit"] = setting("adamw", help="adamw (torch, fp32 states) or adamw8bit "
                                                                     "(bitsandbytes, CUDA only)")
    gradient_checkpointing: bool | None = setting(None, help="recompute activations in the backward pass "
                                                             "(default: the stage preset's)")
    max_bad_fraction: float = setting(0.01, min=0.0, max=1.0, help="bad training samples (unreadable, empty or "
                                                                  "truncated shards, no video, KEY.json of wrong "
                                                                  "types, undecodable clips) are skipped and "
                                                                  "counted; above this fraction of the data set the "
                                                                  "stage stops, naming shards and keys")
    plan: bool = setting(False, help="print the resolved stage and an estimate of peak GPU memory per worker "
                                     "(computed on the CPU, without weights), then stop")
    decoder: DecoderFinetuneSettings = setting(default_factory=DecoderFinetuneSettings,
                                               help="the decoder finetune's losses and optimiser (--set "
                                                    "decoder.KEY=VALUE; docs/decoder-finetune.md)")

    def stage_preset(self) -> StagePreset:
        """The stage as this run trains it: the preset cut to `max_steps`, with the request's trainable set,
        precision, optimizer, LoRA size and checkpointing. The trainer and `--plan` both take this one."""
        chosen = self._stage_preset().with_max_steps(self.max_steps)
        phases = chosen.phases
        if self.trainable is not None:
            phases = tuple(replace(phase, trainable=self.trainable) for phase in phases)
        checkpointing = chosen.gradient_checkpointing if self.gradient_checkpointing is None \
            else self.gradient_checkpointing
        return replace(chosen, phases=phases, precision=self.precision, optimizer=self.optimizer,
                       lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, gradient_checkpointing=checkpointing)

    def validate(self) -> None:
        if self.camera_embedding and self.conditioning != "multiview":
            raise RequestError("camera_embedding is a multi-view option: use it with conditioning 'multiview'")
        if self.elevation_condition != "paper" and self.conditioning != "multiview":
            raise RequestError("elevation_condition is a multi-view option: use it with conditioning 'multiview'")
        stage_preset = self.stage_preset()
        for phase in stage_preset.phases:
            if phase.image_only and phase.trainable == "temporal":
                raise RequestError(f"trainable: 'temporal' trains nothing in phase {phase.name} (an image phase "
                                   "bypasses the temporal layers); choose all or lora")
        if self.optimizer == "adamw8bit" and not (self.use_gpu or self.plan):
            raise RequestError("optimizer: 'adamw8bit' (bitsandbytes) needs CUDA: pass use_gpu, or use 'adamw' "
                               "on a CPU")
        if self.optimizer == "adamw8bit" and self.strategy == "fsdp":
            raise RequestError("optimizer: 'adamw8bit' keeps bitsandbytes states of whole tensors; use strategy "
                               "'ddp' with it (or 'adamw' with fsdp)")
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise RequestError(f"min_workers: {self.min_workers} is more than num_workers {self.num_workers}")
        for workers in range(self.min_workers or self.num_workers, self.num_workers + 1):
            for phase in stage_preset.phases:
                if phase.batch_size % workers:
                    raise RequestError(f"{'num_workers' if workers == self.num_workers else 'min_workers'}: phase "
                                       f"{phase.name}'s global batch {phase.batch_size} is not divisible by "
                                       f"{workers} workers")
        if self.decoder_steps and self.conditioning == "text":
            raise RequestError("decoder_steps finetunes the temporal VAE decoder, which image-to-video exports "
                               "carry: use it with conditioning 'image'")
        if self.decoder_steps:
            last = stage_preset.phases[-1]
            check_decoder_geometry(self.decoder, last.height, last.width)
            if self.decoder.perceptual_weight > 0 and self.decoder.lpips_backbone is None and self.preset != "tiny":
                weights = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}[self.decoder.lpips_net]
                raise RequestError(f"decoder.lpips_backbone: LPIPS needs its ImageNet backbone from a local file "
                                   f"(torchvision's {weights}); pass it, or set decoder.perceptual_weight=0")

    @property
    def directory(self) -> Path:
        """Where this stage writes: OUTPUT_ROOT/stageN (or stageN-image)."""
        return StageLayout.of(self.output_root, self.stage, self.conditioning).root

    def resolve(self) -> tuple[StagePreset, list[str], str]:
        """What reads the disk, before Ray starts, with messages that say what to do: the stage cut to
        `max_steps`, the shards under `data`, the initialisation (FileNotFoundError naming what is missing)."""
        stage_preset = self.stage_preset()
        init, encoder = self.init, self.image_encoder
        if self.conditioning != "text" and init and init != "tiny" and not (Path(init) / "model_index.json").is_file():
            raise FileNotFoundError(f"init {init!r} is not a pipeline folder (no model_index.json): pass a diffusers "
                                    "SVD folder or a text-to-video stage export")
        if self.conditioning != "text" and encoder is None and self.preset != "tiny":
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
        init = init or default_init(self.stage, self.preset, self.output_root)
        if self.num_frames is None and self.conditioning == "image" and self.stage == 3 and init != "tiny":
            from model.loading import saved_unet_frames

            frames = saved_unet_frames(init)  # SVD 14, SVD-XT 25: train the frames the model generates
            if frames is not None and frames > 1:
                stage_preset = with_video_frames(stage_preset, frames)
        return stage_preset, shards, init

    def _stage_preset(self) -> StagePreset:
        """The stage's preset with this request's settings (the init's frame count comes in `resolve`)."""
        stage_preset = get_stage_preset(self.stage, self.preset, self.conditioning, self.image_noise)
        if self.num_frames is not None:
            stage_preset = with_video_frames(stage_preset, self.num_frames)
        mapping = self.motion_buckets or stage_preset.motion.mapping
        motion = MotionBuckets(mapping, fixed_bucket=self.motion_bucket, scale=self.motion_scale)
        return replace(stage_preset, export=self.export, motion=motion, camera_embedding=self.camera_embedding,
                       elevation_condition=self.elevation_condition,
                       target_latents=self.target_latents or stage_preset.target_latents)

    def check_inputs(self) -> dict[str, Any]:
        """The plan of the run, once `resolve` found everything it needs. A `plan` request reads no shards and
        needs no previous stage (it predicts memory from the architecture, see training/memory_plan.py). A run takes
        the output root's writer lock for this process first (`lvd train` in its own process, a served flow run in
        its own), so a second run into the same root is refused in one line before it deletes or overwrites
        anything."""
        if self.plan:
            if self.init not in (None, "tiny") and not Path(self.init).exists():
                raise FileNotFoundError(f"init {self.init!r} does not exist")
            stage_preset = self.stage_preset()
            return {"steps": stage_preset.total_steps, "phases": [phase.name for phase in stage_preset.phases]}
        acquire_output_lock(self.output_root)
        try:
            check_ray_connection(self.ray_address)
        except ConnectionError as error:
            raise RequestError(str(error)) from None
        stage_preset, shards, init = self.resolve()
        from model.folder_check import check_pipeline_source

        for source in (init, self.image_encoder):  # one line naming the file, before any worker loads it
            check_pipeline_source(source)
        from training.data import check_stage_data

        # too many bad samples: one line, exit 2; the result is kept in this process for `run_stage` (one scan)
        check_stage_data(stage_preset, shards, self.max_bad_fraction)
        return {"shards": len(shards), "init": init, "steps": stage_preset.total_steps,
                "phases": [phase.name for phase in stage_preset.phases]}
