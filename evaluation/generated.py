"""The generated side of a zero-shot UCF-101 run, in resumable shards, and what is computed from them.

Each shard task generates a slice of the protocol's videos, saves their MP4s and writes one shard file with
the I3D features (and CLIPSIM) of the in-memory frames, so a re-run with the same settings skips finished
shards. Paths and the shard file's arrays are the evaluation layout of dataformat (`EvaluationLayout`,
`FvdShard`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.requests import Request, RequestError, setting
from common.video import save_video
from dataformat.evaluation import EvaluationLayout, FvdShard
from evaluation.fvd import distances
from evaluation.ucf101 import (
    CLASS_NAMES,
    ProtocolSettings,
    counts_from_root,
    generate_videos,
    protocol_videos,
    sample_grid,
)
from model.loading import DTYPES


@dataclass(frozen=True)
class FvdRequest(Request):
    """One zero-shot UCF-101 FVD run of a checkpoint: the one spelling shared by the `evaluate-fvd` flow,
    `lvd evaluate-fvd` and the pipeline's evaluate step. Defaults are the paper's protocol (docs/recipe.md §5)."""

    # "input": checked by `check_inputs` (the CLI, before the run) and where the run reads it, so the pipeline can
    # name the folder its own export fills before the export has run.
    real_dir: str = setting(path="input", positional=True, help="folder with the real UCF-101 videos (any videos)")
    checkpoint: str | None = setting(None, path="input", help="pipeline directory (default: tiny random preset)")
    output_dir: str = setting("out/evaluate-fvd", flag="--out", path="output",
                              help="videos/, shards/, results.json, sample grid")
    num_videos: int = setting(13_320, min=2, help="generated videos, in UCF-101's class distribution")
    batch_size: int = setting(4, min=1, help="videos per model call (and per I3D batch)")
    seed: int = setting(0, help="seed of the first video (video i uses seed + i)")
    steps: int = setting(25, min=1, help="sampling steps")
    guidance_scale: float = setting(7.0, help="classifier-free guidance w")
    num_frames: int = setting(16, min=1, help="frames per video (I3D needs at least 9)")
    fps: int = setting(25, min=1, help="frame rate conditioning and of the written videos")
    height: int = setting(320, min=8, help="generated height (resized and centre-cropped to 240x320 for I3D)")
    width: int = setting(576, min=8, help="generated width")
    shard_size: int = setting(64, min=1, help="videos per resumable shard task")
    num_real: int | None = setting(None, min=2, help="use only the first N real videos (default: all)")
    dtype: str = setting("float32", help=f"weights dtype ({', '.join(DTYPES)})")
    clip_model: str | None = setting(None, help="open_clip model name or local-dir:/folder (CLIPSIM)")
    clip_pretrained: str | None = setting(None, help="local CLIP weights file")
    i3d_weights: str | None = setting(None, help="I3D safetensors (default: cache, see lvd i3d-weights)")

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise RequestError(f"setting dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        try:
            self.protocol().validate()
        except ValueError as error:
            raise RequestError(str(error)) from None

    def check_inputs(self) -> None:
        if "://" not in self.real_dir and not Path(self.real_dir).expanduser().is_dir():
            raise RequestError(f"real_dir: no such directory: {self.real_dir}")

    def protocol(self) -> ProtocolSettings:
        """The generation protocol (what keys the generated shards)."""
        return ProtocolSettings(num_videos=self.num_videos, num_frames=self.num_frames, fps=self.fps,
                                guidance_scale=self.guidance_scale, height=self.height, width=self.width,
                                steps=self.steps, seed=self.seed)


def settings_key(protocol: ProtocolSettings, checkpoint: str | None) -> str:
    """Identifies a generated set: shards from other settings are never mixed in."""
    text = json.dumps({"settings": protocol.as_dict(), "checkpoint": checkpoint}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_finished(shard: str | Path, key: str) -> bool:
    """Whether `shard` exists and was generated with the settings `key` names."""
    return FvdShard.settings_key_of(shard) == key


def generate_shard(pipe, extractor, clipsim, protocol: ProtocolSettings, start: int, stop: int,
                   output_dir: str | Path, key: str, batch_size: int) -> Path:
    """Generate protocol videos [start, stop) with `pipe`, save their MP4s, score them with the I3D
    `extractor` (and `clipsim` when not None) and write the shard file; returns its path."""
    layout = EvaluationLayout(output_dir)
    videos = protocol_videos(protocol.num_videos, protocol.seed)[start:stop]
    features, similarity, preview = [], [], {}
    for offset in range(0, len(videos), batch_size):
        batch = videos[offset : offset + batch_size]
        clips = generate_videos(pipe, batch, protocol)
        for video, clip in zip(batch, clips, strict=True):
            save_video(clip, layout.video(video.class_name, video.index), fps=protocol.fps)
            if video.class_name not in preview:
                preview[video.class_name] = clip
        features.append(extractor.logits(clips))
        if clipsim is not None:
            similarity.append(clipsim(clips, [v.prompt for v in batch]))
    shard = FvdShard(features=np.concatenate(features), settings_key=key,
                     indices=np.array([v.index for v in videos]), classes=np.array([v.class_name for v in videos]),
                     clipsim=np.concatenate(similarity) if similarity else np.zeros(0),
                     preview_classes=np.array(list(preview)), preview=np.stack(list(preview.values())))
    return shard.save(layout.shard(start, stop))


def score_shards(real_features: np.ndarray, shard_files: Sequence[str | Path], real_dir: str | Path,
                 real_cached: bool) -> dict[str, Any]:
    """FVD/KVD of the shards' features against the real ones, mean CLIPSIM (None without CLIP), the
    counts, and the real folder's per-class video counts (to compare with UCF-101's)."""
    features, similarity = [], []
    for path in shard_files:
        shard = FvdShard.load(path)
        features.append(shard.features)
        similarity.append(shard.clipsim)
    fake, clipsim = np.concatenate(features), np.concatenate(similarity)
    result = {**distances(real_features, fake), "num_real": len(real_features), "num_fake": len(fake),
              "real_features_cached": real_cached, "clipsim": float(clipsim.mean()) if len(clipsim) else None}
    result["real_class_counts"] = counts_from_root(real_dir)
    return result


def write_sample_grid(shard_files: Sequence[str | Path], output_dir: str | Path) -> Path:
    """The per-class contact sheet (middle frame of the first video of each class) as `sample_grid.jpg`."""
    import cv2

    tiles: dict[str, np.ndarray] = {}
    for path in shard_files:
        shard = FvdShard.load(path)
        for name, clip in zip(shard.preview_classes, shard.preview, strict=True):
            tiles.setdefault(str(name), clip)
    grid = sample_grid([(name, tiles[name]) for name in CLASS_NAMES if name in tiles])
    grid_path = EvaluationLayout(output_dir).sample_grid
    cv2.imwrite(str(grid_path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return grid_path
