"""All curation settings in one tree of dataclasses; the defaults are docs/recipe.md §1's numbers.

`CurationConfig.from_overrides({"cuts": {"native_adaptive_threshold": 2.5}})` merges a nested dict
(the flow's `config` parameter, `--config FILE` or `--set cuts.min_shot_s=0.5` on the CLI) onto the
defaults at every depth and rejects unknown keys by name, so a typo never silently runs with defaults.
Every section is a frozen `Settings` dataclass of `setting(...)` fields: their min / max / choices and each
section's `validate()` (checks across fields) run when it is built, and a bad value at any depth is one line
naming the dotted setting (`setting clips.method must be one of ...`).
`CurateRequest` is one curate-lvd run: where from, where to, these settings, which Ray.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from common.flow import FarnebackParams
from common.requests import Request, RequestError, SettingError, Settings, build, setting
from curation.scorers.config import ScorersConfig
from dataformat import SCORE_COLUMNS, VIDEO_SUFFIXES

# 8K UHD: larger frames cost gigabytes per decoded frame batch and are refused up front (decode.max_pixels).
MAX_PIXELS_8K = 7680 * 4320


@dataclass(frozen=True)
class DecodeConfig(Settings):
    """How sources are opened. Frames stream through the chain; nothing holds a whole video."""

    analysis_width: int = setting(64, min=16, help="cut detectors and motion see frames scaled to this width")
    sample_long_side: int = setting(640, min=16, help="long side of the frames kept for the learned scorers "
                                                      "(first/middle/last of each clip)")
    min_side: int = setting(32, min=1, help="sources smaller than this (either side) are refused")
    max_pixels: int = setting(MAX_PIXELS_8K, min=1, help="sources with more pixels per frame than this are refused "
                                                        "(default 8K UHD)")
    max_duration_s: float = setting(6 * 3600.0, min=1e-3, help="absurdly long sources are refused up front")
    min_frames: int = setting(2, min=1, help="sources with fewer frames are refused")
    threads: int = setting(0, min=0, help="CPU threads one source may use to decode and re-encode; 0: the CPUs this "
                                          "process was given (a Ray task's CPUs; outside Ray, every core this "
                                          "process may run on), so a task given 1 CPU uses 1 core")


@dataclass(frozen=True)
class CutConfig(Settings):
    """The detector cascade (docs/recipe.md §1: three PySceneDetect detectors at three frame rates).

    Level 1, AdaptiveDetector at the native rate: hard and jump cuts, robust to camera motion.
    Level 2 and 3, ContentDetector at `mid_fps` and `low_fps`: gradual transitions (dissolves) whose
    per-frame change is too small to see at the native rate. ThresholdDetector: fades through black.
    Every candidate is then verified: a cut must change the shot's structure (flashes and exposure
    jumps keep it) and a gradual candidate must look like a blend of the shots on either side.
    """

    native_adaptive_threshold: float = setting(3.0, min=0, help="level 1 AdaptiveDetector threshold (native rate)")
    native_min_content: float = setting(15.0, min=0, help="level 1 AdaptiveDetector minimum content value")
    native_window: int = setting(2, min=1, help="level 1 AdaptiveDetector window (frames)")
    mid_fps: float = setting(8.0, min=1e-3, help="level 2 ContentDetector frame rate")
    mid_threshold: float = setting(27.0, min=0, help="level 2 ContentDetector threshold")
    low_fps: float = setting(2.0, min=1e-3, help="level 3 ContentDetector frame rate")
    low_threshold: float = setting(30.0, min=0, help="level 3 ContentDetector threshold")
    fade_threshold: int = setting(12, min=0, max=255, help="mean 8-bit intensity below which a frame counts as black")
    min_shot_s: float = setting(0.4, min=0, help="shortest shot in seconds (shots as short as half a second must "
                                                 "survive)")
    same_shot_correlation: float = setting(0.94, min=-1, max=1, help="structure correlation above which a candidate "
                                                                     "is a flash, not a cut")
    max_blend_residual: float = setting(0.3, min=0, help="gradual candidates: inner frames must be this close to a "
                                                         "blend of the ends")
    min_dissolve_colour_change: float = setting(0.4, min=0, help="gradual candidates: least Bhattacharyya distance "
                                                                 "of the ends' hue-saturation histograms")
    dissolve_lengths: tuple[int, ...] = setting((8, 12, 16, 20, 24), min=2, help="transition lengths searched "
                                                                                 "(frames at 25 fps)")


CLIP_METHODS = ("exact-copy", "keyframe", "reencode")
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


@dataclass(frozen=True)
class ClipConfig(Settings):
    """Clips are shots (between cuts), written by one of `CLIP_METHODS` (docs/exact-clips.md).

    `exact-copy` stream-copies whole groups of pictures and shows exactly the shot through an MP4 edit list;
    `keyframe` stream-copies the shot snapped inwards to keyframes (re-encoding it when too little is left);
    `reencode` re-encodes every clip with x264."""

    min_clip_s: float = setting(1.0, min=1e-3, help="shorter shots give no clip")
    max_clip_s: float = setting(30.0, min=1e-3, help="longer shots are split (at keyframes when copying); at least "
                                                     "min_clip_s")
    method: str = setting("exact-copy", choices=CLIP_METHODS, help="how clips are written (docs/exact-clips.md)")
    reencode_crf: int = setting(18, min=0, max=51, help="x264 CRF of re-encoded clips")
    reencode_preset: str = setting("ultrafast", choices=X264_PRESETS, help="x264 preset of re-encoded clips (see "
                                                                           "benchmarks/curation.py)")
    lookahead_mb: int = setting(512, min=0, help="re-encoded clips are written while decoding from frames held back "
                                                 "until their cuts settle (a few seconds of video); above this many "
                                                 "MiB of held frames (large frames) a second decode pass writes them")

    def validate(self) -> None:
        if self.max_clip_s < self.min_clip_s:
            raise SettingError("max_clip_s", f"must be >= {self.min_clip_s:g}, got {self.max_clip_s!r}")


@dataclass(frozen=True)
class MotionConfig(FarnebackParams):
    """Farneback dense flow at 2 fps on frames whose short side is 16 px (docs/recipe.md §1)."""

    fps: float = setting(2.0, min=1e-3, help="frames per second the motion score samples")


FILTER_MODES = ("percentile", "absolute")
FILTER_ENDS = ("low", "high")


@dataclass(frozen=True)
class FilterRule(Settings):
    """One LVD-F rule over a manifest column.

    mode 'percentile': drop the `value` percent of clips at the `drop` end ('low' or 'high') of this
    run's distribution; mode 'absolute': drop clips below (`drop='low'`) or above (`'high'`) `value`.
    """

    name: str = setting(help="the rule's name in the manifest's drop reasons and the report")
    column: str = setting(help="the manifest column it reads")
    mode: str = setting(choices=FILTER_MODES, help="'percentile' of this run's distribution or 'absolute' value")
    drop: str = setting(choices=FILTER_ENDS, help="which end is dropped: 'low' or 'high'")
    value: float = setting(help="percent of clips (mode 'percentile', 0 to 100) or the threshold ('absolute')")

    def validate(self) -> None:
        if not math.isfinite(self.value):
            raise SettingError("value", f"of filter rule {self.name!r} must be a finite number, got {self.value}")
        if self.mode == "percentile" and not 0 <= self.value <= 100:
            raise SettingError("value", f"of filter rule {self.name!r}: a percentile must be in [0, 100], "
                                        f"got {self.value}")


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


@dataclass(frozen=True)
class DedupConfig(Settings):
    """Near-duplicate removal after scoring (docs/dedup.md): clips whose signatures are this close form a group,
    the best of each group is kept and the others are dropped by the `duplicate` rule."""

    enabled: bool = setting(True, help="group near-identical clips and keep one per group")
    method: str = setting("auto", choices=DEDUP_METHODS,
                          help="signature: 'clip' (the CLIP scorer's image embeddings), 'phash' (a perceptual hash "
                               "of first/middle/last frame), 'auto' (clip when the CLIP scorer runs, else phash)")
    clip_min_cosine: float = setting(0.95, min=0.5, max=1.0,
                                     help="two clips are duplicates when their mean CLIP image embeddings have at "
                                          "least this cosine similarity [open]")
    phash_max_bits: int = setting(28, min=0, max=96,
                                  help="two clips are duplicates when their 192-bit perceptual hashes (or one's and "
                                       "the other's 90 percent centre crop's) differ in at most this many bits [open]")
    keep_best: tuple[str, ...] = setting(("aesthetic_score", CLIP_PIXELS, CLIP_LENGTH, "motion_score"),
                                         choices=(*SCORE_COLUMNS, CLIP_PIXELS, CLIP_LENGTH),
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

    def validate(self) -> None:
        if not self.keep_best:
            raise SettingError("keep_best", "must name at least one column")


@dataclass(frozen=True)
class ShardConfig(Settings):
    """How the LVD-F WebDataset shards are cut."""

    max_samples: int = setting(256, min=1, help="samples per shard at most")
    max_bytes: int = setting(1 << 30, min=1, help="bytes per shard at most")


@dataclass(frozen=True)
class CurationConfig(Settings):
    """Every curation setting, section by section; each section checks its own fields when it is built."""

    decode: DecodeConfig = setting(default_factory=DecodeConfig, help="how sources are opened and refused")
    cuts: CutConfig = setting(default_factory=CutConfig, help="the cut detector cascade")
    clips: ClipConfig = setting(default_factory=ClipConfig, help="clip lengths and how clips are written")
    motion: MotionConfig = setting(default_factory=MotionConfig, help="the Farneback motion score")
    filters: list[FilterRule] = setting(default_factory=default_filter_rules,
                                        help="the LVD-F drop rules over manifest columns (replaces the whole list)")
    shards: ShardConfig = setting(default_factory=ShardConfig, help="WebDataset shard sizes")
    scorers: ScorersConfig = setting(default_factory=ScorersConfig, help="the learned scorers and their actor pools")
    dedup: DedupConfig = setting(default_factory=DedupConfig, help="near-duplicate removal after scoring")
    video_extensions: tuple[str, ...] = setting(VIDEO_SUFFIXES, help="file suffixes read as videos in an input "
                                                                     "folder")

    def validate(self) -> None:
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
        """The Ray cluster named by `ray_address` accepts this driver and can fit the scorer pools beside one
        curate-batch task (one line when it does not), before anything is written."""
        from curation.actors import check_cluster_fits
        from infra.local import check_ray_connection

        try:
            check_ray_connection(self.ray_address)
        except ConnectionError as error:
            raise RequestError(str(error)) from None
        check_cluster_fits(self.config.scorers, self.ray_address)

