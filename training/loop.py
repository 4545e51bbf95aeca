"""The training loop: one function per Ray Train worker, and the driver that runs a stage with TorchTrainer.

`run_stage` checks everything it can before any worker starts (stage, shards, initialisation), then runs
`train_loop_per_worker` on `num_workers` Ray workers (DDP, or FSDP2 with `strategy="fsdp"`; gloo on CPU / NCCL
on GPU). Rank 0 reports a checkpoint every `checkpoint_every` steps through Ray Train (storage under the
stage directory; under FSDP every rank joins the gather of full weights first); a rerun after a crash or
SIGKILL resumes from the newest one, and `FailureConfig` restarts lost workers from it. Too many bad samples are
not a lost worker: the ranks agree to stop (`until_data_failure`) and return, so Ray Train has nothing to restart,
and the driver raises `BadTrainingData` in one line. The workers read the samples the driver's pre-Ray check kept
(`StageRunConfig.samples`), so the shards' tar headers are scanned once per run.
The last report carries the exported diffusers pipeline, which the driver moves to `stageN/pipeline`.
With `min_workers` the worker group is elastic: after losing a node it restarts from the newest checkpoint with the
workers that still fit (the global batch is split over however many there are, so the result does not change).

The stage directory and a checkpoint's files are `dataformat.StageLayout` and `dataformat.CheckpointLayout`
(dataformat/training.py); pipeline/ is a TextToVideoPipeline, or a diffusers SVD folder in image mode. The stage
also writes the histogram of the motion buckets it trained on; the pipeline carries `lvd_training.json`
(TRAINING_METADATA_FILE): what was exported (EMA with warm-up or raw weights), how far it moved from the initial
weights, the motion-bucket mapping, noise and frames; lineage.json and done.json repeat the movement.
With `decoder_steps`, decoder/ holds the decoder finetune's report (dataformat/decoder_finetune.py).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataformat import (
    RAY_RUN_NAME,
    TRAINING_METADATA_FILE,
    CheckpointLayout,
    StageLayout,
    atomic_write_json,
    ray_snapshot,
)
from infra.output_lock import acquire_output_lock
from training.monitor import plot_losses, plot_motion_buckets, read_metrics
from training.request import StageRunRequest
from training.stages import StagePreset

if TYPE_CHECKING:
    from training.data import DataCheck

logger = logging.getLogger(__name__)


@dataclass
class StageRunConfig:
    """Everything a worker needs; picklable so Ray can ship it."""

    preset: StagePreset
    shards: list[str]
    init: str
    log_dir: str
    seed: int = 0
    use_gpu: bool = False
    micro_batch_size: int = 1
    loader_workers: int = 0
    resume_from: str | None = None
    strategy: str = "ddp"  # or "fsdp" (FSDP2 fully_shard per U-Net block)
    image_encoder: str | None = None  # image mode from a text-to-video export: CLIP vision model (or SVD) folder
    sample_prompt: str = "a cyclist riding down a city street"
    lineage: dict[str, Any] = field(default_factory=dict)
    # the pre-Ray data check (training/data.py): the samples it kept (the workers read the shards by this index,
    # scanned once on the driver), and how many bad samples may be skipped
    samples: list = field(default_factory=list)  # dataformat.IndexedSample
    skip_policy: Any = None  # training.data.SkipPolicy


def group_steps(loader) -> Any:
    """Yield the list of micro-batches of each optimizer step, in order."""
    pending: list[dict[str, Any]] = []
    for batch in loader:
        if pending and batch["step"] != pending[0]["step"]:
            yield pending
            pending = []
        pending.append(batch)
    if pending:
        yield pending


def train_loop_per_worker(loop_config: dict[str, StageRunConfig]) -> None:
    """Ray Train worker: restore, train the stage's remaining steps, checkpoint, export (rank 0)."""
    import ray.train
    import torch

    from model.loading import load_initial_pipeline
    from training.data import TrainingStream, training_loader
    from training.monitor import TrainingMonitor
    from training.trainer import StageTrainer

    config = loop_config["run"]
    if StageLayout(config.log_dir).data_failure.exists():
        return  # a worker stopped the stage for bad data: a restart ends at once, the driver says why
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if config.use_gpu else torch.device("cpu")
    torch.manual_seed(config.seed)
    preset = config.preset
    image_encoder = config.image_encoder or ("tiny" if preset.preset == "tiny" else None)
    mode = "text" if preset.conditioning == "text" else "image"  # multiview finetunes the image-to-video path
    pipeline = load_initial_pipeline(config.init, config.seed, mode, image_encoder)
    pipeline.unet = with_elevation_id(pipeline.unet, preset)
    if preset.camera_embedding:
        from model.multiview import with_camera_embedding

        pipeline.unet = with_camera_embedding(pipeline.unet)
    trainer = StageTrainer(pipeline, preset, seed=config.seed, device=device,
                           rank=rank, world_size=world_size, micro_batch_size=config.micro_batch_size,
                           keep_ema=rank == 0, strategy=config.strategy)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load_state(Path(directory))
    elif config.resume_from:
        trainer.load_state(Path(config.resume_from))
    if rank == 0 and trainer.step:
        print(f"resuming stage {preset.stage} at step {trainer.step}", flush=True)

    monitor = TrainingMonitor(Path(config.log_dir), preset.total_steps, trainer.step, enabled=rank == 0)
    stream = TrainingStream(config.samples, preset, config.seed, rank, world_size,
                            config.micro_batch_size, start_step=trainer.step, skip_policy=config.skip_policy)
    steps = group_steps(training_loader(stream, config.loader_workers))
    for micro_batches in until_data_failure(steps, StageLayout(config.log_dir), device, world_size):
        metrics = trainer.train_step(micro_batches)
        step = metrics["step"]
        if step % preset.log_every == 0 or step == preset.total_steps:
            monitor.log(metrics)
        if step % preset.sample_every == 0 or step == preset.total_steps:
            _log_sample(trainer, monitor, config, micro_batches[0], step)  # every rank: FSDP gathers
        final = step == preset.total_steps
        if step % preset.checkpoint_every == 0 or final:  # a report is a barrier: only with checkpoints
            _report_checkpoint(trainer, monitor, config, metrics, final)
    monitor.close()


def until_data_failure(steps: Iterator[list[dict[str, Any]]], layout: StageLayout, device: Any,
                       world_size: int) -> Iterator[list[dict[str, Any]]]:
    """Each optimizer step's micro-batches until this rank's or another rank's stream stops for bad data
    (`BadTrainingData`: past max_bad_fraction). Then every rank returns instead of raising: Ray Train restarts the
    worker group after any worker error (FailureConfig's max_failures cannot tell bad input from a lost node), and
    a restart would meet the same samples. The ranks agree through one all-reduce of a flag per step, before the
    step's own collectives; the driver raises the one line the stream recorded (`data_failure.json`)."""
    import torch
    import torch.distributed as dist

    from training.data import BadTrainingData

    shared = world_size > 1 and dist.is_available() and dist.is_initialized()
    iterator = iter(steps)
    while True:
        micro_batches, stopped = None, False
        try:
            micro_batches = next(iterator)
        except StopIteration:
            return  # every rank has the same steps: all end here together
        except BadTrainingData as error:  # from a loader worker: the same type, its traceback in the message
            stopped = True
            if not layout.data_failure.exists():
                message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
                atomic_write_json(layout.data_failure, {"error": message})
        if shared:
            flag = torch.tensor([1.0 if stopped else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stopped = bool(flag.item())
        if stopped:
            return
        yield micro_batches


def _report_checkpoint(trainer, monitor, config: StageRunConfig, metrics: dict[str, Any], final: bool) -> None:
    import ray.train

    scalars = {k: v for k, v in metrics.items() if k != "phase"}
    trainer.gather_motion_buckets()  # collective: rank 0's checkpoint then holds every worker's count
    gathered = trainer.gather_state()  # collective under FSDP: every rank takes part
    if trainer.rank != 0:
        ray.train.report(scalars, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="lvd-ckpt-") as scratch:
        directory = Path(scratch)
        trainer.save_state(directory, {"lineage": config.lineage}, gathered)
        if final:
            _export_pipeline(trainer, gathered, CheckpointLayout(directory).pipeline)
            shutil.copy(monitor.metrics_path, CheckpointLayout(directory).metrics)
        write_file_manifest(directory)
        ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))


def _export_pipeline(trainer, gathered: dict[str, Any], target: Path) -> None:
    """Text mode: a TextToVideoPipeline folder; image mode: a diffusers SVD folder (temporal decoder); both with
    the training metadata (TRAINING_METADATA_FILE). A LoRA finetune's folder holds the merged U-Net, and the
    adapter alone in LORA_ADAPTER_DIR."""
    from dataformat.layout import LORA_ADAPTER_DIR
    from training.trainable import save_lora_adapter

    pipeline = _pipeline(trainer, trainer.export_unet(gathered))
    pipeline.save_pretrained(target, safe_serialization=True)
    atomic_write_json(target / TRAINING_METADATA_FILE, training_metadata(trainer.preset))
    adapter = trainer.lora_state(gathered)
    if adapter is not None:
        save_lora_adapter(adapter, trainer.preset.lora_rank, trainer.preset.lora_alpha, target / LORA_ADAPTER_DIR)


def training_metadata(preset: StagePreset) -> dict[str, Any]:
    """What an exported pipeline says about its training (the driver adds `weights_moved`)."""
    return {
        "stage": preset.stage, "preset": preset.preset, "conditioning": preset.conditioning,
        "export": "ema" if preset.export == "ema" and preset.ema_decay else "raw",
        "ema": {"decay": preset.ema_decay, "warmup": "min(decay, (1 + n) / (10 + n))"} if preset.ema_decay else None,
        "motion_buckets": preset.motion.to_dict(), "target_latents": preset.target_latents,
        "trainable": sorted({p.trainable for p in preset.phases}), "precision": preset.precision,
        "optimizer": preset.optimizer,
        **({"elevation_condition": preset.elevation_condition, "camera_embedding": preset.camera_embedding}
           if preset.conditioning == "multiview" else {}),
        "phases": [{"name": p.name, "frames": p.num_frames, "height": p.height, "width": p.width,
                    "p_mean": p.p_mean, "p_std": p.p_std, "steps": p.iterations} for p in preset.phases],
    }


def _pipeline(trainer, unet):
    if trainer.image_mode:
        from model.image_to_video import ImageToVideoPipeline

        return ImageToVideoPipeline(vae=trainer.vae, image_encoder=trainer.image_encoder, unet=unet,
                                    feature_extractor=trainer.feature_extractor, scheduler=_scheduler())
    from model.pipeline import TextToVideoPipeline

    return TextToVideoPipeline(unet=unet, vae=trainer.vae, text_encoder=trainer.text_encoder,
                               tokenizer=trainer.tokenizer, scheduler=_scheduler())


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    from model.pipeline import SVD_SCHEDULER_CONFIG

    return EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG)


def _log_sample(trainer, monitor, config: StageRunConfig, batch: dict[str, Any], step: int) -> None:
    """A short sample video with the current (EMA when kept) weights, at the phase's size, few steps."""
    import torch

    phase, _ = trainer.preset.phase_at(step - 1)
    unet = trainer.export_unet() if trainer.sharded or trainer.rank == 0 else None
    if trainer.rank != 0:
        return
    pipeline = _pipeline(trainer, unet)
    common = dict(num_frames=max(phase.num_frames, 1), height=phase.height, width=phase.width, num_inference_steps=8,
                  fps=int(batch["fps"][0]), motion_bucket_id=int(batch["motion_bucket"][0]),
                  generator=torch.Generator().manual_seed(config.seed), progress=False)
    trainer.unet.eval()
    try:
        if trainer.image_mode:  # animate the batch's first conditioning frame
            image = (batch["pixels"][:1, 0].float() + 1.0) / 2.0
            camera = {"camera": batch["camera"][:1]} if trainer.preset.camera_embedding else {}
            if trainer.elevation_id:
                camera["elevation"] = float(batch["elevation"][0])
            frames = pipeline(image, decode_chunk_size=max(phase.num_frames, 1), **camera, **common).frames[0]
        else:
            frames = pipeline(config.sample_prompt, guidance_scale=(1.0, 2.5), **common).frames[0]
    finally:
        trainer.unet.train()
    monitor.log_video(frames, step)


# --- driver -----------------------------------------------------------------------------------------


def write_file_manifest(directory: Path) -> None:
    """Record every file of a checkpoint with its size, written last: Ray copies a reported checkpoint into
    storage file by file, so a kill mid-copy leaves state.json beside a half-written unet.safetensors."""
    sizes = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
    CheckpointLayout(directory).file_manifest.write_text(json.dumps(sizes, indent=1))


def checkpoint_is_complete(directory: Path) -> bool:
    """True when the checkpoint's manifest exists and every file it lists is there at its full size."""
    try:
        sizes = json.loads(CheckpointLayout(directory).file_manifest.read_text())
        return all((directory / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def complete_checkpoints(storage: Path) -> dict[Path, int]:
    """Each complete Ray Train checkpoint under `storage` with its step; one torn by a kill (mid-copy, or
    its state.json unreadable) is left out."""
    found = {}
    for checkpoint in CheckpointLayout.all_in(storage):
        if not checkpoint.state.exists():
            continue
        if not checkpoint_is_complete(checkpoint.root):
            logger.warning("skipping incomplete checkpoint %s (torn by a kill during its copy)", checkpoint.root)
            continue
        try:
            found[checkpoint.root] = int(json.loads(checkpoint.state.read_text())["step"])
        except (OSError, ValueError, KeyError):
            continue
    return found


def latest_checkpoint(storage: Path) -> Path | None:
    """The complete checkpoint with the highest step (survives a killed driver; a checkpoint torn by the
    kill is skipped and the one before it used)."""
    checkpoints = complete_checkpoints(storage)
    return max(checkpoints, key=checkpoints.__getitem__) if checkpoints else None


def drop_stale_ray_snapshot(storage: Path) -> Path | None:
    """Set Ray Train's checkpoint snapshot aside when it names checkpoints that are gone (a kill during
    checkpoint rotation, a checkpoint deleted by hand): Ray refuses to start on it, while our resume point
    comes from `latest_checkpoint`. Returns where the stale snapshot went."""
    snapshot = ray_snapshot(storage)
    try:
        names = {r.get("checkpoint_dir_name") for r in json.loads(snapshot.read_text())["checkpoint_results"]}
        if all(name and (snapshot.parent / name).is_dir() for name in names):
            return None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # a torn snapshot is as stale as one naming missing checkpoints
    stale = snapshot.with_suffix(".stale.json")
    os.replace(snapshot, stale)
    logger.warning("Ray Train's checkpoint snapshot %s names missing checkpoints; set aside as %s", snapshot, stale)
    return stale


def run_stage(request: StageRunRequest, on_progress: Callable[[dict[str, Any]], None] | None = None
              ) -> dict[str, Any]:
    """Train one stage to completion (or skip it when done.json says it already finished).

    `conditioning="image"` trains image-to-video (from `init`: an SVD folder, or a text-to-video export turned
    into one with `image_encoder`); `decoder_steps` then finetunes the export's temporal VAE decoder.
    One writer per output root: raises OutputLocked (one line) while another live process trains into it."""
    acquire_output_lock(request.output_root)
    stage_preset, shards, init = request.resolve()
    if request.checkpoint_every is not None:
        stage_preset = replace(stage_preset, checkpoint_every=request.checkpoint_every)
    stage, preset, resume, seed = request.stage, request.preset, request.resume, request.seed
    data, num_workers = request.data, request.num_workers
    max_steps, strategy, use_gpu = request.max_steps, request.strategy, request.use_gpu
    conditioning, image_encoder, decoder_steps = request.conditioning, request.image_encoder, request.decoder_steps
    layout = StageLayout(request.directory)
    directory, done = layout.root, layout.done
    for leftover in layout.export_leftovers():  # safe: this process holds the root's writer lock
        shutil.rmtree(leftover, ignore_errors=True)
    if resume and done.exists():
        return {**json.loads(done.read_text()), "skipped": True}
    from training.data import check_stage_data

    # before Ray: one line if too bad; the request's check already scanned the shards in this process (kept for us)
    data_check = check_stage_data(stage_preset, shards, request.max_bad_fraction, keep=False)
    if not resume and directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.bad_samples, data_check.to_dict())
    layout.data_failure.unlink(missing_ok=True)
    stage_preset = calibrate_motion_buckets(stage_preset, data_check.samples, seed, request.motion_reference_samples)
    lineage = {"stage": stage, "preset": preset, "init": init, "data": str(Path(data).resolve()), "shards": shards,
               "seed": seed, "num_workers": num_workers, "max_steps": max_steps, "strategy": strategy,
               "conditioning": conditioning, "image_encoder": image_encoder, "decoder_steps": decoder_steps,
               "stage_preset": stage_preset.to_dict()}
    parent = StageLayout(Path(init).parent)  # stage N starts from stage N-1's pipeline/
    if stage > 1 and parent.lineage.exists():
        lineage["parent"] = json.loads(parent.lineage.read_text())
    atomic_write_json(layout.lineage, lineage, indent=None)

    from training.data import SkipPolicy

    config = StageRunConfig(
        preset=stage_preset, shards=shards, init=init, log_dir=str(directory), seed=seed, use_gpu=use_gpu,
        micro_batch_size=request.micro_batch_size or max(p.batch_size for p in stage_preset.phases),
        loader_workers=request.loader_workers, lineage=lineage, strategy=strategy, image_encoder=image_encoder,
        samples=data_check.samples,
        skip_policy=SkipPolicy(request.max_bad_fraction, data_check.bad_count, data_check.total, str(directory),
                               data_check.bad),
    )
    storage = layout.ray
    resumed_from = latest_checkpoint(storage) if resume else None
    drop_stale_ray_snapshot(storage)
    config.resume_from = str(resumed_from) if resumed_from else None
    workers = (request.min_workers, num_workers) if request.min_workers not in (None, num_workers) else num_workers
    try:
        result = _fit(config, workers, use_gpu, storage, request.ray_address, request.max_failures, on_progress)
    except Exception:
        raise_data_failure(layout)  # a bad-data stop that still came as a worker error: its one line
        raise
    raise_data_failure(layout)  # the workers stopped together for bad data (no restart): the recorded line

    final = Path(tempfile.mkdtemp(prefix=StageLayout.EXPORT_STAGING_PREFIX, dir=directory))
    try:
        result.checkpoint.to_directory(str(final))
        last = CheckpointLayout(final)
        if not (last.pipeline / "model_index.json").exists():
            raise RuntimeError("the last checkpoint has no exported pipeline")
        if layout.pipeline.exists():
            shutil.rmtree(layout.pipeline)
        os.replace(last.pipeline, layout.pipeline)
        metrics = read_metrics(last.metrics)
        moved = weights_moved(config, final)
        buckets = json.loads(last.state.read_text()).get("motion_buckets_seen") or []
    finally:
        shutil.rmtree(final, ignore_errors=True)
    plot_losses(metrics, layout.loss_plot)
    plot_motion_buckets(buckets, stage_preset.motion.mapping, layout.motion_bucket_plot)
    metadata_path = layout.pipeline / TRAINING_METADATA_FILE
    atomic_write_json(metadata_path, {**json.loads(metadata_path.read_text()), "weights_moved": moved})
    atomic_write_json(layout.lineage, {**lineage, "weights_moved": moved}, indent=None)
    decoder = _finetune_decoder(request, layout.pipeline, shards, stage_preset)
    summary = {
        "stage": stage, "preset": preset, "output_dir": str(directory), "pipeline": str(layout.pipeline),
        "step": stage_preset.total_steps, "resumed_from_step": _step_of(resumed_from),
        "losses": {"first": metrics[0]["loss"], "last": metrics[-1]["loss"]} if metrics else {},
        "tensorboard": str(layout.tensorboard), "loss_plot": str(layout.loss_plot),
        "samples": sorted(str(p) for p in layout.samples.glob("*.gif")), "init": init,
        "conditioning": conditioning, "weights_moved": moved, "motion_buckets": stage_preset.motion.mapping,
        "motion_bucket_plot": str(layout.motion_bucket_plot),
        "motion_buckets_trained": {str(bucket): count for bucket, count in enumerate(buckets) if count},
        **({"decoder_finetune": decoder} if decoder else {}),
        "bad_samples": bad_sample_report(data_check, layout),
    }
    atomic_write_json(done, summary, indent=None)
    return {**summary, "skipped": False}


def _finetune_decoder(request: StageRunRequest, pipeline: Path, shards: list[str], preset: StagePreset
                      ) -> dict[str, Any] | None:
    """The optional temporal-decoder finetune of an image-to-video export, at the stage's last phase's size."""
    if not request.decoder_steps:
        return None
    import torch

    from training.decoder import DecoderFinetuneConfig, finetune_decoder

    last = preset.phases[-1]
    config = DecoderFinetuneConfig(steps=request.decoder_steps, height=last.height, width=last.width,
                                   num_frames=request.decoder.num_frames or last.num_frames, seed=request.seed,
                                   settings=request.decoder)
    device = "cuda" if request.use_gpu and torch.cuda.is_available() else "cpu"
    return finetune_decoder(pipeline, shards, config, device=device)



def raise_data_failure(layout: StageLayout) -> None:
    """Raise the one-line `BadTrainingData` a worker recorded, if one did."""
    from training.data import BadTrainingData

    try:
        message = json.loads(layout.data_failure.read_text())["error"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    raise BadTrainingData(message) from None


def bad_sample_report(data_check: DataCheck, layout: StageLayout) -> dict[str, Any]:
    """The stage report's count of bad samples: left out before Ray, and skipped in training (merged over the
    workers' records, one entry per shard and key)."""
    skipped: dict[tuple[str, str], dict[str, Any]] = {}
    for record in sorted(layout.skipped_samples.glob("*.json")):
        try:
            entries = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        for entry in entries:
            skipped.setdefault((entry["shard"], entry["key"]), entry)
    in_training = [skipped[key] for key in sorted(skipped)]
    return {"total": data_check.total, "max_bad_fraction": data_check.max_bad_fraction,
            "before_training": data_check.bad_count, "skipped_in_training": len(in_training),
            "samples": [b.to_dict() for b in data_check.bad] + in_training}


def calibrate_motion_buckets(preset: StagePreset, samples: list, seed: int, count: int) -> StagePreset:
    """A `percentile` mapping gets its reference: the motions of the stream's first `samples` training samples,
    measured as training reads them (deterministic, so a resumed run measures the same)."""
    if preset.motion.calibrated:
        return preset
    from training.data import reference_motions

    reference = reference_motions(samples, preset, seed, count)
    return replace(preset, motion=replace(preset.motion, reference=reference))


def with_elevation_id(unet, preset: StagePreset):
    """The U-Net a multi-view stage trains the paper's way: SVD-MV's fourth added-time id, the elevation
    (`add_embedding` 768 -> 1024 inputs, the new ones zero; model/multiview.py); any other stage's as it is."""
    if preset.conditioning != "multiview" or preset.elevation_condition != "paper":
        return unet
    from model.multiview import with_elevation_condition

    return with_elevation_condition(unet)


def weights_moved(config: StageRunConfig, checkpoint: Path) -> dict[str, Any]:
    """How far the export moved from the initial weights, ||w - w0|| / ||w0|| over the parameters the stage
    trains, for the exported weights and (when the export is the EMA) for the raw ones beside it. The initial
    weights are rebuilt the way the workers start (`load_initial_pipeline`), in this process, on the CPU."""
    import torch
    from safetensors import safe_open

    from model.loading import load_initial_pipeline
    from training.trainer import relative_change, trainable_names

    preset = config.preset
    image_encoder = config.image_encoder or ("tiny" if preset.preset == "tiny" else None)
    with torch.no_grad():
        unet = with_elevation_id(load_initial_pipeline(config.init, config.seed, preset.conditioning,
                                                       image_encoder).unet, preset)
        initial = {name: parameter.detach() for name, parameter in unet.named_parameters()}
    names = sorted(set().union(*(trainable_names(list(initial), phase) for phase in preset.phases)))

    def moved(file: Path) -> float:
        with safe_open(str(file), framework="pt") as weights:
            return relative_change(initial, {n: weights.get_tensor(n) for n in names}, names)

    files = CheckpointLayout(checkpoint)
    raw = moved(files.unet)
    has_ema = files.ema.is_file()
    result = {"export": "ema" if has_ema else "raw", "trained_parameters": sum(initial[n].numel() for n in names),
              "raw": raw}
    if has_ema:
        result["ema"] = moved(files.ema)
    result["exported"] = result["ema"] if has_ema else raw
    return result


def _step_of(checkpoint: Path | None) -> int:
    return json.loads(CheckpointLayout(checkpoint).state.read_text())["step"] if checkpoint else 0


def _fit(config: StageRunConfig, num_workers: int | tuple[int, int], use_gpu: bool, storage: Path,
         ray_address: str | None, max_failures: int, on_progress: Callable[[dict[str, Any]], None] | None):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from infra.local import ray_init_kwargs

    if not ray.is_initialized():
        ray.init(**ray_init_kwargs(ray_address))
    trainer_class = TorchTrainer if ray_address else _own_ray_trainer_class()
    trainer = trainer_class(
        train_loop_per_worker,
        train_loop_config={"run": config},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": 1}),
        run_config=RunConfig(name=RAY_RUN_NAME, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    with follow_progress(StageLayout(config.log_dir).progress, on_progress):
        return trainer.fit()


def _own_ray_trainer_class() -> type:
    """TorchTrainer without Ray Train's PlacementGroupCleaner, for a run on this machine's own Ray.

    The cleaner is a detached actor that asks Ray's state API every second whether the training controller
    lives, to remove the workers' placement group should the controller die while the cluster lives on. A Ray
    of this process (`ray_init_kwargs()`, no dashboard) has no HTTP API server to ask: the cleaner then logs a
    warning every second, and with another Ray on the machine (a `ray start` cluster, another run) it cannot
    even tell which Ray is its own and its thread dies with a 30-line traceback in the run's output. Nor is
    there anything for it to do: this Ray, placement groups included, goes away with the driver.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class OwnRayTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            return [callback for callback in super()._create_default_callbacks()
                    if not isinstance(callback, PlacementGroupCleanerCallback)]

    return OwnRayTorchTrainer


@contextmanager
def follow_progress(path: Path, callback: Callable[[dict[str, Any]], None] | None, interval_s: float = 1.0):
    """Call `callback` with the workers' progress file each time its step changes, until the block ends.

    The polling thread runs in a copy of the caller's context: Prefect keeps the API address and the run
    in context variables, which a bare thread would not see (it would start a temporary server of its
    own and update the progress artifact there). A last poll after the block reports the final step.
    """
    if callback is None:
        yield
        return
    stop = threading.Event()

    def poll() -> None:
        last = None
        while not stop.wait(interval_s):
            last = _poll_once(path, callback, last)

    poller = threading.Thread(target=contextvars.copy_context().run, args=(poll,), daemon=True)
    poller.start()
    try:
        yield
    finally:
        stop.set()
        poller.join(timeout=5)
        _poll_once(path, callback, None)


def _poll_once(path: Path, callback: Callable[[dict[str, Any]], None], last: int | None) -> int | None:
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError):
        return last
    if progress["step"] != last:
        callback(progress)
    return progress["step"]
