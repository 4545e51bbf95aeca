"""Flow `train-stage` and `lvd train --stage N`: one SVD training stage on Ray Train. Orchestration only.

validate (fail fast: stage, preset, shards, previous stage) -> `run-stage` task (TorchTrainer on local Ray
or `ray_address`; Prefect progress artifact follows the workers' progress file) -> report artifact
(markdown table of the run, loss plot and last sample GIF inline). The training itself is training/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from flows.markdown import inline_image
from training.loop import run_stage, validate_stage
from training.stages import STAGE_PRESETS


@task(name="validate-stage")
def validate_task(stage: int, preset: str, data: str, output_root: str, init: str | None, num_workers: int,
                  max_steps: int | None, strategy: str, conditioning: str = "text", image_encoder: str | None = None,
                  decoder_steps: int = 0) -> dict[str, Any]:
    stage_preset, shards, resolved_init = validate_stage(stage, preset, data, output_root, init, num_workers,
                                                         max_steps, strategy, conditioning, image_encoder,
                                                         decoder_steps)
    return {"shards": len(shards), "init": resolved_init, "steps": stage_preset.total_steps,
            "phases": [phase.name for phase in stage_preset.phases]}


@task(name="run-stage", retries=1, retry_delay_seconds=5, task_run_name="train stage {stage}")
def run_stage_task(stage: int, settings: dict[str, Any]) -> dict[str, Any]:
    progress_id = create_progress_artifact(0.0, key=f"train-stage-{stage}-progress",
                                           description=f"stage {stage} optimizer steps")

    def on_progress(progress: dict[str, Any]) -> None:
        update_progress_artifact(progress_id, 100.0 * progress["step"] / max(progress["total"], 1))

    return run_stage(stage, on_progress=on_progress, **settings)


def report_markdown(result: dict[str, Any], settings: dict[str, Any]) -> str:
    lines = [f"# train-stage {result['stage']} ({result['preset']})", "",
             "| | |", "|---|---|",
             f"| pipeline | `{result['pipeline']}` |", f"| initialised from | `{result['init']}` |",
             f"| optimizer steps | {result['step']} (resumed from {result.get('resumed_from_step', 0)}) |",
             f"| loss first -> last | {result['losses'].get('first', float('nan')):.4f} -> "
             f"{result['losses'].get('last', float('nan')):.4f} |",
             f"| TensorBoard | `tensorboard --logdir {result['tensorboard']}` |",
             f"| skipped (already done) | {result['skipped']} |"]
    lines += [f"| {key} | {value} |" for key, value in sorted(settings.items()) if key not in ("data",)]
    lines.append(f"| data | `{settings['data']}` |")
    for title, path in (("loss", result.get("loss_plot")), ("last sample", (result.get("samples") or [None])[-1])):
        if path and Path(path).exists():
            lines += ["", f"**{title}**", "", inline_image(path, title)]
    return "\n".join(lines) + "\n"


@flow(name="train-stage", log_prints=True)
def train_stage(
    stage: int = 1,
    preset: str = "tiny",
    data: str = "out/curate",
    output_root: str = "out/train",
    num_workers: int = 1,
    use_gpu: bool = False,
    resume: bool = True,
    init: str | None = None,
    max_steps: int | None = None,
    ray_address: str | None = None,
    seed: int = 0,
    micro_batch_size: int | None = None,
    strategy: str = "ddp",
    checkpoint_every: int | None = None,
    conditioning: str = "text",
    image_encoder: str | None = None,
    decoder_steps: int = 0,
) -> dict[str, Any]:
    """Train SVD stage `stage` (1 images, 2 low-res video, 3 high-res finetune) with Ray Train.

    Args:
        stage: 1, 2 or 3 (docs/recipe.md §4); stage N starts from `output_root/stage{N-1}/pipeline` unless `init`.
        preset: `tiny` (CPU, minutes) or `svd` (the paper's sizes, GPUs).
        data: a curate-lvd output directory (its shards/) or a folder of WebDataset .tar shards.
        output_root: stage N writes `output_root/stageN/` (pipeline/, tensorboard/, checkpoints under ray/).
        num_workers / use_gpu: Ray Train workers (gloo on CPU, NCCL on GPU).
        resume: continue from the newest checkpoint; a finished stage is skipped. False starts over.
        init: override the initialisation (pipeline dir, SD 2.x checkpoint path/hub id, or 'tiny').
        max_steps: cut the stage to this many optimizer steps (every phase keeps at least one).
        ray_address: e.g. "ray://head:10001"; default: a local Ray.
        micro_batch_size: per-worker micro-batch (gradient accumulation makes up the global batch).
        strategy: "ddp" (replicated weights) or "fsdp" (FSDP2: weights, grads and optimizer state sharded).
        checkpoint_every: optimizer steps between checkpoints (default: the stage preset's).
        conditioning: "text" (text-to-video) or "image" (image-to-video, stages 2-3: finetunes `init`, a
            diffusers SVD folder, or the text-to-video export; writes `output_root/stageN-image/`).
        image_encoder: image mode from a text-to-video export: an SVD or CLIP vision folder ('tiny' preset: random).
        decoder_steps: image mode: then finetune the export's temporal VAE decoder for this many steps.
    """
    settings = dict(preset=preset, data=str(Path(data).resolve()), output_root=str(Path(output_root).resolve()),
                    num_workers=num_workers, use_gpu=use_gpu, resume=resume, init=init, max_steps=max_steps,
                    ray_address=ray_address, seed=seed, micro_batch_size=micro_batch_size, strategy=strategy,
                    checkpoint_every=checkpoint_every, conditioning=conditioning, image_encoder=image_encoder,
                    decoder_steps=decoder_steps)
    plan = validate_task(stage, preset, settings["data"], settings["output_root"], init, num_workers, max_steps,
                         strategy, conditioning, image_encoder, decoder_steps)
    logger = get_run_logger()
    logger.info("stage %d (%s): %d steps in phases %s from %s, %d shard(s)", stage, preset, plan["steps"],
                plan["phases"], plan["init"], plan["shards"])
    result = run_stage_task(stage, settings)
    create_markdown_artifact(report_markdown(result, settings), key=f"train-stage-{stage}-report",
                             description=f"train-stage {stage}")
    logger.info("stage %d %s: pipeline %s", stage, "skipped (done)" if result["skipped"] else "finished",
                result["pipeline"])
    return result


def deployments() -> list:
    return [train_stage.to_deployment(name="local", description="One SVD training stage on Ray Train "
                                      "(tiny preset by default; --param stage=1|2|3).")]


def _run(args: argparse.Namespace) -> int:
    result = train_stage(stage=args.stage, preset=args.preset, data=args.data, output_root=args.output_root,
                         num_workers=args.num_workers, use_gpu=args.use_gpu, resume=not args.restart,
                         init=args.init, max_steps=args.max_steps, ray_address=args.ray_address, seed=args.seed,
                         micro_batch_size=args.micro_batch_size, strategy=args.strategy,
                         checkpoint_every=args.checkpoint_every, conditioning=args.conditioning,
                         image_encoder=args.image_encoder, decoder_steps=args.decoder_steps)
    print(json.dumps(result))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="run one training stage (train-stage flow)")
    parser.add_argument("--stage", type=int, required=True, choices=(1, 2, 3))
    parser.add_argument("--preset", default="tiny", choices=sorted(STAGE_PRESETS))
    parser.add_argument("--data", default="out/curate", help="curate-lvd output dir or folder of .tar shards")
    parser.add_argument("--output-root", default="out/train")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--restart", action="store_true", help="ignore checkpoints and start the stage over")
    parser.add_argument("--init", default=None, help="pipeline dir, SD 2.x checkpoint, or 'tiny'")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp"))
    parser.add_argument("--conditioning", default="text", choices=("text", "image"),
                        help="image: image-to-video finetune (of --init SVD_DIR, or of the text-to-video export)")
    parser.add_argument("--image-encoder", default=None, help="image mode from a text export: SVD or CLIP folder")
    parser.add_argument("--decoder-steps", type=int, default=0, help="image mode: temporal VAE decoder finetune")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    parser.set_defaults(func=_run)
