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

from common.requests import Request, RequestError, build, check_ranges, setting
from curation.scorers.config import ScorersConfig
from dataformat import VIDEO_SUFFIXES

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


X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


@dataclass
class ClipConfig:
    """Clips are shots (between cuts), trimmed to keyframes so they can be stream-copied."""

    min_clip_s: float = 1.0
    max_clip_s: float = 30.0  # longer shots are split (at keyframes when copying)
    stream_copy: bool = True  # False forces re-encoding every clip
    reencode_crf: int = 18
    reencode_preset: str = "ultrafast"  # x264 preset of re-encoded clips (see benchmarks/curation.py)
    # Re-encoded clips are written while decoding from frames held back until their cuts settle (a few
    # seconds of video); above this many MiB of held frames (large frames) a second decode pass writes them.
    lookahead_mb: int = 512

    def __post_init__(self) -> None:
        check_ranges(self, "clips", {"min_clip_s": (1e-3, None), "max_clip_s": (self.min_clip_s, None),
                                     "reencode_crf": (0, 51), "lookahead_mb": (0, None)})
        if self.reencode_preset not in X264_PRESETS:
            raise ValueError(f"clips.reencode_preset must be one of {', '.join(X264_PRESETS)}, "
                             f"got {self.reencode_preset!r}")


@dataclass
class MotionConfig:
    """Farneback dense flow at 2 fps on frames whose short side is 16 px (docs/recipe.md §1)."""

    fps: float = 2.0
    short_side: int = 16
    pyr_scale: float = 0.5
    levels: int = 3
    winsize: int = 5
    iterations: int = 3
    poly_n: int = 5
    poly_sigma: float = 1.1

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
    video_extensions: tuple[str, ...] = VIDEO_SUFFIXES

    def __post_init__(self) -> None:
        self.scorers.validate()  # the other sections check their own ranges; the scorers' names need their path

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
