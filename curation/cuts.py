"""Shot-cut detection: a cascade of PySceneDetect detectors at three frame rates, then verification.

Why a cascade (docs/recipe.md §1): a detector at the native rate sees a 15-frame dissolve as 15 small changes
and misses it; the same detector fed every 3rd or 12th frame sees one large change. Low rates also
fire on fast camera motion, so every candidate is verified on small grey thumbnails kept in a ring
buffer (bounded memory, streaming):

* a real cut changes the picture's structure: the luma-normalised correlation between a frame before
  and a frame after the event stays high for photo flashes and exposure jumps, so those are rejected;
* a gradual candidate must look like a dissolve: some window [a, b] around it has a midpoint frame
  close to the average of its ends (camera motion does not), and the cut is placed at that midpoint.

Fades through black come from PySceneDetect's ThresholdDetector (cut at the middle of the dark run).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np
from scenedetect import FrameTimecode
from scenedetect.detectors import AdaptiveDetector, ContentDetector, ThresholdDetector

from curation.config import CutConfig

THUMB_SIZE = (32, 18)  # structure correlation and dissolve fits: small enough to ignore motion of a few pixels


@dataclass
class Candidate:
    """A possible cut: `frame` is the first frame of the new shot; `window` the frames that changed."""

    frame: int
    level: str  # 'native' | 'mid' | 'low' | 'fade'
    window: tuple[int, int]


class Thumb:
    """What verification keeps of one frame (~9 KB; a few seconds of them sit in a ring buffer).

    The colour histogram is only needed for the frames around a dissolve candidate, so it is
    computed on first use.
    """

    __slots__ = ("small", "structure", "_colour", "_unit")

    def __init__(self, analysis_bgr: np.ndarray) -> None:
        self.small = cv2.resize(analysis_bgr, (64, 36), interpolation=cv2.INTER_AREA)
        gray = cv2.resize(cv2.cvtColor(self.small, cv2.COLOR_BGR2GRAY), THUMB_SIZE, interpolation=cv2.INTER_AREA)
        self.structure = gray.astype(np.float32)
        self._colour: np.ndarray | None = None
        self._unit: np.ndarray | None = None

    @property
    def unit(self) -> np.ndarray:
        """The grey thumbnail zero-mean and unit-norm (float64; zeros for a flat frame), computed once:
        verification correlates each frame with many others."""
        if self._unit is None:
            centred = self.structure.ravel().astype(np.float64)
            centred -= centred.mean()
            norm = float(np.sqrt(centred @ centred))
            self._unit = centred / norm if norm >= 1e-3 else np.zeros_like(centred)
        return self._unit

    def correlation(self, other: Thumb) -> float:
        """Pearson correlation of the two grey thumbnails: 1 for the same picture under any gain/offset,
        0 when either is flat (black, white: structure undefined, treated as different)."""
        return float(self.unit @ other.unit)

    @property
    def blend(self) -> np.ndarray:
        return self.structure

    @property
    def colour(self) -> np.ndarray:
        """Hue-saturation histogram, L1-normalised."""
        if self._colour is None:
            hsv = cv2.cvtColor(self.small, cv2.COLOR_BGR2HSV)
            hist = cv2.calcHist([hsv], [0, 1], None, [16, 8], [0, 180, 0, 256])
            self._colour = cv2.normalize(hist, hist, 1, 0, cv2.NORM_L1)
        return self._colour


def make_thumb(analysis_bgr: np.ndarray) -> Thumb:
    return Thumb(analysis_bgr)


def fit_cross_fades(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit the inner frames of each window as alpha*first + (1-alpha)*last.

    `windows` is (windows, frames, pixels). Returns each window's residual relative to how different its
    ends are, and the fitted alphas (windows, frames-2). A dissolve is such a blend with alpha falling from
    1 to 0; camera or subject motion is not a blend of the window's ends for any alpha.
    """
    first, last = windows[:, 0], windows[:, -1]
    difference = first - last
    energy = np.maximum(np.einsum("wp,wp->w", difference, difference), 1e-6)
    scale = np.abs(difference).mean(axis=1)
    offsets = windows[:, 1:-1] - last[:, None]
    alphas = np.clip(np.einsum("wfp,wp->wf", offsets, difference) / energy[:, None], 0.0, 1.0)
    misfit = alphas[..., None] * difference[:, None]  # in place from here: these arrays dominate the cost
    np.subtract(offsets, misfit, out=misfit)
    np.abs(misfit, out=misfit)
    errors = misfit.reshape(len(windows), -1).mean(axis=1)
    residuals = np.where(scale > 1e-3, errors / np.maximum(scale, 1e-3), np.inf)
    return residuals, alphas


class CutCascade:
    """Feed analysis frames in order with `push`; `finish` returns the sorted list of cut frames."""

    def __init__(self, config: CutConfig, fps: float) -> None:
        self.config = config
        self.fps = fps
        min_shot = max(1, round(config.min_shot_s * fps))
        self.min_shot_frames = min_shot
        self.mid_step = max(1, round(fps / config.mid_fps))
        self.low_step = max(self.mid_step + 1, round(fps / config.low_fps))
        self.native = AdaptiveDetector(
            adaptive_threshold=config.native_adaptive_threshold,
            min_content_val=config.native_min_content,
            window_width=config.native_window,
            min_scene_len=min_shot,
        )
        self.mid = ContentDetector(threshold=config.mid_threshold, min_scene_len=1)
        self.low = ContentDetector(threshold=config.low_threshold, min_scene_len=1)
        self.fade = ThresholdDetector(threshold=config.fade_threshold, min_scene_len=min_shot, fade_bias=0.0)
        # Scale dissolve lengths (given for 25 fps) to this source's rate.
        self.dissolve_lengths = sorted({max(2, round(n * fps / 25.0)) for n in config.dissolve_lengths})
        reach = 2 * self.low_step + max(self.dissolve_lengths) + 8
        self.lag = reach
        self.thumbs: deque[tuple[int, Thumb]] = deque(maxlen=3 * reach + 16)
        self.pending: list[Candidate] = []
        self.accepted: list[Candidate] = []
        self.rejected: list[tuple[Candidate, str]] = []
        self.frame_count = 0
        # A frame this many frames old has its cut settled unless a fade's dark run or a chain of merges
        # reaches further back: candidates wait `lag` frames, a located dissolve moves back by up to a low
        # step plus a dissolve, and merging looks `min_shot_frames` around each.
        self.settle_frames = reach + self.low_step + max(self.dissolve_lengths) + min_shot + 2
        self._provisional: tuple[int, set[int]] = (0, set())

    def _timecode(self, index: int) -> FrameTimecode:
        return FrameTimecode(index, fps=self.fps)

    def push(self, index: int, analysis_bgr: np.ndarray) -> None:
        timecode = self._timecode(index)
        self.thumbs.append((index, make_thumb(analysis_bgr)))
        for cut in self.native.process_frame(timecode, analysis_bgr):
            self.pending.append(Candidate(cut.frame_num, "native", (cut.frame_num - 1, cut.frame_num)))
        for cut in self.fade.process_frame(timecode, analysis_bgr):
            half = self.min_shot_frames
            self.pending.append(Candidate(cut.frame_num, "fade", (cut.frame_num - half, cut.frame_num + half)))
        if index % self.mid_step == 0:
            for cut in self.mid.process_frame(timecode, analysis_bgr):
                self.pending.append(Candidate(cut.frame_num, "mid", (cut.frame_num - self.mid_step, cut.frame_num)))
        if index % self.low_step == 0:
            for cut in self.low.process_frame(timecode, analysis_bgr):
                self.pending.append(Candidate(cut.frame_num, "low", (cut.frame_num - self.low_step, cut.frame_num)))
        self.frame_count = index + 1
        self._resolve(ready_before=index - self.lag)

    def is_cut_so_far(self, index: int) -> bool:
        """Whether the candidates verified so far put a cut at `index` (final for frames `settle_frames`
        old but in rare cases; callers that act on it check against `finish`)."""
        if self._provisional[0] != len(self.accepted):
            self._provisional = (len(self.accepted), set(self._merge()))
        return index in self._provisional[1]

    def finish(self) -> list[int]:
        self._resolve(ready_before=self.frame_count + self.lag)
        return self._merge()

    # -- verification -------------------------------------------------------------------------------

    def _thumb(self, index: int) -> Thumb | None:
        if not self.thumbs:
            return None
        first = self.thumbs[0][0]
        position = index - first
        if 0 <= position < len(self.thumbs):
            return self.thumbs[position][1]
        return None

    def _clamped_thumb(self, index: int) -> Thumb | None:
        first, last = self.thumbs[0][0], self.thumbs[-1][0]
        return self._thumb(min(max(index, first), last))

    def _resolve(self, ready_before: int) -> None:
        still_pending = []
        for candidate in self.pending:
            if candidate.window[1] > ready_before:
                still_pending.append(candidate)
                continue
            verdict = self._verify(candidate)
            if isinstance(verdict, Candidate):
                self.accepted.append(verdict)
            else:
                self.rejected.append((candidate, verdict))
        self.pending = still_pending

    def _verify(self, candidate: Candidate) -> Candidate | str:
        start, end = candidate.window
        if self._clamped_thumb(start) is None:
            return "outside buffer"
        if candidate.level == "fade":
            return candidate  # a run of black frames separates two shots by construction
        if self._same_shot(start, end):
            return "same shot (flash or exposure change)"
        if candidate.level == "native":
            return candidate
        return self._locate_dissolve(candidate)

    def _same_shot(self, start: int, end: int) -> bool:
        """True when some frame just before `start` and some frame just after `end` share their structure.

        A flash or an exposure jump leaves the picture's layout intact on at least one such pair, while a
        cut (even a jump cut inside one scene) does not. Several pairs make this robust to a flash
        spanning a frame or two more than the window.
        """
        befores = [self._clamped_thumb(start - k) for k in (1, 2, 3)]
        afters = [self._clamped_thumb(end + k) for k in (1, 3, 5)]
        best = max(b.correlation(a) for b in befores for a in afters)
        return best >= self.config.same_shot_correlation

    def _locate_dissolve(self, candidate: Candidate) -> Candidate | str:
        """Find the longest window near a low-rate candidate that is a cross-fade between two shots.

        All windows of one length are tested at once (vectorised: ends from different shots, blend fit,
        falling blend weight); among the longest length that has one, the best fit wins and the cut goes
        where its blend weight crosses one half.
        """
        start, end = candidate.window
        config = self.config
        low = start - max(self.dissolve_lengths)
        indices = [i for i in range(low, end + max(self.dissolve_lengths) + 1) if self._thumb(i) is not None]
        if not indices:
            return "outside buffer"
        first_index, last_index = indices[0], indices[-1]
        thumbs = [self._thumb(i) for i in range(first_index, last_index + 1)]
        stack = np.stack([thumb.blend.ravel() for thumb in thumbs])
        units = np.stack([thumb.unit for thumb in thumbs])
        colours = np.stack([thumb.colour.ravel() for thumb in thumbs]).astype(np.float64)
        roots, totals = np.sqrt(colours), colours.sum(axis=1)
        for length in sorted(self.dissolve_lengths, reverse=True):
            first, last = max(start - length, first_index), min(end, last_index - length)
            if last < first:
                continue
            a = np.arange(first - first_index, last - first_index + 1)
            b = a + length
            # the window's ends belong to different shots: new colours (Bhattacharyya distance of the hue-saturation
            # histograms, as OpenCV's compareHist computes it) and a different layout
            product = totals[a] * totals[b]
            scale = np.where(np.abs(product) > np.finfo(np.float32).eps, 1.0 / np.sqrt(np.abs(product)), 1.0)
            colour_change = np.sqrt(np.maximum(1.0 - np.einsum("wb,wb->w", roots[a], roots[b]) * scale, 0.0))
            correlation = np.einsum("wp,wp->w", units[a], units[b])
            changed = (colour_change >= config.min_dissolve_colour_change) & (
                correlation < config.same_shot_correlation)
            a = a[changed]
            if not len(a):
                continue
            residuals, alphas = fit_cross_fades(stack[a[:, None] + np.arange(length + 1)[None, :]])
            weights = alphas.astype(np.float64)  # compared in double precision
            falling = np.all(weights[:, 1:] <= weights[:, :-1] + 0.1, axis=1)
            fits = (residuals <= config.max_blend_residual) & (weights[:, 0] > 0.6) & (weights[:, -1] < 0.4) & falling
            if not fits.any():
                continue
            pick = np.flatnonzero(fits)[np.argmin(residuals[fits])]  # the first of equally good fits
            window_start = first_index + int(a[pick])
            below = np.flatnonzero(alphas[pick] < 0.5)
            crossing = window_start + 1 + (int(below[0]) if len(below) else alphas.shape[1])
            return Candidate(crossing, candidate.level, (window_start, window_start + length))
        return "no dissolve (camera or subject motion, or no colour change)"

    def _merge(self) -> list[int]:
        """One cut per transition: overlapping candidates merge, preferring hard-cut positions."""
        priority = {"fade": 0, "native": 1, "mid": 2, "low": 3}
        ordered = sorted(self.accepted, key=lambda c: (priority[c.level], c.frame))
        cuts: list[int] = []
        spans: list[tuple[int, int]] = []
        for candidate in ordered:
            low = min(candidate.window[0], candidate.frame) - self.min_shot_frames // 2
            high = max(candidate.window[1], candidate.frame) + self.min_shot_frames // 2
            if any(low <= s_high and s_low <= high for s_low, s_high in spans):
                continue
            if not 0 < candidate.frame < self.frame_count:
                continue
            if any(abs(candidate.frame - cut) < self.min_shot_frames for cut in cuts):
                continue
            cuts.append(candidate.frame)
            spans.append((min(candidate.window[0], candidate.frame), max(candidate.window[1], candidate.frame)))
        return sorted(cuts)
