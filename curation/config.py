"""All curation settings in one tree of dataclasses; the defaults are docs/recipe.md §1's numbers.

`CurationConfig.from_overrides({"cuts": {"native_adaptive_threshold": 2.5}})` merges a nested dict
(the flow's `config` parameter, `--config FILE` or `--set cuts.min_shot_s=0.5` on the CLI) onto the
defaults at every depth and rejects unknown keys by name, so a typo never silently runs with defaults.
`CurateRequest` is one curate-lvd run: where from, where to, these settings, which Ray.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from common.flow import FarnebackParams
from common.requests import Request, RequestError, build, check_fields, check_ranges, setting
from curation.scorers.config import ScorersConfig
from dataformat import SCORE_COLUMNS, VIDEO_SUFFIXES

# 8K UHD: larger frames cost gigabytes per decoded frame batch and are refused up front (decode.max_pixels).
MAX_PIXELS_8K = 7680 * 4320


@dataclass
class DecodeConfig:
    """How sources are opened. Frames stream through the chain; nothing holds a whole video."""

    analysis_width: int = 64  # cut detectors and motion see frames scaled to this width
    sample_long_side: int = 640  # frames kept for the learned scorers (first/middle/last of each clip)
    min_side: int = 32  # sources smaller than this (either side) are refused
    max_pixels: int = MAX_PIXELS_8K  # sources with more pixels per frame than this are refused
    max_duration_s: float = 6 * 3600.0  # absurdly long sources are refused up front
    min_frames: int = 2
    # CPU threads one source may use to decode and re-encode; 0: the CPUs this process was given (a Ray task's
    # CPUs; outside Ray, every core this process may run on). A task given 1 CPU then uses 1 core.
    threads: int = 0

    def __post_init__(self) -> None:
        check_ranges(self, "decode", {"analysis_width": (16, None), "sample_long_side": (16, None),
                                      "min_side": (1, None), "max_pixels": (1, None), "threads": (0, None),
                                      "max_duration_s": (1e-3, None), "min_frames": (1, None)})


@dataclass
class CutConfig:
    """The detector cascade (docs/recipe.md §1: three PySceneDetect detectors at three frame rates).

    Level 1, AdaptiveDetector at the native rate: hard and jump cuts, robust to camera motion.
    Level 2 and 3, ContentDetector at `mid_fps` and `low_fps`: gradual transitions (dissolves) whose
    per-frame change is too small to see at the native rate. ThresholdDetector: fades through black.
    Every candidate is then verified: a cut must change the shot's structure (flashes and exposure
    jumps keep it) and a gradual candidate must look like a blend of the shots on either side.
    """

    native_adaptive_threshold: float = 3.0
    native_min_content: float = 15.0
    native_window: int = 2
    mid_fps: float = 8.0
    mid_threshold: float = 27.0
    low_fps: float = 2.0
    low_threshold: float = 30.0
    fade_threshold: int = 12  # mean 8-bit intensity below which a frame counts as black
    min_shot_s: float = 0.4  # shots as short as half a second must survive
    same_shot_correlation: float = 0.94  # structure correlation above which a candidate is a flash, not a cut
    max_blend_residual: float = 0.3  # gradual candidates: inner frames must be this close to a blend of the ends
    min_dissolve_colour_change: float = 0.4  # Bhattacharyya distance of the ends' hue-saturation histograms
    dissolve_lengths: tuple[int, ...] = (8, 12, 16, 20, 24)  # transition lengths searched (frames @25fps)

    def __post_init__(self) -> None:
        check_ranges(self, "cuts", {"native_adaptive_threshold": (0, None), "native_min_content": (0, None),
                                    "native_window": (1, None), "mid_fps": (1e-3, None), "mid_threshold": (0, None),
                                    "low_fps": (1e-3, None), "low_threshold": (0, None), "fade_threshold": (0, 255),
                                    "min_shot_s": (0, None), "same_shot_correlation": (-1, 1),
                                    "max_blend_residual": (0, None), "min_dissolve_colour_change": (0, None),
                                    "dissolve_lengths": (2, None)})


CLIP_METHODS = ("exact-copy", "keyframe", "reencode")
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


@dataclass
class ClipConfig:
    """Clips are shots (between cuts), written by one of `CLIP_METHODS` (docs/exact-clips.md).

    `exact-copy` stream-copies whole groups of pictures and shows exactly the shot through an MP4 edit list;
    `keyframe` stream-copies the shot snapped inwards to keyframes (re-encoding it when too little is left);
    `reencode` re-encodes every clip with x264."""

    min_clip_s: float = 1.0
    max_clip_s: float = 30.0  # longer shots are split (at keyframes when copying)
    method: str = "exact-copy"
    reencode_crf: int = 18
    reencode_preset: str = "ultrafast"  # x264 preset of re-encoded clips (see benchmarks/curation.py)
    # Re-encoded clips are written while decoding from frames held back until their cuts settle (a few
    # seconds of video); above this many MiB of held frames (large frames) a second decode pass writes them.
    lookahead_mb: int = 512

    def __post_init__(self) -> None:
        check_ranges(self, "clips", {"min_clip_s": (1e-3, None), "max_clip_s": (self.min_clip_s, None),
                                     "reencode_crf": (0, 51), "lookahead_mb": (0, None)})
        if self.method not in CLIP_METHODS:
            raise ValueError(f"clips.method must be one of {', '.join(CLIP_METHODS)}, got {self.method!r}")
        if self.reencode_preset not in X264_PRESETS:
            raise ValueError(f"clips.reencode_preset must be one of {', '.join(X264_PRESETS)}, "
                             f"got {self.reencode_preset!r}")


@dataclass
class MotionConfig(FarnebackParams):
    """Farneback dense flow at 2 fps on frames whose short side is 16 px (docs/recipe.md §1)."""

    fps: float = 2.0

    def __post_init__(self) -> None:
        check_ranges(self, "motion", {"fps": (1e-3, None), "short_side": (8, None), "pyr_scale": (0.05, 0.95),
                                      "levels": (1, None), "winsize": (1, None), "iterations": (1, None),
                                      "poly_n": (1, None), "poly_sigma": (1e-3, None)})


@dataclass
class FilterRule:
    """One LVD-F rule over a manifest column.

    mode 'percentile': drop the `value` percent of clips at the `drop` end ('low' or 'high') of this
    run's distribution; mode 'absolute': drop clips below (`drop='low'`) or above (`'high'`) `value`.
    """

    name: str
    column: str
    mode: str
    drop: str
    value: float

    def __post_init__(self) -> None:
        if self.mode not in ("percentile", "absolute"):
            raise ValueError(f"filter rule {self.name!r}: mode must be 'percentile' or 'absolute', got {self.mode!r}")
        if self.drop not in ("low", "high"):
            raise ValueError(f"filter rule {self.name!r}: drop must be 'low' or 'high', got {self.drop!r}")
        if self.mode == "percentile" and not 0 <= self.value <= 100:
            raise ValueError(f"filter rule {self.name!r}: percentile must be in [0, 100], got {self.value}")
        if not math.isfinite(self.value):
            raise ValueError(f"filter rule {self.name!r}: value must be a finite number, got {self.value}")


def default_filter_rules() -> list[FilterRule]:
    """docs/recipe.md §1: 25% most static, 25% lowest aesthetics, 50% lowest CLIP score, 25% most text, text > 7%."""
    return [
        FilterRule("static", "motion_score", "percentile", "low", 25.0),
        FilterRule("low_aesthetics", "aesthetic_score", "percentile", "low", 25.0),
        FilterRule("low_clip_score", "clip_score", "percentile", "low", 50.0),
        FilterRule("most_text", "text_area", "percentile", "high", 25.0),
        FilterRule("text_over_7pct", "text_area", "absolute", "high", 0.07),
    ]


DEDUP_METHODS = ("auto", "clip", "phash")
CLIP_LENGTH = "length"  # `DedupConfig.keep_best`'s name for a clip's duration (end_s - start_s)
CLIP_PIXELS = "pixels"  # and for its resolution (width x height): of two copies, the sharper


@dataclass
class DedupConfig:
    """Near-duplicate removal after scoring (docs/dedup.md): clips whose signatures are this close form a group,
    the best of each group is kept and the others are dropped by the `duplicate` rule."""

    enabled: bool = setting(True, help="group near-identical clips and keep one per group")
    method: str = setting("auto", help="signature: 'clip' (the CLIP scorer's image embeddings), 'phash' (a "
                                       "perceptual hash of first/middle/last frame), 'auto' (clip when the CLIP "
                                       "scorer runs, else phash)")
    clip_min_cosine: float = setting(0.95, min=0.5, max=1.0,
                                     help="two clips are duplicates when their mean CLIP image embeddings have at "
                                          "least this cosine similarity [open]")
    phash_max_bits: int = setting(28, min=0, max=96,
                                  help="two clips are duplicates when their 192-bit perceptual hashes (or one's and "
                                       "the other's 90 percent centre crop's) differ in at most this many bits [open]")
    keep_best: tuple[str, ...] = setting(("aesthetic_score", CLIP_PIXELS, CLIP_LENGTH, "motion_score"),
                                         help="the clip kept of a group: the best by the first column, ties and "
                                              "missing scores decided by the next ('pixels': width x height, "
                                              "'length': the clip's duration)")
    cell_size: int | None = setting(None, min=16, max=1_000_000,
                                    help="clips per cell of the approximate-neighbour index (k-means cells); runs of "
                                         "at most twice this many are compared exhaustively; None: about "
                                         "sqrt(clips) / probes, at least 256")
    probes: int | None = setting(None, min=1, max=8,
                                 help="cells each clip is placed in (more finds more pairs that lie near a cell "
                                      "boundary, at more work); None: 2 for CLIP embeddings, 4 for hashes "
                                      "(benchmarks/dedup.py)")

    def __post_init__(self) -> None:
        try:
            check_fields(self)
        except RequestError as error:
            raise RequestError(f"setting dedup.{error}") from None
        if self.method not in DEDUP_METHODS:
            raise RequestError(f"setting dedup.method must be one of {', '.join(DEDUP_METHODS)}, got {self.method!r}")
        known = (*SCORE_COLUMNS, CLIP_PIXELS, CLIP_LENGTH)
        unknown = [name for name in self.keep_best if name not in known]
        if unknown or not self.keep_best:
            raise RequestError(f"setting dedup.keep_best names columns from {', '.join(known)}; "
                               f"got {list(self.keep_best)!r}")


@dataclass
class ShardConfig:
    max_samples: int = 256
    max_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        check_ranges(self, "shards", {"max_samples": (1, None), "max_bytes": (1, None)})


@dataclass
class CurationConfig:
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    cuts: CutConfig = field(default_factory=CutConfig)
    clips: ClipConfig = field(default_factory=ClipConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    filters: list[FilterRule] = field(default_factory=default_filter_rules)
    shards: ShardConfig = field(default_factory=ShardConfig)
    scorers: ScorersConfig = field(default_factory=ScorersConfig)  # learned scorers + actor pools (issue 4)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    video_extensions: tuple[str, ...] = VIDEO_SUFFIXES

    def __post_init__(self) -> None:
        self.scorers.validate()  # the other sections check their own ranges; the scorers' names need their path
        if self.dedup.enabled and self.dedup.method == "clip" and "clip" not in self.scorers.active():
            why = self.scorers.unavailable().get("clip", "off: scorers.clip.enabled is false")
            raise RequestError(f"setting dedup.method='clip' needs the CLIP scorer, which is {why}; "
                               "use dedup.method='auto' or 'phash'")

    def dedup_probes(self, method: str) -> int:
        """Cells per item: the setting, or what benchmarks/dedup.py found keeps recall >= 0.97 for the method."""
        return self.dedup.probes or (2 if method == "clip" else 4)

    def dedup_method(self) -> str | None:
        """The signature near-duplicate removal uses in this run ('clip' or 'phash'), None when it is off."""
        if not self.dedup.enabled:
            return None
        if self.dedup.method == "auto":
            return "clip" if "clip" in self.scorers.active() else "phash"
        return self.dedup.method

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any] | None = None) -> CurationConfig:
        """The defaults with `overrides` merged at every depth, typed and checked (common.requests.build)."""
        return build(cls, overrides, name="config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CurateRequest(Request):
    """One curate-lvd run: a folder of raw videos -> LVD-F (the flow, `lvd curate` and the pipeline share it)."""

    input_path: str | None = setting(None, positional=True, path="exists",
                                     help="folder or file of raw videos (default: the bundled sample clips)")
    output_path: str = setting("out/curate", positional=True, path="output",
                               help="run directory (sources.parquet, manifest.parquet, shards/); rerunning resumes")
    config: CurationConfig = setting(default_factory=CurationConfig,
                                     help="overrides of the CurationConfig defaults, checked by name, e.g. "
                                          '{"clips": {"min_clip_s": 2.0}}')
    ray_address: str | None = setting(None, help='Ray cluster to run on (e.g. "ray://head:10001"); default: '
                                                 "a local Ray")
    sources_per_task: int = setting(8, min=1, help="sources one Prefect task run curates (fewer when a run has too "
                                                   "few to give every Ray CPU a batch)")
    batches_in_flight: int | None = setting(None, min=1, help="batches submitted to Ray at once; the next is "
                                                              "submitted as one finishes (default: 2 per Ray CPU)")
    progress: bool = setting(False, cli=False, help="show a console progress bar (used by `lvd curate`)")

    def check_inputs(self) -> None:
        """The Ray cluster named by `ray_address` accepts this driver (one line when it does not)."""
        from infra.local import check_ray_connection

        try:
            check_ray_connection(self.ray_address)
        except ConnectionError as error:
            raise RequestError(str(error)) from None

    def validate(self) -> None:
        self.config.scorers.validate()  # configured weights that do not exist are named before any work starts
