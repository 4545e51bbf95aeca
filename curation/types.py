"""Records that travel through the curation chain.

A source is decoded once; what later steps need of it is kept as small records: per-frame cut
features inside the detectors, per-sample flow magnitudes for motion, and a few sampled RGB frames
per clip (first, middle, last) for the learned scorers, plus a few more spread over the clip for the video
captioner when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass
class ClipFrames:
    """Frames a learned scorer sees of one clip: first, middle and last, RGB uint8, long side <= 640 px."""

    clip_id: str
    frames: np.ndarray  # (3, H, W, 3) uint8, order: first, middle, last
    caption: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # (K, H, W, 3) uint8 evenly spread over the clip for the video captioner; None when it was not active
    video_frames: np.ndarray | None = None


class ClipScorer(Protocol):
    """A learned per-clip annotation (text area, CLIP scores, captions).

    `score` takes a batch of clips and returns one dict per clip holding exactly `columns`;
    a clip it cannot score gets its columns set to None and an `error` entry, never an exception.
    """

    name: str
    columns: tuple[str, ...]

    def score(self, batch: list[ClipFrames]) -> list[dict[str, Any]]: ...
