"""Helpers shared by the curation tests (not fixtures: plain functions over real sample files)."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np

from curation.chain import analysis_size
from curation.config import CutConfig
from curation.cuts import CutCascade
from curation.decode import analysis_copy, probe, stream_frames


def ground_truth(sample_dir: Path) -> dict:
    return json.loads((sample_dir / "ground_truth.json").read_text())


def detect_cuts(path: Path, config: CutConfig | None = None) -> list[int]:
    info = probe(path)
    width, height = analysis_size(info.width, info.height, 128)
    cascade = CutCascade(config or CutConfig(), info.fps)
    for index, frame in enumerate(stream_frames(path)):
        cascade.push(index, analysis_copy(frame, width, height))
    return cascade.finish()


def decode_rgb(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)
