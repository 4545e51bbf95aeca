"""Motion score (docs/recipe.md §1): Farneback dense flow at 2 fps on frames whose short side is 16 px.

Flow is computed between consecutive 2-fps samples of the whole source while it streams (one tiny
grey frame kept at a time); a clip's score is the mean flow magnitude over the sample pairs inside it,
i.e. the mean over space and time. Static footage scores near 0 (the paper's static example: 0.043).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from common.flow import downscale_short_side, farneback_magnitude
from curation.config import MotionConfig


@dataclass
class FlowPair:
    previous_frame: int
    frame: int
    magnitude: float


class MotionMeter:
    """Streaming sampler: call `push` for every frame; it keeps only the last 2-fps sample."""

    def __init__(self, config: MotionConfig, fps: float) -> None:
        self.config = config
        self.interval = fps / config.fps
        self.next_sample = 0.0
        self.previous: tuple[int, np.ndarray] | None = None
        self.pairs: list[FlowPair] = []

    def wants(self, index: int) -> bool:
        return index + 1e-6 >= self.next_sample

    def push(self, index: int, analysis_bgr: np.ndarray) -> None:
        if not self.wants(index):
            return
        self.next_sample += self.interval
        gray = cv2.cvtColor(downscale_short_side(analysis_bgr, self.config.short_side), cv2.COLOR_BGR2GRAY)
        if self.previous is not None:
            magnitude = farneback_magnitude(self.previous[1], gray, self.config)
            self.pairs.append(FlowPair(self.previous[0], index, magnitude))
        self.previous = (index, gray)

    def score(self, start_frame: int, end_frame: int) -> float | None:
        """Mean magnitude over sample pairs inside [start_frame, end_frame); None if the clip has none."""
        inside = [p.magnitude for p in self.pairs if p.previous_frame >= start_frame and p.frame < end_frame]
        return float(np.mean(inside)) if inside else None
