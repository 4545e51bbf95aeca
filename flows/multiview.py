"""Flow `evaluate-views` and `lvd evaluate-views`: multi-view metrics of a checkpoint on held-out meshes. Orchestration
only; the work is in evaluation/views.py.

validate (checkpoint, meshes, weights) -> `evaluate-views` task (ground-truth renders, generation from view 0,
PSNR / SSIM / LPIPS / CLIP-S) -> markdown artifact: the means, the per-view table and, per asset, the generated
views over the ground-truth views as one inline strip.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from common.requests import flat_parameters
from evaluation.views import METRICS, EvaluateViewsRequest, evaluate_views, json_ready
from flows.cli import add_request_command
from flows.markdown import inline_image


@task(name="validate-views")
def validate_task(request: EvaluateViewsRequest) -> int:
    return len(request.check_inputs())


@task(name="evaluate-views", retries=1)
def evaluate_task(request: EvaluateViewsRequest) -> dict[str, Any]:
    return evaluate_views(request)


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def report_markdown(results: dict[str, Any]) -> str:
    lines = ["# evaluate-views", "", f"checkpoint: `{results['checkpoint']}`, {results['measured']} of "
             f"{results['assets']} assets measured", "", "| | " + " | ".join(METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for label, key in (("mean, all views", "mean"), ("mean, novel views", "mean_novel_views")):
        lines.append(f"| {label} | " + " | ".join(_number(results[key][m]) for m in METRICS) + " |")
    lines += ["", "| view | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for view in range(len(results["per_view"]["psnr"])):
        lines.append(f"| {view} | " + " | ".join(_number(results["per_view"][m][view]) for m in METRICS) + " |")
    if results["not_measured"]:
        lines += ["", f"not measured (no weights given): {', '.join(results['not_measured'])}"]
    for asset in results["per_asset"]:
        if "error" in asset:
            lines += ["", f"**{asset['asset']}**: {asset['error']}"]
        else:
            lines += ["", f"**{asset['asset']}** (top: generated, bottom: ground truth)", "",
                      inline_image(asset["strip"], asset["asset"])]
    return "\n".join(lines) + "\n"


@flow(name="evaluate-views", log_prints=True)
@flat_parameters(EvaluateViewsRequest)
def evaluate_views_flow(request: EvaluateViewsRequest) -> dict[str, Any]:
    """Multi-view metrics (PSNR, SSIM, LPIPS, CLIP-S) of a checkpoint against ground-truth orbits of meshes."""
    request = request.with_overrides(out=str(Path(request.out).resolve()))
    assets = validate_task(request)
    get_run_logger().info("%d held-out assets under %s", assets, request.meshes)
    results = evaluate_task(request)
    create_markdown_artifact(report_markdown(results), key="evaluate-views", description="multi-view metrics")
    return results


def deployments() -> list:
    return [evaluate_views_flow.to_deployment(name="local", description="Multi-view metrics on held-out meshes.")]


def _run(request: EvaluateViewsRequest) -> int:
    results = evaluate_views_flow(**request.to_dict())
    print(json.dumps(json_ready({"out": request.out, "measured": results["measured"], "mean": results["mean"]})))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    add_request_command(subparsers, "evaluate-views", EvaluateViewsRequest, _run,
                        help="multi-view metrics (PSNR, SSIM, LPIPS, CLIP-S) of a checkpoint against ground-truth "
                             "orbits of held-out meshes")
