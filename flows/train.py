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

from common.requests import RequestError, flat_parameters
from flows.cli import add_request_command
from flows.markdown import inline_image
from training.loop import run_stage
from training.memory_plan import plan_stage
from training.request import StageRunRequest


@task(name="validate-stage")
def validate_task(request: StageRunRequest) -> dict[str, Any]:
    return request.check_inputs()


@task(name="plan-stage")
def plan_task(request: StageRunRequest) -> dict[str, Any]:
    return plan_stage(request)


def retry_machine_faults(task, task_run, state) -> bool:
    """Retry a stage that failed on a machine fault; bad input (too many bad samples, a refused checkpoint) is the
    input's fault and fails the same way again, so it is not retried."""
    error = state.result(raise_on_failure=False)
    return not isinstance(error, RequestError)


@task(name="run-stage", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_machine_faults,
      task_run_name="train stage {request.stage}")
def run_stage_task(request: StageRunRequest) -> dict[str, Any]:
    progress_id = create_progress_artifact(0.0, key=f"train-stage-{request.stage}-progress",
                                           description=f"stage {request.stage} optimizer steps")

    def on_progress(progress: dict[str, Any]) -> None:
        try:
            update_progress_artifact(progress_id, 100.0 * progress["step"] / max(progress["total"], 1))
        except Exception as error:  # noqa: BLE001 - a progress bar the server did not take must not fail the
            # stage: the task's retry would start the run again from its last checkpoint
            get_run_logger().warning("progress artifact not updated: %s", error)

    return run_stage(request, on_progress=on_progress)


def report_markdown(result: dict[str, Any], settings: dict[str, Any]) -> str:
    lines = [f"# train-stage {result['stage']} ({result['preset']})", "",
             "| | |", "|---|---|",
             f"| pipeline | `{result['pipeline']}` |", f"| initialised from | `{result['init']}` |",
             f"| optimizer steps | {result['step']} (resumed from {result.get('resumed_from_step', 0)}) |",
             f"| loss first -> last | {result['losses'].get('first', float('nan')):.4f} -> "
             f"{result['losses'].get('last', float('nan')):.4f} |",
             f"| TensorBoard | `tensorboard --logdir {result['tensorboard']}` |",
             *moved_rows(result.get("weights_moved")),
             f"| skipped (already done) | {result['skipped']} |"]
    lines += [f"| {key} | {value} |" for key, value in sorted(settings.items()) if key not in ("data",)]
    lines.append(f"| data | `{settings['data']}` |")
    plots = (("loss", result.get("loss_plot")), ("motion buckets trained on", result.get("motion_bucket_plot")),
             ("last sample", (result.get("samples") or [None])[-1]))
    for title, path in plots:
        if path and Path(path).exists():
            lines += ["", f"**{title}**", "", inline_image(path, title)]
    if result.get("decoder_finetune"):
        lines += decoder_report(result["decoder_finetune"])
    return "\n".join(lines) + "\n"


def moved_rows(moved: dict[str, Any] | None) -> list[str]:
    """The export and how far it moved from the initial weights (relative L2 over the trained parameters)."""
    if not moved:
        return []
    rows = [f"| exported weights | {moved['export']}: moved {100 * moved['exported']:.3g} % from the initial "
            f"weights (||w - w0|| / ||w0|| over {moved['trained_parameters']:,} trained parameters) |"]
    if moved["export"] == "ema":
        rows.append(f"| raw weights (not exported) | moved {100 * moved['raw']:.3g} % |")
    return rows


def decoder_report(summary: dict[str, Any]) -> list[str]:
    """The temporal decoder finetune's part of the report: its losses, the probe clip's errors before and after,
    and the probe clip's frames (input, reconstruction before, after) with the loss plot."""
    probe = summary.get("probe", {})
    lines = ["", "## temporal decoder finetune", "", "| | |", "|---|---|",
             f"| steps (with discriminator) | {summary['steps']} ({summary.get('discriminator_steps', 0)}) |",
             f"| loss first -> last | {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} |"]
    for term in ("l1", "temporal_l1", "lpips"):
        if f"{term}_before" in probe:
            lines.append(f"| probe clip {term} before -> after | {probe[f'{term}_before']:.4f} -> "
                         f"{probe[f'{term}_after']:.4f} |")
    for title, key in (("probe clip: input / before / after", "reconstructions"), ("decoder losses", "loss_plot")):
        path = summary.get(key)
        if path and Path(path).exists():
            lines += ["", f"**{title}**", "", inline_image(path, title)]
    return lines


@flow(name="train-stage", log_prints=True)
@flat_parameters(StageRunRequest)
def train_stage(request: StageRunRequest) -> dict[str, Any]:
    """Train SVD stage `stage` (1 images, 2 low-res video, 3 high-res finetune) with Ray Train."""
    request = request.with_overrides(data=str(Path(request.data).resolve()),
                                     output_root=str(Path(request.output_root).resolve()))
    if request.plan:  # the resolved stage and its predicted GPU memory, no training
        memory_plan = plan_task(request)
        create_markdown_artifact(f"```\n{memory_plan['text']}\n```\n", key=f"train-stage-{request.stage}-plan",
                                 description=f"train-stage {request.stage}: plan and predicted GPU memory")
        return memory_plan
    plan = validate_task(request)
    logger = get_run_logger()
    logger.info("stage %d (%s): %d steps in phases %s from %s, %d shard(s)", request.stage, request.preset,
                plan["steps"], plan["phases"], plan["init"], plan["shards"])
    result = run_stage_task(request)
    settings = {key: value for key, value in request.to_dict().items() if key != "stage"}
    create_markdown_artifact(report_markdown(result, settings), key=f"train-stage-{request.stage}-report",
                             description=f"train-stage {request.stage}")
    logger.info("stage %d %s: pipeline %s", request.stage, "skipped (done)" if result["skipped"] else "finished",
                result["pipeline"])
    return result


def deployments() -> list:
    return [train_stage.to_deployment(name="local", description="One SVD training stage on Ray Train "
                                      "(tiny preset by default; --param stage=1|2|3).")]


def _run(request: StageRunRequest) -> int:
    if request.plan:  # no Prefect server for a printout: the same library call the flow's plan task makes
        print(plan_stage(request)["text"])
        return 0
    print(json.dumps(train_stage(**request.to_dict())))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    add_request_command(subparsers, "train", StageRunRequest, _run, settings="",
                        help="run one training stage (train-stage flow)")
