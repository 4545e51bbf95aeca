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

from common.requests import Settings, setting


class FarnebackSettings(Protocol):
    """OpenCV's Farneback parameters (curation's `MotionConfig` is one)."""

    pyr_scale: float
    levels: int
    winsize: int
    iterations: int
    poly_n: int
    poly_sigma: float


@dataclass(frozen=True)
class FarnebackParams(Settings):
    """Frame size and OpenCV Farneback settings of the motion measurement (docs/recipe.md §1): curation's
    `MotionConfig` extends them with its sampling rate; training measures samples with the defaults."""

    short_side: int = setting(16, min=8, help="frames are shrunk so their short side is this many pixels")
    pyr_scale: float = setting(0.5, min=0.05, max=0.95, help="Farneback: scale between pyramid levels")
    levels: int = setting(3, min=1, help="Farneback: pyramid levels")
    winsize: int = setting(5, min=1, help="Farneback: averaging window size")
    iterations: int = setting(3, min=1, help="Farneback: iterations per pyramid level")
    poly_n: int = setting(5, min=1, help="Farneback: pixel neighbourhood of the polynomial expansion")
    poly_sigma: float = setting(1.1, min=1e-3, help="Farneback: Gaussian sigma smoothing the polynomial expansion")


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
