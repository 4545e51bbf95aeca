"""Farneback dense optical flow on tiny frames: the one motion measurement curation and training share.

Curation scores a clip at 2 fps (`curation/motion.py`); training measures each sample's own frames at the
stride it draws them at (`training/motion.py`). Both shrink frames so the short side is 16 px (docs/recipe.md
§1) and take the mean flow magnitude, so their numbers are in the same unit: pixels at that size per pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np


class FarnebackSettings(Protocol):
    """OpenCV's Farneback parameters (curation's `MotionConfig` is one)."""

    pyr_scale: float
    levels: int
    winsize: int
    iterations: int
    poly_n: int
    poly_sigma: float


@dataclass
class FarnebackParams:
    """Frame size and OpenCV Farneback settings of the motion measurement (docs/recipe.md §1): curation's
    `MotionConfig` extends them with its sampling rate; training measures samples with the defaults."""

    short_side: int = 16
    pyr_scale: float = 0.5
    levels: int = 3
    winsize: int = 5
    iterations: int = 3
    poly_n: int = 5
    poly_sigma: float = 1.1


def downscale_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def farneback_magnitude(previous: np.ndarray, current: np.ndarray, settings: FarnebackSettings) -> float:
    """Mean optical-flow magnitude (pixels at the downscaled size) between two grey frames."""
    flow = cv2.calcOpticalFlowFarneback(
        previous, current, None, settings.pyr_scale, settings.levels, settings.winsize,
        settings.iterations, settings.poly_n, settings.poly_sigma, 0,
    )
    return float(np.linalg.norm(flow, axis=2).mean())


def mean_pair_motion(frames_rgb: Sequence[np.ndarray], short_side: int, settings: FarnebackSettings) -> float | None:
    """Mean Farneback magnitude over consecutive pairs of `frames_rgb` (uint8 RGB), each shrunk so its short
    side is `short_side` px; None for fewer than two frames."""
    if len(frames_rgb) < 2:
        return None
    grey = [cv2.cvtColor(downscale_short_side(np.ascontiguousarray(f), short_side), cv2.COLOR_RGB2GRAY)
            for f in frames_rgb]
    return float(np.mean([farneback_magnitude(a, b, settings) for a, b in zip(grey, grey[1:], strict=False)]))
