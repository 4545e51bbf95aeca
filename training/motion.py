"""SVD's motion conditioning for training samples: each sample's own motion, and the named mapping that turns
it into a `motion_bucket_id` (0..255).

A sample's motion is measured on the frames it is drawn with, at its stride (`sample_motion`): the mean
Farneback flow magnitude between consecutive drawn frames shrunk to a 16 px short side, curation's measurement
(`common/flow.py`) at the sample's frame spacing. So a clip drawn at stride 2 reports about twice the motion per
frame pair of the same clip at stride 1, which is what a generated video at that bucket will show between
frames. (Curation's per-clip score is one number at 2 fps whatever the stride.)

The mapping (`MotionBuckets.mapping`, docs/finetuning.md "Motion buckets"):
- `fixed`: every sample gets `fixed_bucket` (127). The default for image-to-video finetunes of released SVD
  weights: 127 keeps the meaning SVD learned from Stability's own (unpublished) score-to-bucket mapping, as
  community trainers do, so `--motion 127` still gives the motion users know.
- `linear`: 255 * min(motion / scale, 1); `scale` is the motion that reaches the top bucket [open].
- `percentile`: 255 * the motion's rank among a reference set of the training samples' own motions (measured
  before the run), so the buckets are used evenly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from common.flow import FarnebackParams, mean_pair_motion

MOTION_MAPPINGS = ("fixed", "linear", "percentile")
MAX_MOTION_BUCKET = 255
RELEASED_SVD_BUCKET = 127  # SVD's default bucket (sgm and diffusers sampling defaults)
# [open] motion (px per frame pair at a 16 px short side) that `linear` maps to bucket 255: the fastest clips of
# the sample footage measure 1.8 at stride 4, the slowest 0.03 at stride 1 (docs/finetuning.md)
LINEAR_SCALE = 2.0
FARNEBACK = FarnebackParams()


def sample_motion(frames_rgb: Sequence[np.ndarray]) -> float | None:
    """A sample's motion per frame pair, on the frames as drawn (so at its stride); None for one frame."""
    return mean_pair_motion(frames_rgb, FARNEBACK.short_side, FARNEBACK)


@dataclass(frozen=True)
class MotionBuckets:
    """Measured motion -> motion_bucket_id. `reference` (percentile only): the training samples' motions,
    sorted, measured before the run (`training.data.reference_motions`)."""

    mapping: str = "fixed"
    fixed_bucket: int = RELEASED_SVD_BUCKET
    scale: float = LINEAR_SCALE
    reference: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.mapping not in MOTION_MAPPINGS:
            raise ValueError(f"motion bucket mapping must be one of {MOTION_MAPPINGS}, got {self.mapping!r}")
        if not 0 <= self.fixed_bucket <= MAX_MOTION_BUCKET or not self.scale > 0:
            raise ValueError("fixed_bucket must be in 0..255 and scale positive")
        if list(self.reference) != sorted(self.reference):
            raise ValueError("the percentile reference must be sorted")

    @property
    def measures(self) -> bool:
        """Whether samples need their motion measured (`fixed` ignores it)."""
        return self.mapping != "fixed"

    @property
    def calibrated(self) -> bool:
        """False for `percentile` before its reference is measured."""
        return self.mapping != "percentile" or bool(self.reference)

    def bucket(self, motion: float | None) -> int:
        """The bucket id of a sample with `motion`; `fixed_bucket` when there is nothing to measure (an image)."""
        if self.mapping == "fixed" or motion is None or not math.isfinite(motion):
            return self.fixed_bucket
        if self.mapping == "linear":
            return int(round(MAX_MOTION_BUCKET * min(max(motion, 0.0) / self.scale, 1.0)))
        if not self.reference:
            raise ValueError("percentile motion buckets need a reference (measure it before training)")
        below = np.searchsorted(self.reference, motion, side="left")
        at_or_below = np.searchsorted(self.reference, motion, side="right")
        rank = (below + at_or_below) / 2 / len(self.reference)  # mid-rank: ties share one bucket
        return int(round(MAX_MOTION_BUCKET * rank))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"reference": [round(v, 5) for v in self.reference]}
